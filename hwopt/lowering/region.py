"""Build one supported region with TVM, check it, pick the faster executor, and run it.

Sits in the *lower* step, per region found by `hwopt.lowering.partition`. Steps: cache lookup ->
Relax import -> Relax phases -> the target's schedule rules (tile choice from the tuning database,
by measurement when ``tune="measure"``) -> build -> numerical check against PyTorch -> timing
against PyTorch when ``executor="auto"`` -> cache store. Tensors cross into TVM and back by DLPack.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from hwopt.cache import CompileCache, graph_key
from hwopt.errors import LoweringError
from hwopt.tuning_db import TuningDB

log = logging.getLogger("hwopt")


@dataclass
class RegionInfo:
    name: str
    executor: str  # "tvm" or "torch"
    reason: str = ""
    cached: bool = False
    build_s: float = 0.0
    tvm_ms: float | None = None
    torch_ms: float | None = None
    max_rel_err: float | None = None
    kernels: dict = field(default_factory=dict)  # PrimFunc name -> schedule choice


class TVMRegion(torch.nn.Module):
    """Calls a built Relax function; torch tensors in and out through DLPack (no copies)."""

    def __init__(self, vm, single_output: bool, library_path: str | None = None,
                 executable=None):
        super().__init__()
        self.vm, self.executable = vm, executable
        self.fn = vm["main"]
        self.single_output = single_output
        self.library_path = library_path
        import tvm  # resolved once here, not on every call

        self._to_tvm = tvm.runtime.from_dlpack

    def export(self, path) -> None:
        """Write this region's shared library to `path`."""
        import shutil

        if self.library_path:
            shutil.copyfile(self.library_path, path)
        else:
            self.executable.export_library(str(path))

    def forward(self, *args):
        ins = [self._to_tvm(a.detach().contiguous()) for a in args]
        outs = _flatten_tvm(self.fn(*ins))
        outs = [torch.from_dlpack(o) for o in outs]
        return outs[0] if self.single_output else tuple(outs)


def _flatten_tvm(value) -> list:
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return [value]
    out = []
    for v in value:
        out.extend(_flatten_tvm(v))
    return out


def _flat(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for v in value for t in _flat(v)]


def check_close(got, want, name: str) -> float:
    """Max relative error of `got` vs `want`; raises LoweringError on a mismatch."""
    got, want = _flat(got), _flat(want)
    if len(got) != len(want):
        raise LoweringError(f"region {name} returned {len(got)} outputs, expected {len(want)}")
    worst = 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape:
            raise LoweringError(f"region {name}: output shape {tuple(g.shape)} != "
                                f"{tuple(w.shape)}")
        if not w.is_floating_point():
            if not torch.equal(g.to(w.dtype), w):
                raise LoweringError(f"region {name}: integer output differs from PyTorch")
            continue
        scale = max(float(w.abs().max()) if w.numel() else 0.0, 1e-6)
        err = float((g - w).abs().max()) / scale if w.numel() else 0.0
        worst = max(worst, err)
    if worst > 1e-4:
        raise LoweringError(f"region {name}: TVM output differs from PyTorch (max error "
                            f"{worst:.2e} of the output's range)")
    return worst


