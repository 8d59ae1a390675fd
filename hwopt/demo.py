"""The main job: compile real models for the default target and print the speedups.

    python -m hwopt.demo [--models cnn,mobilenet,bert,vit,gpt2] [--small]

Each model is built from code or a `transformers` config (no weight download), compiled with
``torch.compile(model, backend="hwopt")`` for this CPU, checked against eager PyTorch, and timed
against it (interleaved, medians). For Inductor comparisons run benchmarks/bench_models.py.
"""
from __future__ import annotations

import argparse
import sys
import time

from hwopt.bench import environment, interleaved, pin_threads, rel_error, table

pin_threads(2)

import torch  # noqa: E402

from hwopt import zoo  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Compile the model zoo with hwopt; print speedups.")
    p.add_argument("--models", default=",".join(zoo.MODELS))
    p.add_argument("--small", action="store_true", help="reduced model sizes")
    a = p.parse_args(argv)
    print(environment(), flush=True)
    rows = []
    for name in a.models.split(","):
        model, args = zoo.MODELS[name](small=a.small)
        torch._dynamo.reset()
        t = time.perf_counter()
        fast = torch.compile(model, backend="hwopt")
        with torch.no_grad():
            out, ref = fast(*args), model(*args)
        compile_s = time.perf_counter() - t
        med = interleaved({"eager": lambda m=model, a=args: m(*a),
                           "hwopt": lambda f=fast, a=args: f(*a)}, rounds=20)
        rows.append({"model": name, "input": "x".join(map(str, args[0].shape)),
                     "compile s": compile_s, "eager ms": med["eager"] * 1e3,
                     "hwopt ms": med["hwopt"] * 1e3, "speedup": med.ratio("eager", "hwopt"),
                     "max rel err": rel_error(out, ref)})
        print(f"{name}: {rows[-1]['speedup']:.2f}x faster than eager", flush=True)
    print(table(rows, ["model", "input", "compile s", "eager ms", "hwopt ms", "speedup",
                       "max rel err"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
