"""Benchmark of the lazy_cache pass: DDIM sampling with a DiTTransformer2DModel (and a
UNet2DModel), cached vs not.

For each model size and step count: the model is compiled twice with hwopt.compile on the same
captured graph, with passes ["fuse"] (full compute) and ["fuse", "lazy_cache"] (thresholds
calibrated on two sampling runs with other seeds and labels), and timed over whole sampling runs
together with eager PyTorch, interleaved (eager, full, cached, eager, ...), medians reported.
Quality: PSNR of the final latents of the cached run vs eager full compute (same seed), and the
share of block evaluations the cache skipped. Models are random-initialised from config (no
weights are downloaded), so the figures say how much a step cache skips on these models, not on
a trained DiT.

    .venv/bin/python benchmarks/bench_lazy_cache.py [--sizes S,M,UNet] [--steps 25,50]
        [--executor torch|tvm|auto] [--repeats 3]

The default executor is "torch" (the rewritten graph runs in PyTorch): the ratio then isolates
the cache. "tvm" also builds the code outside the blocks with TVM (minutes per model here).
Exits non-zero only on a crash, never on a slow figure.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")

import torch  # noqa: E402
from hwopt.passes.lazy_cache import quality  # noqa: E402

import hwopt  # noqa: E402
from hwopt.bench import Timings  # noqa: E402
from hwopt.step_cache import step_caches  # noqa: E402

SIZES = {  # name: (layers, heads, head_dim, sample_size)
    "S": (4, 4, 16, 16),
    "M": (8, 6, 32, 32),
}


class DiT(torch.nn.Module):
    def __init__(self, layers, heads, head_dim, sample_size):
        super().__init__()
        from diffusers import DiTTransformer2DModel

        torch.manual_seed(0)
        self.m = DiTTransformer2DModel(
            num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
            out_channels=4, num_layers=layers, sample_size=sample_size, patch_size=2,
            num_embeds_ada_norm=1000, norm_num_groups=1).eval()
        self.shape = (1, 4, sample_size, sample_size)

    def forward(self, x, timestep, y):
        return self.m(x, timestep=timestep, class_labels=y, return_dict=False)[0]


class UNet(torch.nn.Module):
    """diffusers UNet2DModel (unconditional; the class label is ignored). lazy_cache caches its
    repeated sub-blocks (the attention/resnet ModuleLists of an up/down block)."""

    def __init__(self, sample_size=32):
        super().__init__()
        from diffusers import UNet2DModel

        torch.manual_seed(0)
        self.m = UNet2DModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 64, 64), norm_num_groups=8,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")).eval()
        self.shape = (1, 4, sample_size, sample_size)

    def forward(self, x, timestep, y):
        return self.m(x, timestep, return_dict=False)[0]


def build(size):
    return UNet() if size == "UNet" else DiT(*SIZES[size])


def sample(fn, shape, steps, seed, label):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    sched.set_timesteps(steps)
    lat = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    y, inputs = torch.tensor([label]), []
    with torch.no_grad():
        for t in sched.timesteps:
            tt = t.reshape(1).clone()
            inputs.append((lat, tt, y))
            out = fn(lat, tt, y)
            lat = sched.step(out[0] if isinstance(out, tuple) else out, t, lat).prev_sample
    return lat, inputs


def bench_one(size, steps, executor, repeats):
    model = build(size)
    shape = model.shape
    calibration = sample(model, shape, steps, 1, 3)[1] + sample(model, shape, steps, 2, 7)[1]
    example = calibration[0]
    t0 = time.perf_counter()
    full = hwopt.compile(model, example, passes=["fuse"], executor=executor, cache_dir=False,
                         progress=False)
    cached = hwopt.compile(model, example, passes=["fuse", "lazy_cache"],
                           calibration=calibration, executor=executor, cache_dir=False,
                           progress=False)
    compile_s = time.perf_counter() - t0
    rec = next(r for r in cached.compiled.pass_records if r.name == "lazy_cache")
    caches = step_caches(cached)
    runs = {"eager": model, "full": full, "cached": cached}
    times = {k: [] for k in runs}
    finals = {}
    for _ in range(repeats):
        for name, fn in runs.items():
            t = time.perf_counter()
            finals[name], _ = sample(fn, shape, steps, 5, 11)
            times[name].append(time.perf_counter() - t)
    for c in caches:
        c.stats.__init__()
    sample(cached, shape, steps, 5, 11)  # once more, to count skips over one run
    skipped = caches[0].stats.skipped_share if caches else 0.0
    med = Timings(times)  # one round per repeat: ratios paired round by round
    return {
        "size": size, "steps": steps, "eager_s": med["eager"], "full_s": med["full"],
        "cached_s": med["cached"], "ratio": med.ratio("cached", "full"),
        "ratio_eager": med.ratio("cached", "eager"), "skipped": skipped,
        "psnr": quality([finals["cached"]], [finals["eager"]], "psnr"),
        "psnr_full": quality([finals["full"]], [finals["eager"]], "psnr"),
        "applied": rec.modified, "compile_s": compile_s, "note": rec.reverted or rec.notes[-1],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="S,M,UNet", help="DiT sizes (S, M) and/or UNet")
    ap.add_argument("--steps", default="25,50")
    ap.add_argument("--executor", default="torch", choices=("torch", "tvm", "auto"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    import diffusers

    print(f"# lazy_cache: DiTTransformer2DModel (random init) + DDIMScheduler(eta=0), batch 1, "
          f"target cpu, executor={args.executor}, torch {torch.__version__}, diffusers "
          f"{diffusers.__version__}, 2 threads; shared machine: times are noisy, read ratios")
    print("| size | steps | eager s | full s | cached s | cached/full | cached/eager | skipped |"
          " PSNR cached dB | PSNR full dB | applied |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        for steps in (int(s) for s in args.steps.split(",")):
            r = bench_one(size, steps, args.executor, args.repeats)
            label = f"{size} {SIZES.get(size, '')}"
            print(f"| {label} | {steps} | {r['eager_s']:.3f} | {r['full_s']:.3f} | "
                  f"{r['cached_s']:.3f} | {r['ratio']:.2f} | {r['ratio_eager']:.2f} | "
                  f"{100 * r['skipped']:.0f}% | {r['psnr']:.1f} | {r['psnr_full']:.1f} | "
                  f"{r['applied']} |", flush=True)
            print(f"#   {size}/{steps}: {r['note']} (compile {r['compile_s']:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
