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
from hwopt.errors import HwoptError, LoweringError
from hwopt.lowering.guards import check_indices
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
    """Calls a built Relax function; torch tensors in and out through DLPack (no copies).

    Holds the target's `lowering` and either the executable or the folder of files it was
    exported to (a cache hit), so that `export` can write the target code again. `vm` is None
    when the code is for another machine: calling the region then raises.
    """

    def __init__(self, vm, single_output: bool, lowering=None, executable=None,
                 files: tuple | None = None, target_name: str = "cpu", index_checks=()):
        super().__init__()
        # (input, size, negatives ok) per index input (hwopt.lowering.guards): checked per call
        self.index_checks = tuple(tuple(c) for c in index_checks)
        self.vm, self.executable, self.lowering = vm, executable, lowering
        self.fn = vm["main"] if vm is not None else None
        self.single_output = single_output
        self.files = files  # (folder, [names]) of an exported copy, e.g. in the compile cache
        self.target_name = target_name
        from hwopt.lowering.runtime import from_dlpack

        self._to_tvm = from_dlpack()  # resolved once here, not on every call

    def export(self, folder, name: str) -> list[str]:
        """Write this region's target code into `folder` as ``<name>.*``; returns file names."""
        import shutil
        from pathlib import Path

        if self.executable is not None:
            return self.lowering.export(self.executable, Path(folder), name)
        src, names = self.files
        out = []
        for n in names:  # cached copies are named lib.*; keep the suffix, take the region name
            new = name + n[len(n.split(".")[0]):]
            shutil.copyfile(Path(src) / n, Path(folder) / new)
            out.append(new)
        return out

    def forward(self, *args):
        if self.fn is None:
            raise HwoptError(f"this region was compiled for target {self.target_name!r}, which "
                             "does not run on this machine; save the artifact and run it there")
        if self.index_checks:
            check_indices(args, self.index_checks)
        # A GPU lowering names its torch device: inputs go there, outputs come back to where
        # the inputs were (tensors already on the device stay there).
        dev = getattr(self.lowering, "torch_device", None)
        home = args[0].device if args else None
        if dev is not None:
            args = [a.to(dev) for a in args]
        ins = [self._to_tvm(_aligned(a.detach().contiguous())) for a in args]
        outs = _flatten_tvm(self.fn(*ins))
        outs = [torch.from_dlpack(o) for o in outs]
        if dev is not None and home is not None:
            outs = [o.to(home) for o in outs]
        return outs[0] if self.single_output else tuple(outs)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """TVM takes DLPack tensors only at 64-byte-aligned addresses; a view at an offset (e.g.
    ``timesteps[i].reshape(1)``) is copied to a fresh, aligned tensor."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


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


# A region with int8 layers is compared with the eager fake-quant graph, which sums the
# dequantized products in fp32 (rounded) while the integer kernel sums exactly: a value within
# float rounding of a requantization tie lands one step (1 LSB) away, and that step propagates
# through the layers after it (attention and LayerNorm spread it over many values). Bounds:
# integer outputs within QUANT_LSB_INT steps; float outputs within QUANT_LSB_TOL LSB of the largest
# requantization scale in the region at every value, and within QUANT_RMS_TOL relative RMS error
# overall (30 dB, above the 20 dB the quantize pass must keep), and with a mean difference within
# QUANT_BIAS_LSB: rounding steps go both ways, a systematic error (a wrong zero point shifts
# every value one step) does not. Measured: BERT (25 int8 layers, 4 blocks) differs from its
# fake-quant graph by 1.2 % relative RMS (38 dB) on Zen 4, mean difference under 0.01 LSB.
QUANT_LSB_INT = 1
QUANT_LSB_TOL = 2.0
QUANT_RMS_TOL = 3e-2
QUANT_BIAS_LSB = 0.25


def check_close(got, want, name: str, lsb: float | None = None) -> float:
    """Max relative error of `got` vs `want`; raises LoweringError on a mismatch.

    `lsb`: the region holds int8 layers whose largest output scale is `lsb`; then integer
    outputs may differ by ``QUANT_LSB_INT`` and float outputs by ``QUANT_LSB_TOL * lsb`` per value
    and ``QUANT_RMS_TOL`` relative RMS error overall.
    """
    if lsb is not None:
        return _check_quantized(_flat(got), _flat(want), name, lsb)
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


def _check_quantized(got, want, name: str, lsb: float) -> float:
    if len(got) != len(want):
        raise LoweringError(f"region {name} returned {len(got)} outputs, expected {len(want)}")
    worst = 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape:
            raise LoweringError(f"region {name}: output shape {tuple(g.shape)} != "
                                f"{tuple(w.shape)}")
        if w.numel() == 0:
            continue
        diff = (g.double() - w.double()).abs()
        if not w.is_floating_point():
            if float(diff.max()) > QUANT_LSB_INT:
                raise LoweringError(f"region {name}: int8 output differs from the fake-quant "
                                    f"graph by {float(diff.max()):g} steps (allowed "
                                    f"{QUANT_LSB_INT})")
            continue
        scale = max(float(w.abs().max()), 1e-6)
        rms = float(diff.norm() / w.double().norm().clamp_min(1e-30))
        bound = max(QUANT_LSB_TOL * lsb, 1e-4 * scale)
        bias = abs(float((g.double() - w.double()).mean()))
        if bias > QUANT_BIAS_LSB * lsb and bias > 1e-4 * scale:
            raise LoweringError(
                f"region {name}: int8 TVM output is shifted from the fake-quant graph by "
                f"{bias:.3g} on average (allowed {QUANT_BIAS_LSB:g} LSB of scale {lsb:.3g}): "
                "a systematic error, not rounding")
        if float(diff.max()) > bound or rms > QUANT_RMS_TOL:
            raise LoweringError(
                f"region {name}: int8 TVM output differs from the fake-quant graph by "
                f"{float(diff.max()):.3g} (allowed {bound:.3g} = {QUANT_LSB_TOL:g} LSB of scale "
                f"{lsb:.3g}), relative RMS error {rms:.2e} (allowed {QUANT_RMS_TOL:g})")
        worst = max(worst, float(diff.max()) / scale)
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
    low = target.lowering
    tvm_target = target.tvm()
    tstr = str(tvm_target)
    lanes = getattr(low, "lanes", target.schedule_lanes)
    farm = opts.devices.for_lowering(low) if opts.devices is not None else None
    measure_one = farm.measure_func if farm is not None else getattr(low, "measure", None)
    measure = opts.tune in ("measure", "metaschedule") and measure_one is not None and (
        farm is not None or target.runs_here())
    bar = None
    if measure:
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
        if known is not None or not measure or len(candidates) < 2:
            return known
        best = None
        for params in candidates:
            try:
                sec = measure_one(rule.apply(func, params, lanes), tvm_target)
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
        scheduled, choices = low.schedule(mod, tvm_target, pick=pick)
    finally:
        if bar is not None:
            bar.close()
    if opts.tune == "metaschedule":
        from hwopt.lowering.metaschedule import metaschedule_override

        override = metaschedule_override(mod, scheduled, choices, target, opts, db, tvm_target,
                                         lanes)
        if override:
            scheduled, choices = low.schedule(mod, tvm_target, pick=pick, override=override)
    return scheduled, choices


def build_region(name: str, sub: fx.GraphModule, inputs: list, opts,
                 cache: CompileCache, db: TuningDB) -> tuple[torch.nn.Module, RegionInfo]:
    """A module that computes `sub` (TVM when it builds, checks and pays; else `sub` itself).

    For a target whose code does not run here (cross-compilation), the region is built and
    exported but neither checked nor timed here; its tests run it on the device or an emulator.
    """
    target = opts.target
    low, here = target.lowering, target.runs_here()
    key = graph_key(sub, inputs, opts.fingerprint())
    with torch.no_grad():
        want = sub(*inputs)
    single = isinstance(want, torch.Tensor)
    hit = cache.load(key)
    if hit is not None:
        meta, folder = hit
        info = RegionInfo(name, meta["executor"], meta.get("reason", ""), cached=True,
                          tvm_ms=meta.get("tvm_ms"), torch_ms=meta.get("torch_ms"),
                          kernels=meta.get("kernels", {}))
        files = meta.get("file_order") or []
        if info.executor == "torch" or not files:
            return sub, info
        vm = low.load(folder, files) if here else None
        return TVMRegion(vm, single, low, files=(folder, files), target_name=target.name,
                         index_checks=meta.get("index_checks", ())), info

    from hwopt.lowering.canonicalize import canonicalize  # imports TVM: not needed on a hit
    from hwopt.lowering.guards import index_checks
    from hwopt.lowering.relax_import import to_relax

    checks = index_checks(sub)

    t0 = time.perf_counter()
    tvm_target = target.tvm()
    mod = low.prepare(to_relax(canonicalize(sub), tuple(inputs),
                                   getattr(low, "int8_dot", "i16")), tvm_target)
    mod, choices = _schedule(mod, target, opts, db)
    ex = low.build(mod, tvm_target)
    kernels = {k: [c.rule, dict(c.params)] for k, c in choices.items()}
    if not here:
        region = TVMRegion(None, single, low, executable=ex, target_name=target.name,
                           index_checks=checks)
        info = RegionInfo(name, "tvm", f"built for {target.name}; runs on the device",
                          build_s=time.perf_counter() - t0, kernels=kernels)
    else:
        region = TVMRegion(low.vm(ex), single, low, executable=ex, target_name=target.name,
                           index_checks=checks)
        with torch.no_grad():
            got = region(*inputs)
        from hwopt.lowering.qdq import max_output_lsb

        err = check_close(got, want, name, lsb=max_output_lsb(sub))
        info = RegionInfo(name, "tvm", "", build_s=time.perf_counter() - t0, max_rel_err=err,
                          kernels=kernels)
        if opts.executor == "auto":
            t_tvm, t_torch = time_pair(lambda: region(*inputs), lambda: sub(*inputs))
            info.tvm_ms, info.torch_ms = t_tvm * 1e3, t_torch * 1e3
            if t_torch < t_tvm:
                info.executor, info.reason = "torch", "PyTorch measured faster on this machine"
    meta = {"executor": info.executor, "reason": info.reason, "tvm_ms": info.tvm_ms,
            "torch_ms": info.torch_ms, "kernels": info.kernels, "target": target.name,
            "index_checks": checks}
    export = (lambda d: low.export(ex, d, "lib")) if info.executor == "tvm" else None
    cache.store(key, meta, export)
    return (sub if info.executor == "torch" else region), info