def time_pair(fa, fb, budget_s: float = 0.6, block: int = 4) -> tuple[float, float]:
    """Median seconds of the calls fa() and fb(), measured in alternating blocks after warm-up.

    Blocks, not single alternating calls: PyTorch's OpenMP workers keep spinning for a while after
    a PyTorch call and slow the first TVM call after it (and TVM's pool does the same to PyTorch),
    which is not what either costs when a model runs on its own. The first call of each block
    absorbs that switch and is not counted.
    """
    with torch.no_grad():
        for _ in range(2):
            fa(), fb()
        t0 = time.perf_counter()
        fa(), fb()
        one = time.perf_counter() - t0
        rounds = int(min(max(budget_s / max(one * block, 1e-6), 3), 10))
        ta, tb = [], []
        for _ in range(rounds):
            for f, out in ((fa, ta), (fb, tb)):
                f()
                for _ in range(block - 1):
                    t = time.perf_counter()
                    f()
                    out.append(time.perf_counter() - t)
    ta.sort(), tb.sort()
    return ta[len(ta) // 2], tb[len(tb) // 2]


def _schedule(mod, target, opts, db: TuningDB):
    from hwopt.schedules import measure_func, schedule_module

    tvm_target = target.tvm()
    tstr = str(tvm_target)
    lanes = target.schedule_lanes
    bar = None
    if opts.tune == "measure":
        from tqdm.auto import tqdm
        from tvm import tirx

        kernels = sum(1 for f in mod.functions.values() if isinstance(f, tirx.PrimFunc))
        bar = tqdm(total=kernels, desc="hwopt tuning", unit="kernel", disable=not opts.progress)

    def pick(name, func, rule, candidates):
        key = TuningDB.key(func, tstr, lanes)
        known = db.get(key)
        if bar is not None:
            bar.set_postfix_str(name[:30])
            bar.update(1)
        if known is not None or opts.tune != "measure" or len(candidates) < 2:
            return known
        best = None
        for params in candidates:
            try:
                sec = measure_func(rule.apply(func, params, lanes), tvm_target)
            except Exception as e:  # a candidate that does not build is just skipped
                log.debug("hwopt: candidate %s for %s failed: %s", params, name, e)
                continue
            if best is None or sec < best[0]:
                best = (sec, params)
        if best is None:
            return None
        db.put(key, rule.name, best[1], best[0])
        return best[1]

    try:
        return schedule_module(mod, lanes=lanes, pick=pick)
    finally:
        if bar is not None:
            bar.close()


def build_region(name: str, sub: fx.GraphModule, inputs: list, opts,
                 cache: CompileCache, db: TuningDB) -> tuple[torch.nn.Module, RegionInfo]:
    """A module that computes `sub` (TVM when it builds, checks and pays; else `sub` itself)."""
    import tvm
    from tvm import relax

    from hwopt.lowering.canonicalize import canonicalize
    from hwopt.lowering.relax_import import build, prepare, to_relax

    target = opts.target
    key = graph_key(sub, inputs, opts.fingerprint())
    with torch.no_grad():
        want = sub(*inputs)
    single = isinstance(want, torch.Tensor)
    hit = cache.load(key)
    if hit is not None:
        meta, lib = hit
        info = RegionInfo(name, meta["executor"], meta.get("reason", ""), cached=True,
                          tvm_ms=meta.get("tvm_ms"), torch_ms=meta.get("torch_ms"),
                          kernels=meta.get("kernels", {}))
        if info.executor == "torch" or lib is None:
            return sub, info
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
        return TVMRegion(vm, single, str(lib)), info

    t0 = time.perf_counter()
    mod = prepare(to_relax(canonicalize(sub), tuple(inputs)), target.tvm())

    mod, choices = _schedule(mod, target, opts, db)
    ex = build(mod, target.tvm())
    vm = relax.VirtualMachine(ex, tvm.cpu())
    region = TVMRegion(vm, single, executable=ex)
    with torch.no_grad():
        got = region(*inputs)
    err = check_close(got, want, name)
    info = RegionInfo(name, "tvm", "", build_s=time.perf_counter() - t0, max_rel_err=err,
                      kernels={k: [c.rule, dict(c.params)] for k, c in choices.items()})
    if opts.executor == "auto":
        t_tvm, t_torch = time_pair(lambda: region(*inputs), lambda: sub(*inputs))
        info.tvm_ms, info.torch_ms = t_tvm * 1e3, t_torch * 1e3
        if t_torch < t_tvm:
            info.executor, info.reason = "torch", "PyTorch measured faster on this machine"
    meta = {"executor": info.executor, "reason": info.reason, "tvm_ms": info.tvm_ms,
            "torch_ms": info.torch_ms, "kernels": info.kernels, "target": target.name}
    lib = cache.store(key, meta, ex if info.executor == "tvm" else None)
    if info.executor == "torch":
        return sub, info
    region.library_path = str(lib) if lib else None
    return region, info
