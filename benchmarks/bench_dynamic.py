"""Dynamic networks: compile success, hwopt vs eager vs Inductor, per control-flow path.

    .venv/bin/python benchmarks/bench_dynamic.py [--cases gated_mlp,moe_top1] [--small]

Cases come from hwopt.dynamic_zoo.CASES (a list other passes extend). Per case and path: whether
hwopt compiled it (hwopt.compile for cases torch.export captures, else torch.compile with
backend="hwopt"; a compile that falls back to PyTorch counts as a failure), how many static
variants were compiled for the case (shape buckets / exact shapes), the max relative
error against eager, and median latencies of eager, Inductor and hwopt measured round-robin in
the same run (hwopt.bench.interleaved), with their ratios, and the geometric mean of the ratios
over all paths. Exits non-zero only on a crash.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import warnings

from hwopt.bench import environment, interleaved, pin_threads, rel_error, table

pin_threads(2)

import torch  # noqa: E402

import hwopt  # noqa: E402
from hwopt import dynamic_zoo  # noqa: E402


def _marked(case, args):
    """Inputs with Dynamo's dynamic-dimension marks of the case (torch.compile cases)."""
    for i, (dim, lo, hi) in case.extra.get("mark_dynamic", {}).items():
        torch._dynamo.mark_dynamic(args[i], dim, min=lo, max=hi)
    return args


class _Count:
    """Counts static compiles of the torch.compile backend (one per shape bucket or shape)."""

    def __init__(self):
        import hwopt.backend as backend

        self.n, self.backend, self.real = 0, backend, backend._compile_static

    def __enter__(self):
        def counted(*a, **k):
            self.n += 1
            return self.real(*a, **k)

        self.backend._compile_static = counted
        return self

    def __exit__(self, *exc):
        self.backend._compile_static = self.real


def _compile(case, model, inputs, cache_dir):
    """(callable, how, fell back?, number of static compiles)"""
    with warnings.catch_warnings(record=True) as caught, _Count() as count:
        warnings.simplefilter("always")
        if case.aot:
            fn = hwopt.compile(model, inputs, cache_dir=cache_dir, progress=False,
                               **case.extra.get("options", {}))
            how = "hwopt.compile"
        else:
            torch._dynamo.reset()
            fn = torch.compile(model, backend="hwopt", options={"cache_dir": cache_dir,
                                                                "progress": False})
            how = "torch.compile"
        with torch.no_grad():
            for args in case.variants(inputs).values():
                fn(*_marked(case, args))
    fell_back = [str(w.message) for w in caught if "running it in PyTorch" in str(w.message)
                 or "could not compile" in str(w.message) or "run in PyTorch" in str(w.message)]
    compiles = getattr(fn, "compiles", None) if case.aot else count.n
    return fn, how, fell_back, compiles


def run(case, small: bool, cache_dir: str) -> list[dict]:
    model, inputs = case.make(small)
    try:
        fast, how, fell_back, compiles = _compile(case, model, inputs, cache_dir)
    except Exception as e:  # a failure to compile is a row, not a crash
        return [{"case": case.name, "kind": case.kind, "compiled": f"no: {type(e).__name__}"}]
    torch._dynamo.reset()
    inductor = torch.compile(model)
    rows = []
    for path, args in case.variants(inputs).items():
        with torch.no_grad():
            ref = model(*args)
            row = {"case": case.name, "kind": case.kind, "path": path, "via": how,
                   "compiled": "no (fallback)" if fell_back else "yes", "compiles": compiles,
                   "hwopt rel err": rel_error(fast(*_marked(case, args)), ref)}
            try:  # Inductor itself may fail on a dynamic model: a row value, not a crash
                row["inductor rel err"] = rel_error(inductor(*args), ref)
                fns = {"inductor": lambda a=args: inductor(*a)}
            except Exception as e:  # noqa: BLE001
                row["inductor rel err"] = f"failed: {type(e).__name__}"
                fns = {}
        fns.update({"eager": lambda a=args: model(*a), "hwopt": lambda a=args: fast(*a)})
        med = interleaved(fns, rounds=8, budget_s=10)
        row.update({f"{k} ms": v * 1e3 for k, v in med.items()})
        row["hwopt/eager"] = med.ratio("hwopt", "eager")
        if "inductor" in med:
            row["hwopt/inductor"] = med.ratio("hwopt", "inductor")
        rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="")
    p.add_argument("--small", action="store_true", help="reduced sizes (quick check)")
    a = p.parse_args()
    print(environment(), flush=True)
    rows, ok, total = [], 0, 0
    with tempfile.TemporaryDirectory() as cache_dir:
        for case in dynamic_zoo.cases(a.cases):
            print(f"... {case.name}", file=sys.stderr, flush=True)
            case_rows = run(case, a.small, cache_dir)
            total += 1
            ok += all(r.get("compiled") == "yes" for r in case_rows)
            rows += case_rows
    cols = ["case", "kind", "path", "via", "compiled", "compiles", "eager ms", "inductor ms",
            "hwopt ms", "hwopt/eager", "hwopt/inductor", "hwopt rel err", "inductor rel err"]
    print(table(rows, cols))
    print(f"\ncompile success: {ok}/{total} cases ({100 * ok / max(total, 1):.0f}%)")
    for key, mark in (("hwopt/eager", 0.5), ("hwopt/inductor", 1.0)):  # goal; faster
        vals = [r[key] for r in rows if isinstance(r.get(key), float) and r[key] > 0]
        if vals:
            geo = math.exp(sum(math.log(v) for v in vals) / len(vals))
            print(f"{key}: geometric mean {geo:.2f} over {len(vals)} paths, "
                  f"{sum(v <= mark for v in vals)} at <= {mark}, worst {max(vals):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
