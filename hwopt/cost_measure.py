"""Measure what a subgraph costs once hwopt compiles it: the ground truth of the cost models.

Used by calibration (``hwopt.cost_calibrate``), the learned refinement (``hwopt.cost_learned``)
and ``benchmarks/bench_cost_model.py``. A subgraph (a set of nodes of an ATen graph, or a small
module) is cut out as its own GraphModule, lowered exactly as a region is (``to_relax`` ->
the target's ``prepare`` / ``schedule`` / ``build``), checked against PyTorch, and timed with TVM's
``time_evaluator`` on the Relax VM (median of repeats; Python dispatch is not included).
"""
from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx

log = logging.getLogger("hwopt")


def extract(gm: fx.GraphModule, nodes: list) -> tuple[fx.GraphModule, tuple]:
    """`nodes` (call_function nodes of `gm`, program order) as a GraphModule + random inputs.

    Values from outside become placeholders (random tensors of their shape), constants are
    copied in; every value used outside `nodes` becomes an output.
    """
    inside = set(nodes)
    graph, env, root, inputs = fx.Graph(), {}, torch.nn.Module(), []

    def bring(a: fx.Node) -> fx.Node:
        if a in env:
            return env[a]
        if a.op == "get_attr":
            name = f"c{len(env)}"
            root.register_buffer(name, _attr(gm, a.target).detach().clone())
            new = graph.get_attr(name)
        else:
            new = graph.placeholder(f"x{len(inputs)}")
            inputs.append(random_like(a.meta["val"]))
        new.meta = dict(a.meta)
        env[a] = new
        return new

    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside:
                bring(a)
        env[n] = graph.node_copy(n, lambda a: env[a])
    outs = [n for n in nodes if any(u not in inside for u in n.users)] or [nodes[-1]]
    graph.output(tuple(env[o] for o in outs))
    sub = fx.GraphModule(root, graph)
    sub.graph.eliminate_dead_code()
    sub.recompile()
    return sub, tuple(inputs)


def _attr(gm, target: str):
    obj = gm
    for part in str(target).split("."):
        obj = getattr(obj, part)
    return obj


def random_like(val) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    shape = tuple(int(s) for s in val.shape)
    if val.dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(val.dtype)
    if val.dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    return torch.zeros(shape, dtype=val.dtype)  # indices: always in range


def signature(gm: fx.GraphModule, inputs) -> str:
    """Key of a subgraph's shape and structure (not its node names or weight values)."""
    index, parts = {}, []
    for i, n in enumerate(gm.graph.nodes):
        index[n] = i
        args = fx.node.map_arg((n.args, n.kwargs), lambda a: f"%{index[a]}")
        val = n.meta.get("val")
        meta = (tuple(val.shape), str(val.dtype)) if isinstance(val, torch.Tensor) else None
        if n.op == "get_attr":
            t = _attr(gm, n.target)
            meta = (tuple(t.shape), str(t.dtype))
        parts.append((n.op, str(n.target) if n.op == "call_function" else "", repr(args), meta))
    parts.append(tuple((tuple(x.shape), str(x.dtype)) for x in inputs))
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


@dataclass
class Built:
    vm: object
    args: list
    n_funcs: int
    build_s: float
    times: list = field(default_factory=list)

    @property
    def latency_s(self) -> float:
        return statistics.median(self.times)


def build(sub: fx.GraphModule, inputs: tuple, target, export_to: Path | None = None) -> Built:
    """Lower `sub` for `target` as hwopt does for a region; raises if it does not match torch.

    With `export_to` (a ``.so`` path) the library is also written, for `load_built` later.
    """
    from tvm import tirx

    from hwopt.lowering.canonicalize import canonicalize
    from hwopt.lowering.relax_import import to_relax

    low, tvm_target = target.lowering, target.tvm()
    t0 = time.perf_counter()
    mod = low.prepare(to_relax(canonicalize(sub), inputs,
                                   getattr(low, "int8_dot", "i16")), tvm_target)
    mod, _ = low.schedule(mod, tvm_target)
    funcs = {gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}
    ex = low.build(mod, tvm_target)
    vm = low.vm(ex)
    build_s = time.perf_counter() - t0
    n_funcs = called_kernels(ex, funcs)
    if export_to is not None:
        Path(export_to).parent.mkdir(parents=True, exist_ok=True)
        from hwopt.lowering.runtime import quiet_scope_logs

        with quiet_scope_logs():
            ex.export_library(str(export_to))
    return Built(vm, _checked_args(vm, sub, inputs, low), n_funcs, build_s)


def load_built(path: Path, sub: fx.GraphModule, inputs: tuple, target, n_funcs: int = 0,
               build_s: float = 0.0) -> Built:
    """A library written by ``build(..., export_to=path)``, loaded and checked again."""
    import tvm

    low = target.lowering
    vm = low.vm(tvm.runtime.load_module(str(path)))  # time_evaluator needs the full VM
    return Built(vm, _checked_args(vm, sub, inputs, low), n_funcs, build_s)


def _checked_args(vm, sub, inputs, low) -> list:
    """The inputs as TVM tensors, after checking the VM's outputs against PyTorch."""
    import tvm

    from hwopt.lowering.region import check_close

    args = [tvm.runtime.tensor(x.numpy(), device=low.device()) for x in inputs]
    got = [torch.from_numpy(t.numpy()) for t in _flat(vm["main"](*args))]
    with torch.no_grad():
        check_close(got, sub(*inputs), "subgraph")
    return args


def called_kernels(executable, funcs: set) -> int:
    """How many PrimFunc calls the VM makes (pure reshapes become ``vm.builtin.reshape``)."""
    calls = 0
    for line in executable.as_text().splitlines():
        parts = line.split()
        if len(parts) > 1 and parts[0] == "call" and parts[1] in funcs:
            calls += 1
    return calls


def _flat(value) -> list:
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return [value]
    return [t for v in value for t in _flat(v)]


def time_built(b: Built, repeat: int = 5, min_repeat_ms: int = 10) -> list[float]:
    """Seconds per call, `repeat` times (each repeat runs long enough to be timed)."""
    import tvm

    ev = b.vm.time_evaluator("main", tvm.cpu(), number=1, repeat=repeat,
                             min_repeat_ms=int(min_repeat_ms))
    res = list(ev(*b.args).results)
    b.times.extend(res)
    return res


def _busy(t) -> float:
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)


def other_cores(fn) -> tuple:
    """(fn(), cores' worth of CPU other processes used while fn ran): how disturbed a
    measurement was on a shared machine."""
    import psutil

    me = psutil.Process()
    s0, m0, t0 = psutil.cpu_times(), me.cpu_times(), time.monotonic()
    out = fn()
    s1, m1, dt = psutil.cpu_times(), me.cpu_times(), time.monotonic() - t0
    mine = (m1.user + m1.system) - (m0.user + m0.system)
    return out, max((_busy(s1) - _busy(s0) - mine) / max(dt, 1e-3), 0.0)


def time_quietly(b: Built, repeat: int = 5, tries: int = 3, max_other: float = 0.25,
                 wait_s: float = 1.0) -> tuple[list[float], float]:
    """Time `b` when other processes leave the CPU alone: up to `tries` attempts, waiting
    `wait_s` between them; returns the least disturbed attempt's times and its disturbance
    (cores used by others). Each attempt's times are added to ``b.times``."""
    best = None
    for i in range(tries):
        times, other = other_cores(lambda: time_built(b, repeat))
        if best is None or other < best[1]:
            best = (times, other)
        if other <= max_other:
            break
        if i + 1 < tries:
            time.sleep(wait_s)
    return best
