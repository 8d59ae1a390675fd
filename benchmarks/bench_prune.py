"""Pruning: accuracy and latency of hwopt pruned vs hwopt dense vs eager vs Inductor, one run.

    .venv/bin/python benchmarks/bench_prune.py [--parts digits,cnn,bert] [--small]

digits: a CNN (five 3x3 conv layers, 32-256 channels) trained here for 10 epochs on sklearn's
``load_digits`` upsampled to 32x32 (about 80 s), compiled by hwopt dense (passes fuse) and pruned
(fuse + prune, calibrated on 10 training batches, no retraining: masks from the weights, kept
weights refitted by least squares), and by Inductor: test accuracy of each and latency on one
batch of 60. The same trained model gives both figures, so the accuracy drop and the speedup are
of one pruned model.
cnn: a wider CNN at 112x112 (random weights, BatchNorm folded) pruned with kernel patterns +
connectivity and block-punched at several sparsity targets: latency pruned/dense (the
sparsity-vs-speedup curve) and output SQNR against eager.
bert: the linear layers of a BERT-base FFN block (``transformers.BertConfig()``: 768 -> 3072 ->
768, GELU, residual, LayerNorm; 128 tokens; random weights) with N:M 2:4 per row (``share=1``),
N:M (2:4, 4:8, 1:4) shared by blocks of rows as wide as the vector (the default),
block-structured and block-punched sparsity.

Masks are shared by blocks of filters as wide as the target's vector (``PruneConfig.share``, 16
here) unless a row says ``share 1`` (one mask per filter: per-kernel patterns, gather kernel).

Latencies are medians measured round-robin in blocks (hwopt.bench.interleaved) after warm-up,
OMP_WAIT_POLICY=PASSIVE; hwopt artifacts run their TVM code (executor="tvm"). The pruned compiles
pass ``tolerance=1.0`` so that the pass's output-error bound (0.3 relative error by default) does
not undo pruning of random-weight nets, whose logits mean nothing; accuracy is judged on digits.
Goals (issue 5): <= 0.5x dense latency with <= 1 point accuracy drop; 2:4 linear faster than
dense. Exits non-zero only on a crash.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from hwopt.bench import environment, first_tensor, interleaved, pin_threads, table

pin_threads(2)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import hwopt  # noqa: E402
from hwopt.quant import sqnr  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import torch.nn.functional as F  # noqa: E402
from bench_quantize import accuracy, digits_data  # noqa: E402

BATCH = 60
KW = dict(target="cpu", executor="tvm", cache_dir=False, progress=False)


def compile_pair(model, example, calib, prune_cfg: dict):
    t = time.perf_counter()
    dense = hwopt.compile(model, example, passes=["fuse"], **KW)
    t_dense = time.perf_counter() - t
    t = time.perf_counter()
    pruned = hwopt.compile(model, example, passes=["fuse", "prune"], calibration=calib,
                           tolerance=1.0, pass_config={"prune": prune_cfg}, **KW)
    return dense, pruned, t_dense, time.perf_counter() - t


def sparse_summary(art) -> dict:
    nodes = [n for n in art.compiled.graph.graph.nodes if "hwopt_prune" in n.meta]
    rec = next((r for r in art.compiled.pass_records if r.name == "prune"), None)
    ran = "+".join(r.executor for r in art.compiled.regions)
    kernels = sum(k[0].startswith("sparse_") for r in art.compiled.regions
                  for k in r.kernels.values())
    undone = getattr(rec, "reverted", None)
    return {"sparse layers": len(nodes), "sparse kernels": kernels, "regions": ran,
            "density": "/".join(f"{n.meta['hwopt_prune']['density']:.2f}" for n in nodes),
            "undone": undone or ""}


def digits32_model() -> nn.Module:
    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(*block(1, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 128),
                         *block(128, 128), nn.MaxPool2d(2), *block(128, 256),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10))


def train32(model: nn.Module, x, y, epochs: int = 10) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def run_digits(schemes) -> list[dict]:
    (xtr, ytr), (xte, yte) = digits_data()
    xtr, xte = (F.interpolate(x, size=32, mode="bilinear", align_corners=False)
                for x in (xtr, xte))
    t = time.perf_counter()
    model = train32(digits32_model(), xtr, ytr)
    train_s = time.perf_counter() - t
    calib = [(xtr[i:i + BATCH],) for i in range(0, 10 * BATCH, BATCH)]
    example = (xte[:BATCH],)
    torch._dynamo.reset()
    inductor = torch.compile(model)
    rows = []
    for cfg in schemes:
        dense, pruned, td, tp = compile_pair(model, example, calib, cfg)
        med = interleaved({"eager": lambda: model(*example),
                           "inductor": lambda: inductor(*example),
                           "dense": lambda d=dense: d(*example),
                           "pruned": lambda p=pruned: p(*example)})
        rows.append({"model": "digits CNN 32x32", "prune": _label(cfg), **sparse_summary(pruned),
                     "acc eager": accuracy(model, xte, yte), "acc dense": accuracy(dense, xte, yte),
                     "acc pruned": accuracy(pruned, xte, yte),
                     **{f"{k} ms": v * 1e3 for k, v in med.items()},
                     "pruned/dense": med.ratio("pruned", "dense"),
                     "pruned/inductor": med.ratio("pruned", "inductor"),
                     "compile s": f"{td:.0f}/{tp:.0f}", "train s": train_s})
    return rows


class WideCNN(nn.Module):
    def __init__(self):
        super().__init__()

        def block(i, o):
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        self.body = nn.Sequential(*block(3, 32), *block(32, 64), nn.MaxPool2d(2),
                                  *block(64, 128), *block(128, 128), nn.MaxPool2d(2),
                                  *block(128, 256), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(256, 10))

    def forward(self, x):
        return self.body(x)


class BertFFN(nn.Module):
    def __init__(self, small: bool):
        super().__init__()
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertIntermediate, BertOutput

        cfg = BertConfig(hidden_size=256, intermediate_size=1024) if small else BertConfig()
        self.inter, self.out = BertIntermediate(cfg), BertOutput(cfg)

    def forward(self, x):
        return self.out(self.inter(x), x)


def curve(name: str, model, args, calib, schemes) -> list[dict]:
    torch._dynamo.reset()
    inductor = torch.compile(model)
    with torch.no_grad():
        inductor(*args)
        want = model(*args)
    dense = hwopt.compile(model, args, passes=["fuse"], **KW)
    rows = []
    for cfg in schemes:
        t = time.perf_counter()
        pruned = hwopt.compile(model, args, passes=["fuse", "prune"], calibration=calib,
                               tolerance=1.0, pass_config={"prune": cfg}, **KW)
        tp = time.perf_counter() - t
        med = interleaved({"eager": lambda: model(*args), "inductor": lambda: inductor(*args),
                           "dense": lambda: dense(*args), "pruned": lambda p=pruned: p(*args)})
        with torch.no_grad():
            db = sqnr(want, first_tensor(pruned(*args)))
        rows.append({"model": name, "prune": _label(cfg), **sparse_summary(pruned),
                     "SQNR dB": db, **{f"{k} ms": v * 1e3 for k, v in med.items()},
                     "pruned/dense": med.ratio("pruned", "dense"),
                     "pruned/inductor": med.ratio("pruned", "inductor"),
                     "compile s": f"{tp:.0f}"})
        print(table(rows[-1:], list(rows[-1])), flush=True)
    return rows


def _label(cfg: dict) -> str:
    parts = [cfg.get("scheme", "pattern")]
    if cfg.get("scheme") == "nm":
        parts.append("%d:%d" % tuple(cfg.get("nm", (2, 4))))
        if cfg.get("nm_rows", 1) > 1:
            parts.append(f"rows {cfg['nm_rows']}")
    if "share" in cfg:
        parts.append(f"share {cfg['share']}")
    for k in ("sparsity", "latency"):
        if k in cfg:
            parts.append(f"{k} {cfg[k]}")
    return " ".join(parts)


def run_cnn(small: bool) -> list[dict]:
    torch.manual_seed(0)
    model = WideCNN().eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, as in a trained net
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    size = 56 if small else 112
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(1, 3, size, size, generator=g),)
    calib = [(torch.randn(1, 3, size, size, generator=g),) for _ in range(4)]
    schemes = [{"scheme": "pattern", "sparsity": s} for s in (0.56, 0.67, 0.78, 0.85)]
    schemes += [{"scheme": "block_punched", "sparsity": s} for s in (0.5, 0.75)]
    schemes += [{"scheme": "pattern", "latency": 0.5}]
    return curve(f"wide CNN {size}x{size}", model, args, calib, schemes)


def run_bert(small: bool) -> list[dict]:
    torch.manual_seed(0)
    model = BertFFN(small).eval()
    h = model.inter.dense.in_features
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(1, 128, h, generator=g),)
    calib = [(torch.randn(1, 128, h, generator=g),) for _ in range(4)]
    # per-row 2:4 (share 1): the cost model predicts no gain (gather kernel); measured anyway
    schemes = [{"scheme": "nm", "nm": (2, 4), "share": 1, "use_cost_model": False}]
    # default: N:M shared by blocks of rows as wide as the vector (filter-vectorized kernel)
    schemes += [{"scheme": "nm", "nm": nm} for nm in ((2, 4), (4, 8), (1, 4))]
    schemes += [{"scheme": "block", "sparsity": s} for s in (0.5, 0.75)]
    schemes += [{"scheme": "block_punched", "sparsity": s} for s in (0.5, 0.75)]
    return curve(f"BERT FFN {h}-{4 * h} x128", model, args, calib, schemes)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="digits,cnn,bert")
    ap.add_argument("--small", action="store_true")
    a = ap.parse_args()
    print(environment())
    rows = []
    parts = a.parts.split(",")
    if "digits" in parts:
        rows += run_digits([{"scheme": "pattern", "sparsity": 0.6},
                            {"scheme": "pattern", "sparsity": 0.7},
                            {"scheme": "pattern", "latency": 0.5},
                            {"scheme": "block_punched", "sparsity": 0.7},
                            {"scheme": "pattern", "sparsity": 0.7, "share": 1}])
        print(table(rows, list(rows[0])), flush=True)
    if "cnn" in parts:
        rows += run_cnn(a.small)
    if "bert" in parts:
        rows += run_bert(a.small)
    cols = ["model", "prune", "sparse layers", "sparse kernels", "density", "acc dense",
            "acc pruned", "SQNR dB", "eager ms", "inductor ms", "dense ms", "pruned ms",
            "pruned/dense", "pruned/inductor", "compile s", "train s", "undone"]
    print()
    print(table(rows, [c for c in cols if any(c in r for r in rows)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
