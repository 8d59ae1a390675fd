"""Model-zoo latency: eager vs Inductor vs hwopt (backend="hwopt"), measured in one run.

    .venv/bin/python benchmarks/bench_models.py [--models cnn,bert] [--small] [--tune measure]

Prints per model: median latencies measured round-robin in blocks of 5 calls (A×5 B×5 C×5 ...,
the first call of each block not counted), their ratios (medians of the per-round ratios: the
machine's speed drifts, a round pairs what it compares), the ratios under strict per-call
alternation ("alt:", where switching between PyTorch's and TVM's thread pools costs extra), the
max relative error against eager, first-compile times (cold cache), a cache-hit compile time,
a cache hit in a new process (the whole first call, Dynamo's trace included, and the part spent
in hwopt's backend) and RSS growth. Exits non-zero only on a crash, never on a slow figure.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

from hwopt.bench import environment, interleaved, pin_threads, rel_error, rss_mb, table

pin_threads(2)

import torch  # noqa: E402

from hwopt import zoo  # noqa: E402

# A cache hit in a new process: the first torch.compile call in full (Dynamo's trace included,
# the same for every backend) and the part spent in hwopt's backend.
_NEW_PROCESS = """
import functools, json, sys, time
import torch
from hwopt import zoo
from hwopt.backend import hwopt_backend
name, small, tune, cache_dir = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4]
model, args = zoo.MODELS[name](small=small)
spent = []
def timed(gm, inputs):
    t = time.perf_counter()
    out = hwopt_backend(gm, inputs, options={"cache_dir": cache_dir, "tune": tune})
    spent.append(time.perf_counter() - t)
    return out
t = time.perf_counter()
with torch.no_grad():
    torch.compile(model, backend=timed)(*args)
print(json.dumps({"call": time.perf_counter() - t, "hwopt": sum(spent),
                  "tvm_imported": "tvm" in sys.modules}))
"""


def new_process_hit(name: str, small: bool, tune: str, cache_dir: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _NEW_PROCESS, name, "1" if small else "0", tune,
                          cache_dir], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(name: str, small: bool, tune: str, cache_dir: str) -> dict:
    model, args = zoo.MODELS[name](small=small)
    row = {"model": name, "input": "x".join(map(str, args[0].shape))}
    with torch.no_grad():
        ref = model(*args)
        torch._dynamo.reset()
        t = time.perf_counter()
        inductor = torch.compile(model)
        inductor(*args)
        row["inductor compile s"] = time.perf_counter() - t
        rss0 = rss_mb()
        torch._dynamo.reset()
        t = time.perf_counter()
        fast = torch.compile(model, backend="hwopt",
                             options={"cache_dir": cache_dir, "tune": tune, "progress": False})
        out = fast(*args)
        row["hwopt compile s"] = time.perf_counter() - t
        row["hwopt rss +MB"] = rss_mb() - rss0
        torch._dynamo.reset()
        t = time.perf_counter()
        again = torch.compile(model, backend="hwopt", options={"cache_dir": cache_dir,
                                                               "tune": tune})
        again(*args)
        row["hwopt cached compile s"] = time.perf_counter() - t
        hit = new_process_hit(name, small, tune, cache_dir)
        row["new process: first call s"] = hit["call"]
        row["new process: hwopt s"] = hit["hwopt"]
        row["hwopt rel err"] = rel_error(out, ref)
        row["inductor rel err"] = rel_error(inductor(*args), ref)
        fns = {"eager": lambda: model(*args), "inductor": lambda: inductor(*args),
               "hwopt": lambda: again(*args)}
        med = interleaved(fns, rounds=20)
        alt = interleaved(fns, rounds=20, block=1)
    row.update({f"{k} ms": v * 1e3 for k, v in med.items()})
    row["hwopt/eager"] = med.ratio("hwopt", "eager")
    row["hwopt/inductor"] = med.ratio("hwopt", "inductor")
    row["alt: hwopt/eager"] = alt.ratio("hwopt", "eager")
    row["alt: hwopt/inductor"] = alt.ratio("hwopt", "inductor")
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(zoo.MODELS))
    p.add_argument("--small", action="store_true", help="reduced sizes (quick check)")
    p.add_argument("--tune", default="none", choices=["none", "measure"])
    a = p.parse_args()
    print(environment(), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as cache_dir:
        for name in a.models.split(","):
            print(f"... {name}", file=sys.stderr, flush=True)
            rows.append(run(name, a.small, a.tune, cache_dir))
    cols = ["model", "input", "eager ms", "inductor ms", "hwopt ms", "hwopt/eager",
            "hwopt/inductor", "alt: hwopt/eager", "alt: hwopt/inductor", "hwopt rel err",
            "inductor compile s", "hwopt compile s", "hwopt cached compile s",
            "new process: first call s", "new process: hwopt s", "hwopt rss +MB"]
    print(table(rows, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
