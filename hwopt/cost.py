"""Cost values and the analytical cost model every target starts from.

Sits in the *analyse* step: each node of the ATen graph, and each subgraph a pass considers, gets
a `Cost` from its target's model, and passes ask the model whether a rewrite pays. Costs are
values, never bare floats. `RooflineModel` is a hierarchical roofline with per-op-class
efficiency: a kernel takes max(compute time, traffic at each memory level / that level's
bandwidth) plus a per-kernel overhead; energy follows Eyeriss (MACs x energy per MAC of the dtype
+ bytes at each memory level x that level's J/byte). Which level serves an operand is a simple
reuse model: first touch from where the tensor lives (DRAM, or the on-chip level holding the
subgraph's working set when `warm`), re-reads from the innermost level that holds the panel a
register tile sweeps over. Subgraphs are costed as the kernels hwopt's lowering makes of them
(``hwopt.cost_fusion``): fused intermediates move no bytes.

Every quantity may be a sympy expression (dynamic dimensions, see ``hwopt.cost_symbolic``); the
same code then returns a `Cost` of expressions whose ``evaluate`` matches the concrete model.
Measured refinements live in ``hwopt.cost_calibrate`` and ``hwopt.cost_learned``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch.fx as fx

from hwopt.cost_fusion import Kernel, graph_kernels, group, single
from hwopt.cost_ops import ROW_PASSES, Work, node_bytes, node_flops, node_work, op_class

__all__ = ["Cost", "RooflineModel", "ZERO", "Work", "node_bytes", "node_flops", "node_work",
           "op_class"]

ELEMENT_SIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8,
                "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1}


def _sym(*xs) -> bool:
    return any(hasattr(x, "free_symbols") for x in xs)


def smax(*xs):
    """max() that also takes sympy expressions."""
    if _sym(*xs):
        import sympy

        return sympy.Max(*xs)
    return max(xs)


def sceil(x):
    if _sym(x):
        import sympy

        return sympy.ceiling(x)
    return math.ceil(x)


def _to_float(x, subs) -> float:
    if hasattr(x, "subs"):
        return float(x.subs(subs))
    return float(x)


@dataclass(frozen=True)
class Cost:
    """Latency (s), energy (J), bytes moved across kernel boundaries and FLOPs; each a number or
    a sympy expression in dynamic dimensions."""

    latency_s: Any = 0.0
    energy_j: Any = 0.0
    bytes_moved: Any = 0.0
    flops: Any = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.latency_s + other.latency_s, self.energy_j + other.energy_j,
                    self.bytes_moved + other.bytes_moved, self.flops + other.flops)

    @property
    def intensity(self) -> Any:
        """FLOPs per byte moved (the roofline's x axis)."""
        if not _sym(self.bytes_moved) and not self.bytes_moved:
            return math.inf
        return self.flops / self.bytes_moved

    @property
    def is_symbolic(self) -> bool:
        return any(getattr(getattr(self, f.name), "free_symbols", None) for f in fields(self))

    @property
    def symbols(self) -> set:
        out = set()
        for f in fields(self):
            out |= set(getattr(getattr(self, f.name), "free_symbols", ()))
        return out

    def evaluate(self, values: dict | None = None) -> "Cost":
        """A concrete Cost: symbols (sympy Symbols or their names) replaced by `values`."""
        if not self.is_symbolic:
            return Cost(*(float(getattr(self, f.name)) for f in fields(self)))
        by_name = {s.name: s for s in self.symbols}
        subs = {(by_name.get(k, k) if isinstance(k, str) else k): v
                for k, v in (values or {}).items()}
        missing = sorted(s.name for s in self.symbols if s not in subs)
        if missing:
            raise ValueError(f"Cost.evaluate: no value for symbol(s) {', '.join(missing)} "
                             f"(pass e.g. {{'{missing[0]}': 8}})")
        return Cost(*(_to_float(getattr(self, f.name), subs) for f in fields(self)))


ZERO = Cost()


def _default_efficiency() -> dict:
    # Fractions of peak compute hwopt's schedules reach per op class (analytical guesses,
    # replaced by measured values through hwopt.cost_calibrate).
    return {"conv": 0.6, "dwconv": 0.15, "matmul": 0.6, "bmm": 0.4, "reduction": 0.3,
            "softmax": 0.3, "norm": 0.3, "elementwise": 0.3, "gather": 0.2, "layout": 0.3,
            "to_nhwc": 0.3, "to_nchw": 0.3, "view": 1.0, "other": 0.1}


def _default_mem_efficiency() -> dict:
    return {c: 1.0 for c in _default_efficiency()}


@dataclass
class RooflineModel:
    """Hierarchical roofline with per-op-class efficiency and an Eyeriss-style energy model.

    `peak_flops` is FLOP/s (fp32) or a dict dtype -> FLOP/s. `mem_levels` lists
    ``(name, bytes, bandwidth, J/byte)`` from the innermost level out, the last one off-chip;
    without it a single DRAM level (`mem_bw`, `energy_per_byte`) is used. `reg_tile` is the
    (rows, columns) register tile of the conv/matmul schedules, which sets operand re-reads.
    """

    peak_flops: Any
    mem_bw: float
    energy_per_flop: float = 1e-12  # J per FLOP when `energy_per_mac` has no entry
    energy_per_byte: float = 60e-12  # J per DRAM byte when there are no `mem_levels`
    overhead_s: float = 2e-6  # per parallel kernel: launch, thread-pool fork/join
    serial_overhead_s: float = 0.5e-6  # per kernel too small to run in parallel
    efficiency: dict = field(default_factory=_default_efficiency)
    mem_efficiency: dict = field(default_factory=_default_mem_efficiency)
    mem_levels: tuple = ()
    energy_per_mac: dict = field(default_factory=dict)
    reg_tile: tuple = (6, 16)
    lanes: int = 1  # fp32 vector lanes (1: no lane-utilisation term)
    call_overhead_s: float = 0.0  # per subgraph call (the VM's function call)
    warm: bool = True  # inputs and weights that fit on chip stay there between calls
    # Kernels with less work (MACs or elements) run on one of `cores` cores, as hwopt's
    # schedules decide (hwopt.schedules.common.PARALLEL_MIN_WORK).
    cores: int = 1
    parallel_min_work: float = 1 << 15

    @classmethod
    def from_spec(cls, spec, **overrides) -> "RooflineModel":
        """The model of a `hwopt.target.TargetSpec` (peak per dtype, memory levels, energy)."""
        lanes = getattr(spec, "vector_lanes", 8) or 8
        kw = dict(peak_flops=dict(spec.peak_flops), mem_bw=spec.mem_bw,
                  mem_levels=tuple(tuple(lv) for lv in spec.mem_levels),
                  energy_per_mac=dict(spec.energy_per_mac), reg_tile=(6, 2 * lanes), lanes=lanes,
                  cores=max(int(getattr(spec, "cores", 1) or 1), 1))
        kw.update(overrides)
        return cls(**kw)

    # -- parameters ---------------------------------------------------------------------------
    def peak(self, dtype: str) -> float:
        if not isinstance(self.peak_flops, dict):
            return float(self.peak_flops)
        return float(self.peak_flops.get(dtype) or self.peak_flops.get("float32")
                     or next(iter(self.peak_flops.values())))

    def levels(self) -> tuple:
        if self.mem_levels:
            return tuple(self.mem_levels)
        return (("DRAM", 0, self.mem_bw, self.energy_per_byte),)

    def with_params(self, **params) -> "RooflineModel":
        return replace(self, **params)

    # -- public costs -------------------------------------------------------------------------
    def cost_of(self, flops, nbytes, cls: str, dtype: str = "float32", macs=None) -> Cost:
        """One kernel of class `cls` doing `flops` and moving `nbytes` from off-chip memory."""
        if cls == "view":
            return ZERO
        levels = [0] * (len(self.levels()) - 1) + [nbytes]
        macs = flops / 2 if macs is None and cls in ("conv", "dwconv", "matmul", "bmm") else (
            macs or 0)
        return self._finish(cls, flops, macs, dtype, levels, nbytes, math.inf)

    def node_cost(self, node: fx.Node) -> Cost:
        """The node as a kernel of its own (views and getitems cost nothing)."""
        return self.kernels_cost(single(node), call=False)

    def graph_cost(self, gm: fx.GraphModule) -> Cost:
        """A whole GraphModule compiled as one region (fused intermediates move no bytes)."""
        return self.kernels_cost(graph_kernels(gm))

    def subgraph_cost(self, nodes) -> Cost:
        """A set of nodes of a bigger graph, compiled as one region."""
        order = {n: i for i, n in enumerate(next(iter(nodes)).graph.nodes)} if nodes else {}
        return self.kernels_cost(group(sorted(nodes, key=order.__getitem__)))

    def kernels_cost(self, kernels: list[Kernel], call: bool = True) -> Cost:
        total = ZERO
        for t in self.kernel_terms(kernels):
            total = total + self._finish(t["cls"], t["flops"], t["macs"], t["dtype"],
                                         t["level_bytes"], t["bytes"], t["work"], t["util"])
        if call and kernels:
            total = total + Cost(self.call_overhead_s)
        return total

    # -- the model ----------------------------------------------------------------------------
    def _finish(self, cls, flops, macs, dtype, level_bytes, nbytes, work, util=1) -> Cost:
        levels = self.levels()
        eff = self.efficiency.get(cls, 0.1)
        compute = flops / (self.peak(dtype) * eff * util)
        mem_eff = self.mem_efficiency.get(cls, 1.0)
        memory = [b / (lv[2] * mem_eff) for b, lv in zip(level_bytes, levels)]
        latency = self.latency_of(smax(compute, *memory), work)
        e_mac = self.energy_per_mac.get(dtype)
        if e_mac is None:
            e_compute = flops * self.energy_per_flop
        else:  # a non-MAC op (add, compare, exp step) costs about half a MAC
            e_compute = macs * e_mac + (flops - 2 * macs) * e_mac / 2
        energy = e_compute + sum((b * lv[3] for b, lv in zip(level_bytes, levels)), 0)
        return Cost(latency, energy, nbytes, flops)

    def latency_of(self, bound, work):
        """Parallel kernels: the roofline bound + launch overhead; small ones run on one core."""
        if self.cores <= 1:
            return bound + self.overhead_s
        serial = bound * self.cores + self.serial_overhead_s
        parallel = bound + self.overhead_s
        if _sym(work):
            import sympy

            return sympy.Piecewise((parallel, work >= self.parallel_min_work), (serial, True))
        return parallel if work >= self.parallel_min_work else serial

    def fit_level(self, nbytes) -> list:
        """One-hot (0/1, or sympy Piecewise) over levels: the innermost one that holds `nbytes`."""
        levels = self.levels()
        caps = [lv[1] for lv in levels[:-1]]
        if not _sym(nbytes):
            i = next((j for j, c in enumerate(caps) if nbytes <= c), len(caps))
            return [1 if j == i else 0 for j in range(len(levels))]
        import sympy

        out, prev = [], None
        for c in caps:
            cond = nbytes <= c if prev is None else sympy.And(nbytes > prev, nbytes <= c)
            out.append(sympy.Piecewise((1, cond), (0, True)))
            prev = c
        out.append(sympy.Piecewise((1, nbytes > prev), (0, True)) if prev is not None else 1)
        return out

    def kernel_terms(self, kernels: list[Kernel]) -> list[dict]:
        """Per kernel: class, dtype, FLOPs, MACs, boundary bytes and bytes at each level."""
        footprint = _footprint(kernels)
        home_ext = self.fit_level(footprint) if self.warm else self._dram()
        out = []
        for k in kernels:
            lv = [0] * len(self.levels())
            boundary = 0
            for r in k.reads:
                passes, panel = self._reuse(k, r)
                first = home_ext if r.source != "inter" else self.fit_level(r.nbytes)
                again = self.fit_level(panel)
                lv = [a + r.nbytes * f + r.nbytes * (passes - 1) * g
                      for a, f, g in zip(lv, first, again)]
                boundary = boundary + r.nbytes
            for _, nbytes, leaves in k.writes:
                where = home_ext if leaves else self.fit_level(nbytes)
                lv = [a + nbytes * f for a, f in zip(lv, where)]
                boundary = boundary + nbytes
            es = ELEMENT_SIZE.get(k.work.dtype, 4)
            moved = smax(0, *(r.nbytes for r in k.reads), *(w[1] for w in k.writes))
            out.append({"cls": k.cls, "dtype": k.work.dtype, "flops": k.flops, "macs": k.macs,
                        "bytes": boundary, "level_bytes": lv, "kernel": k,
                        "work": smax(k.macs, moved / es), "util": self._lane_use(k)})
        return out

    def _lane_use(self, k: Kernel):
        """Share of vector lanes doing work in a conv/matmul: its N (output channels, columns)
        is vectorized, so N = 12 on 8 lanes runs 16 lanes' worth. A row reduction along the
        last axis runs its sums as vector ops only when `lanes` divides the row and the row
        holds two vectors (``hwopt.schedules.reduction._rfactor``); otherwise its reducing
        passes run scalar and only the element-wise pass is vectorized."""
        row = k.work.inner
        if k.cls in ROW_PASSES and isinstance(row, int) and row > 0 and self.lanes > 1 and (
                row % self.lanes or row < 2 * self.lanes):
            passes = ROW_PASSES[k.cls]
            scalar = max(passes - 1, 1)
            return passes / (scalar * self.lanes + passes - scalar)
        if k.work.gemm is None or k.cls not in ("conv", "dwconv", "matmul", "bmm"):
            return 1
        n = k.work.gemm[3]
        return n / (sceil(n / self.lanes) * self.lanes)

    def _dram(self) -> list:
        n = len(self.levels())
        return [0] * (n - 1) + [1]

    def _reuse(self, k: Kernel, r) -> tuple:
        """(passes over the operand, bytes of the panel re-read from on-chip memory)."""
        w = k.work
        es = ELEMENT_SIZE.get(w.dtype, 4)
        tm, tn = self.reg_tile
        if w.gemm is not None and r.role in (0, 1) and k.cls in ("conv", "matmul", "bmm"):
            _, m, kk, n = w.gemm
            if r.role == 0:
                return sceil(n / tn) * w.window, tm * kk * es
            return sceil(m / tm), kk * tn * es
        if k.cls == "dwconv" and r.role == 0:
            return w.window, tm * w.gemm[2] * es if w.gemm else r.nbytes
        if k.cls in ROW_PASSES and r.role == 0:
            return ROW_PASSES[k.cls] * w.window, w.row_bytes or r.nbytes
        return 1, r.nbytes


def _footprint(kernels: list[Kernel]):
    seen: dict = {}
    for k in kernels:
        for r in k.reads:
            seen[_key(r.key)] = r.nbytes
        for node, nbytes, _ in k.writes:
            seen[_key(node)] = nbytes
    return sum(seen.values(), 0)


def _key(node):
    return node if not isinstance(node, list) else tuple(node)
