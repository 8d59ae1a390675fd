"""The ``hwopt`` command: ``hwopt targets``, ``hwopt compile MODULE:FACTORY ...``, ``hwopt bench``,
``hwopt report MODULE:FACTORY ... -o report.html``. Wherever MODULE:FACTORY is accepted, a
``model.onnx`` file is too (input shapes from the model, or from ``--input``).

Exit codes: 0 success, 1 compile/runtime error, 2 bad usage or options.
"""
from __future__ import annotations

import argparse
import importlib
import sys

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _load_factory(spec: str):
    if ":" not in spec:
        raise SystemExit(f"hwopt: expected MODULE:FACTORY (e.g. hwopt.zoo:cnn) or a .onnx file, "
                         f"got {spec!r}")
    mod, name = spec.split(":", 1)
    sys.path.insert(0, ".")
    return getattr(importlib.import_module(mod), name)


def _load(spec: str, shapes):
    """(model, example inputs) from MODULE:FACTORY or an .onnx file (converted by hwopt)."""
    if spec.endswith(".onnx"):
        from hwopt.onnx_import import example_inputs, to_graph_module

        dims = [tuple(int(d) for d in s.split("x")) for s in shapes] if shapes else None
        return to_graph_module(spec, example_inputs(spec, dims))
    return _inputs(_load_factory(spec)(), shapes)


def _inputs(model_and_maybe_inputs, shapes):
    import torch

    if isinstance(model_and_maybe_inputs, tuple):
        model, args = model_and_maybe_inputs
    else:
        model, args = model_and_maybe_inputs, None
    if shapes:
        args = tuple(torch.randn(*[int(d) for d in s.split("x")]) for s in shapes)
    if args is None:
        raise SystemExit("hwopt: the factory returned only a model: give --input, e.g. "
                         "--input 1x3x224x224")
    return model.eval(), args


def cmd_targets(_a) -> int:
    from hwopt.target import list_targets

    for name, t in sorted(list_targets().items()):
        d = t.spec.describe()
        print(f"{name:8s} {t.description}; runs here: {'yes' if t.runs_here() else 'no'}")
        print(f"         peak {', '.join(f'{k} {v}' for k, v in d['peak'].items())}; DRAM "
              f"{d['dram_bw']}; on-chip {d['on_chip']}; {d['cores']} cores; dtypes "
              f"{', '.join(d['dtypes'])}; sparsity {', '.join(d['sparsity']) or 'none'}")
        if d["memory"]:
            print(f"         memory {' | '.join(d['memory'])}")
    return EXIT_OK


def _compile(a, **extra):
    import hwopt

    model, args = _load(a.factory, a.input)
    options = {"target": a.target, "tune": a.tune, "progress": not a.quiet, **extra}
    if a.passes:
        options["passes"] = a.passes.split(",")
    from hwopt.target import get_target

    names = options.get("passes") or get_target(a.target).default_passes
    if any(p in ("quantize", "prune") for p in names):
        # The example inputs (random, or from the ONNX model); real data goes through the API.
        options["calibration"] = [args]
    return hwopt.compile(model, args, **options)


def cmd_compile(a) -> int:
    art = _compile(a, **({"report": a.report} if a.report else {}))
    out = art.save(a.output)
    print(art.report())
    print(f"wrote {out}")
    return EXIT_OK


def cmd_report(a) -> int:
    art = _compile(a, report=a.output)
    print(art.report())
    print(f"wrote {a.output}")
    return EXIT_OK


def _model_args(c) -> None:
    c.add_argument("factory", help="MODULE:FACTORY returning a model or (model, inputs), or a "
                   "model.onnx file")
    c.add_argument("--input", action="append", help="input shape like 1x3x224x224 (repeatable)")
    c.add_argument("--target", default="cpu", help="cpu, arm64, cuda, fpga (see: hwopt targets)")
    c.add_argument("--passes", help="comma-separated pass names (default: the target's)")
    c.add_argument("--tune", default="none", choices=["none", "measure"],
                   help="measure tile candidates per kernel (slower compile, faster code)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def cmd_bench(a) -> int:
    import torch

    from hwopt.bench import interleaved, pin_threads, rel_error, table

    pin_threads(2)
    model, args = _load(a.factory, a.input)
    with torch.no_grad():
        ref = model(*args)
        ind = torch.compile(model)
        ind(*args)
        torch._dynamo.reset()
        fast = torch.compile(model, backend="hwopt", options={"target": a.target})
        err = rel_error(fast(*args), ref)
    med = interleaved({"eager": lambda: model(*args), "inductor": lambda: ind(*args),
                       "hwopt": lambda: fast(*args)})
    row = {f"{k} ms": v * 1e3 for k, v in med.items()}
    row.update({"hwopt/eager": med.ratio("hwopt", "eager"),
                "hwopt/inductor": med.ratio("hwopt", "inductor"), "rel err": err})
    print(table([row], list(row)))
    return EXIT_OK


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hwopt", description="Hardware-aware PyTorch compiler.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("targets", help="list targets and their specs").set_defaults(fn=cmd_targets)
    c = sub.add_parser("compile", help="compile MODULE:FACTORY (or model.onnx) ahead of time "
                       "and save it")
    _model_args(c)
    c.add_argument("-o", "--output", default="hwopt-out", help="folder for the artifact")
    c.add_argument("--report", help="also write an HTML report to this path")
    c.set_defaults(fn=cmd_compile)
    r = sub.add_parser("report", help="compile MODULE:FACTORY and write an HTML report")
    _model_args(r)
    r.add_argument("-o", "--output", default="hwopt-report.html", help="HTML file to write")
    r.set_defaults(fn=cmd_report)
    b = sub.add_parser("bench", help="eager vs Inductor vs hwopt, measured in one run")
    b.add_argument("factory", help="MODULE:FACTORY or model.onnx")
    b.add_argument("--input", action="append")
    b.add_argument("--target", default="cpu")
    b.set_defaults(fn=cmd_bench)
    a = p.parse_args(argv)
    from hwopt.errors import HwoptError, OptionError

    try:
        return a.fn(a)
    except OptionError as e:
        print(f"hwopt: {e}", file=sys.stderr)
        return EXIT_USAGE
    except HwoptError as e:
        print(f"hwopt: {e}", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
