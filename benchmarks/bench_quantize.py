"""Quantization: accuracy and latency of hwopt int8 vs hwopt fp32 vs Inductor fp32, one run.

    .venv/bin/python benchmarks/bench_quantize.py [--models digits,cnn,bert,vit] [--small]

digits: a small CNN trained here on sklearn's ``load_digits`` (8x8 images, a few seconds), then
compiled by hwopt fp32 (passes fuse) and int8 (fuse + quantize, calibrated on 4 training
batches) and by Inductor; test-set accuracy of each, latency on one batch of 60.
cnn / bert / vit (hwopt.zoo, full size unless --small): latency of the same three, and the SQNR of
each output against eager fp32 on fresh inputs (calibration: 4 random batches).

Latencies are medians measured round-robin in blocks (hwopt.bench.interleaved, which lets each
runtime's spinning threads settle before a block) after warm-up; the hwopt artifacts run their TVM
code (executor="tvm"). OpenMP is left at its defaults: OMP_WAIT_POLICY=PASSIVE made eager and
Inductor about 2x slower here.
Goals (issue 4): accuracy drop <= 1 point, int8 <= 0.4x hwopt fp32 and below Inductor fp32,
SQNR >= 20 dB. Exits non-zero only on a crash.
"""
from __future__ import annotations

import argparse
import sys
import time

from hwopt.bench import environment, first_tensor, interleaved, pin_threads, table

pin_threads(2)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import hwopt  # noqa: E402
from hwopt import zoo  # noqa: E402
from hwopt.quant import sqnr  # noqa: E402

BATCH = 60


def digits_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def digits_data():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    return (x[:1437], y[:1437]), (x[1437:], y[1437:])  # 360 test images = 6 batches of 60


def train(model: nn.Module, x, y, epochs: int = 10) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for i in range(0, len(y), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    return model.eval()


def accuracy(fn, x, y) -> float:
    hits = 0
    with torch.no_grad():
        for i in range(0, len(y), BATCH):
            hits += int((first_tensor(fn(x[i:i + BATCH])).argmax(1) == y[i:i + BATCH]).sum())
    return 100.0 * hits / len(y)


def compile_three(model, example, calib):
    kw = dict(target="cpu", executor="tvm", cache_dir=False, progress=False)
    t = time.perf_counter()
    fp32 = hwopt.compile(model, example, passes=["fuse"], **kw)
    t_fp32 = time.perf_counter() - t
    t = time.perf_counter()
    int8 = hwopt.compile(model, example, passes=["fuse", "quantize"], calibration=calib, **kw)
    t_int8 = time.perf_counter() - t
    torch._dynamo.reset()
    inductor = torch.compile(model)
    with torch.no_grad():
        inductor(*example)
    regions = int8.compiled.regions
    quant = [n for n in int8.compiled.graph.graph.nodes if "hwopt_quant" in n.meta]
    row = {"compile s fp32/int8": f"{t_fp32:.0f}/{t_int8:.0f}",
           "int8 layers": f"{sum(n.meta['hwopt_quant']['dtype'] == 'int8' for n in quant)}"
                          f"/{len(quant)}",
           "int8 regions": ",".join(r.executor for r in regions)}
    return fp32, int8, inductor, row


def timings(model, fp32, int8, inductor, args) -> dict:
    fns = {"eager": lambda: model(*args), "inductor": lambda: inductor(*args),
           "hwopt fp32": lambda: fp32(*args), "hwopt int8": lambda: int8(*args)}
    med = interleaved(fns, rounds=12)
    row = {f"{k} ms": v * 1e3 for k, v in med.items()}
    row["int8/fp32"] = med.ratio("hwopt int8", "hwopt fp32")
    row["int8/inductor"] = med.ratio("hwopt int8", "inductor")
    return row


def run_digits() -> dict:
    (xtr, ytr), (xte, yte) = digits_data()
    t = time.perf_counter()
    model = train(digits_model(), xtr, ytr)
    row = {"model": "digits CNN", "input": f"{BATCH}x1x8x8",
           "train s": time.perf_counter() - t}
    calib = [(xtr[i:i + BATCH],) for i in range(0, 4 * BATCH, BATCH)]
    example = (xte[:BATCH],)
    fp32, int8, inductor, info = compile_three(model, example, calib)
    row.update(info)
    row["acc eager"] = accuracy(model, xte, yte)
    row["acc fp32"] = accuracy(fp32, xte, yte)
    row["acc int8"] = accuracy(int8, xte, yte)
    row["acc inductor"] = accuracy(inductor, xte, yte)
    with torch.no_grad():
        row["SQNR int8 dB"] = sqnr(model(*example), first_tensor(int8(*example)))
    row.update(timings(model, fp32, int8, inductor, example))
    return row


def run_zoo(name: str, small: bool) -> dict:
    model, args = zoo.MODELS[name](small=small)
    g = torch.Generator().manual_seed(1)

    def fresh():
        x = args[0]
        if x.is_floating_point():
            return (torch.randn(x.shape, generator=g),)
        return (torch.randint(0, 30522, x.shape, generator=g),)

    calib = [fresh() for _ in range(4)]
    row = {"model": name, "input": "x".join(map(str, args[0].shape))}
    fp32, int8, inductor, info = compile_three(model, args, calib)
    row.update(info)
    with torch.no_grad():
        tests = [args] + [fresh() for _ in range(2)]
        refs = [first_tensor(model(*b)) for b in tests]
        row["SQNR int8 dB"] = min(sqnr(r, first_tensor(int8(*b))) for r, b in zip(refs, tests))
        row["SQNR fp32 dB"] = min(sqnr(r, first_tensor(fp32(*b))) for r, b in zip(refs, tests))
    row.update(timings(model, fp32, int8, inductor, args))
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="digits,cnn,bert,vit")
    p.add_argument("--small", action="store_true", help="reduced zoo sizes (quick check)")
    a = p.parse_args()
    print(environment(), flush=True)
    rows = []
    for name in a.models.split(","):
        print(f"... {name}", file=sys.stderr, flush=True)
        rows.append(run_digits() if name == "digits" else run_zoo(name, a.small))
    cols = ["model", "input", "acc eager", "acc fp32", "acc int8", "acc inductor",
            "SQNR int8 dB", "SQNR fp32 dB", "eager ms", "inductor ms", "hwopt fp32 ms",
            "hwopt int8 ms", "int8/fp32", "int8/inductor", "int8 layers", "int8 regions",
            "compile s fp32/int8", "train s"]
    print(table(rows, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
