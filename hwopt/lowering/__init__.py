"""Lowering: rewritten ATen graph -> runnable module whose supported regions run TVM code.

The *lower* step of the pipeline (see hwopt.compiler). Unsupported ops stay in PyTorch (one warning
naming them); each supported region is built by `region.build_region`. A region that fails to
build or to match PyTorch falls back to PyTorch with a warning, or raises when ``strict=True``.
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch.fx as fx

from hwopt.errors import LoweringError
from hwopt.host_threads import single_torch_thread
from hwopt.lowering.partition import partition, unsupported_nodes
from hwopt.lowering.region import RegionInfo, build_region

log = logging.getLogger("hwopt")
_warned: set = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def _region_ops(sub: fx.GraphModule) -> str:
    ops = []
    for n in sub.graph.nodes:
        if n.op == "call_function":
            name = getattr(n.target, "__name__", str(n.target))
            if name not in ops:
                ops.append(name)
    return ", ".join(ops[:8]) + (" ..." if len(ops) > 8 else "")


class _InputRecorder(fx.Interpreter):
    """Runs the partitioned graph once, remembering the real inputs of each region."""

    def __init__(self, gm, names):
        super().__init__(gm)
        self.names, self.seen = set(names), {}

    def call_module(self, target, args, kwargs):
        if target in self.names:
            self.seen[target] = list(args)
        return super().call_module(target, args, kwargs)


def lower(gm: fx.GraphModule, inputs, opts, cache, db) -> tuple[torch.nn.Module, list[RegionInfo]]:
    target = opts.target
    if opts.executor == "torch":
        return gm, [RegionInfo("graph", "torch", "executor='torch'")]
    custom = getattr(target.lowering, "lower_graph", None)
    if custom is not None:  # a target that partitions the graph itself (fpga: int8 layers)
        return custom(gm, inputs, opts, cache, db)
    missing = unsupported_nodes(gm)
    if missing:
        if opts.strict:
            op, nodes = next(iter(missing.items()))
            raise LoweringError("no TVM lowering for this op (remove strict=True to run it in "
                                "PyTorch)", node=nodes[0], op=op, target=target.name)
        warn_once(f"hwopt: ops without a TVM lowering run in PyTorch: {', '.join(missing)}")
    # call_module nodes (control flow of split dynamic networks, cached blocks) stay in PyTorch
    if not missing and not any(n.op == "call_module" for n in gm.graph.nodes):
        module, info = _build_or_fallback("hwopt_region_0", gm, list(inputs), opts, cache, db)
        return module, [info]
    parent, names = partition(gm)
    with torch.no_grad():
        rec = _InputRecorder(parent, names)
        rec.run(*inputs)
    infos = []
    # PyTorch around TVM regions runs on one thread (hwopt.host_threads): each region's
    # PyTorch-vs-TVM timing is taken that way too, as it will run
    with single_torch_thread():
        for name in names:
            sub = getattr(parent, name)
            module, info = _build_or_fallback(name, sub, rec.seen[name], opts, cache, db)
            setattr(parent, name, module)
            infos.append(info)
        return parent, infos + _lower_nested(parent, opts, cache, db)


def _lower_nested(parent: fx.GraphModule, opts, cache, db) -> list[RegionInfo]:
    """Modules that keep their control flow in PyTorch but offer an inner graph to compile
    (hwopt.step_cache.LazyBlock): ``hwopt_inner() -> (attribute, GraphModule, inputs) | None``,
    inputs as seen by the run above; or a list of them (the branches of hwopt.dynamic.control)."""
    infos = []
    for name, mod in list(parent.named_modules()):
        spec = mod.hwopt_inner() if hasattr(mod, "hwopt_inner") else None
        if spec is None:
            continue
        for attr, sub, sub_inputs in (spec if isinstance(spec, list) else [spec]):
            module, sub_infos = lower(sub, sub_inputs, opts, cache, db)
            setattr(mod, attr, module)
            for info in sub_infos:  # dotted names, so hwopt.aot finds nested regions to save
                whole = not hasattr(module, info.name)  # the inner graph is one region itself
                info.name = f"{name}.{attr}" + ("" if whole else f".{info.name}")
            infos += sub_infos
    return infos


def _build_or_fallback(name, sub, inputs, opts, cache, db):
    try:
        return build_region(name, sub, inputs, opts, cache, db)
    except Exception as e:
        first_line = str(e).splitlines()[0] if str(e) else ""
        msg = (f"hwopt: region {name} ({_region_ops(sub)}) could not be compiled for target "
               f"{opts.target.name}: {type(e).__name__}: {first_line}")
        if opts.strict:
            if isinstance(e, LoweringError):
                raise
            raise LoweringError(msg, target=opts.target.name) from e
        warn_once(msg + "; running it in PyTorch")
        log.debug("hwopt: lowering failure", exc_info=True)
        return sub, RegionInfo(name, "torch", f"build failed: {type(e).__name__}: {e}"[:300])
