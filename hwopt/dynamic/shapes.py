"""Dynamic input shapes: one symbolic size, a few static shape buckets, padding where it is safe.

Sits before the static pipeline. ``hwopt.compile(model, inputs, dynamic_shapes=...)`` (see
hwopt.dynamic.variants) and the torch.compile backend (hwopt.dynamic.shape_backend) both call
`plan_shapes` on a graph captured with a symbolic size:

1. the graph is costed symbolically (hwopt.cost_symbolic: latency as a sympy expression in the
   size) and evaluated at candidate sizes over the range [lo, hi];
2. a set of at most ``max_buckets`` sizes (always including hi) is chosen that minimises the
   predicted latency of running each length n in lo..hi padded to the smallest bucket >= n;
   a further bucket is only added when it lowers that expected latency by >= 2 %;
3. padding is used only when it is proven safe: structurally (hwopt.dynamic.padsafe: every op
   that mixes positions along the padded axis is masked) and on numbers (`numeric_check`: the
   first n positions of the padded run equal the unpadded run). Otherwise each exact shape is
   compiled (bounded by max_buckets; beyond that, PyTorch with a warning).

Inputs are padded with 0 along the symbolic axis (the [PAD] id of BERT-style vocabularies and the
"not attended" value of an attention mask); outputs are sliced back along their symbolic axes.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from hwopt.dynamic.buckets import choose
from hwopt.errors import OptionError

log = logging.getLogger("hwopt")
MIN_GAIN = 0.02  # a further bucket must cut the expected padded latency by this fraction


@dataclass
class ShapePlan:
    """Where the symbolic size lives, the buckets, and whether padding to them is safe."""

    symbol: str  # sympy name, e.g. "s27"
    lo: int
    hi: int | None  # None: no upper bound known (torch.compile without a max)
    inputs: list  # [(flat tensor input index, axis)] that carry the size
    outputs: list  # [(flat output index, axis, size expression as text)]
    buckets: list = field(default_factory=list)
    padded: bool = False
    reason: str = ""  # why padding is or is not used
    how: str = ""  # how the buckets were chosen
    predicted: dict = field(default_factory=dict)  # bucket -> predicted latency (s)

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("symbol", "lo", "hi", "buckets", "padded",
                                              "reason", "how")} | {
            "inputs": [list(x) for x in self.inputs], "outputs": [list(x) for x in self.outputs],
            "predicted": {str(k): v for k, v in self.predicted.items()}}

    @classmethod
    def from_json(cls, doc: dict) -> "ShapePlan":
        plan = cls(**{k: doc[k] for k in ("symbol", "lo", "hi", "buckets", "padded", "reason",
                                          "how")}, inputs=[tuple(x) for x in doc["inputs"]],
                   outputs=[tuple(x) for x in doc["outputs"]])
        plan.predicted = {int(k): v for k, v in doc.get("predicted", {}).items()}
        return plan

    def length(self, tensors) -> int:
        i, axis = self.inputs[0]
        return int(tensors[i].shape[axis])

    def bucket_for(self, n: int) -> int | None:
        if self.hi is None:  # no upper bound: the next power of two (compiled on first use)
            return max(1 << (max(n, 1) - 1).bit_length(), self.lo) if self.padded else None
        return next((b for b in self.buckets if b >= n), None)

    def pad(self, tensors, size: int) -> list:
        out = list(tensors)
        for i, axis in self.inputs:
            out[i] = pad_axis(out[i], axis, size)
        return out

    def unpad(self, outs, n: int) -> tuple:
        outs = list(outs)
        for i, axis, expr in self.outputs:
            outs[i] = outs[i].narrow(axis, 0, size_of(self.symbol, expr, n))
        return tuple(outs)


@functools.lru_cache(maxsize=256)
def _size_fn(symbol: str, expr: str):
    """`expr` (text, in `symbol`) as a plain Python function: parsing it with sympy costs about
    1 ms, which every padded call paid before this cache."""
    import sympy

    sym = sympy.Symbol(symbol, integer=True, positive=True)
    return sympy.lambdify([sym], sympy.sympify(expr, locals={symbol: sym}), modules=["math"])


def size_of(symbol: str, expr: str, n: int) -> int:
    """The output size `expr` (text in `symbol`) at ``symbol = n``."""
    return int(_size_fn(symbol, expr)(n))


def bound(x) -> int | None:
    """A range bound as an int, None when infinite (torch's int_oo)."""
    try:
        return int(x)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None


def pad_axis(x: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """`x` cut or zero-padded to `size` along `axis`."""
    n = x.shape[axis]
    if n >= size:
        return x if n == size else x.narrow(axis, 0, size).contiguous()
    shape = list(x.shape)
    shape[axis] = size
    out = x.new_zeros(shape)
    out.narrow(axis, 0, n).copy_(x)
    return out


def normalize_dynamic_shapes(spec):
    """torch.export ``dynamic_shapes`` with the shorthand ``{axis: (lo, hi)}`` turned into ``Dim``s
    (one shared Dim per distinct range, so inputs of equal length share one symbol)."""
    from torch.export import Dim

    dims: dict = {}

    def conv(v):
        if isinstance(v, dict):
            return {k: conv_dim(d) if isinstance(k, int) else conv(d) for k, d in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(conv(x) for x in v)
        return v

    def conv_dim(d):
        if isinstance(d, tuple) and len(d) == 2 and all(isinstance(x, int) for x in d):
            lo, hi = d
            if not 1 <= lo <= hi:
                raise OptionError(f"option 'dynamic_shapes': range {d} must satisfy 1 <= lo <= hi")
            return dims.setdefault(d, Dim(f"len_{lo}_{hi}", min=lo, max=hi))
        return d

    if not isinstance(spec, (dict, list, tuple)):
        raise OptionError("option 'dynamic_shapes' must be as for torch.export: a tuple (one "
                          "entry per input) or a dict by argument name, each {axis: Dim(...)} "
                          f"or {{axis: (lo, hi)}}; got {spec!r}")
    return conv(spec)


def symbolic_capture(model, args: tuple, kwargs: dict | None, dynamic_shapes):
    """(flat ATen GraphModule with SymInt sizes, range constraints) via torch.export."""
    import warnings

    from hwopt.capture import _flatten_exported

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, tuple(args), kwargs=kwargs or {}, strict=False,
                                 dynamic_shapes=normalize_dynamic_shapes(dynamic_shapes))
        ep = ep.run_decompositions()
    gm = _flatten_exported(ep)
    return gm, input_ranges(gm, dict(ep.range_constraints))


def input_ranges(gm: fx.GraphModule, ranges: dict) -> dict:
    """The range constraints of symbols that are sizes of inputs (export also lists internal
    ones, e.g. of a model's own size checks)."""
    used = set()
    for n in gm.graph.nodes:
        v = n.meta.get("val") if n.op == "placeholder" else None
        used |= {s.node.expr for s in getattr(v, "shape", ()) if isinstance(s, torch.SymInt)}
    return {k: v for k, v in ranges.items() if k in used}


def locate(gm: fx.GraphModule, sym) -> tuple[list, list]:
    """(inputs, outputs) that carry `sym`: [(index, axis)], [(index, axis, size expr)]."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ins = []
    for i, n in enumerate(phs):
        v = n.meta.get("val")
        for axis, s in enumerate(getattr(v, "shape", ())):
            if isinstance(s, torch.SymInt) and s.node.expr == sym:
                ins.append((i, axis))
    outs = []
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    for i, a in enumerate(out_node.args[0]):
        v = a.meta.get("val") if isinstance(a, fx.Node) else None
        for axis, s in enumerate(getattr(v, "shape", ())):
            if isinstance(s, torch.SymInt) and sym in s.node.expr.free_symbols:
                outs.append((i, axis, str(s.node.expr)))
    return ins, outs


def candidate_sizes(lo: int, hi: int, limit: int = 16) -> list[int]:
    """lo, hi, powers of two between, and evenly spaced multiples of 8 (at most `limit`)."""
    sizes = {lo, hi} | {1 << k for k in range(hi.bit_length() + 1) if lo < (1 << k) < hi}
    step = 8
    while (hi - lo) // step > limit:
        step *= 2
    sizes |= {s for s in range(((lo + step - 1) // step) * step, hi, step)}
    return sorted(sizes)


def choose_buckets(latency, lo: int, hi: int, max_buckets: int, weights: dict | None = None,
                   limit: int = 16) -> tuple[list[int], dict]:
    """Buckets over [lo, hi] minimising the expected padded latency (uniform over lengths
    unless `weights` {length: weight}); `latency(size) -> seconds`. Returns (buckets,
    {bucket: predicted seconds})."""
    lat = {s: float(latency(s)) for s in candidate_sizes(lo, hi, limit)}
    w = weights or {n: 1.0 for n in range(lo, hi + 1)}

    def expected(chosen):
        return sum(wt * lat[next(b for b in chosen if b >= n)] for n, wt in w.items())

    best = [hi]
    for k in range(2, max_buckets + 1):
        cand = choose(lat, hi, k, w)
        if expected(cand) > expected(best) * (1 - MIN_GAIN):
            break
        best = cand
    return best, {b: lat[b] for b in best}


def latency_fn(gm: fx.GraphModule, sym, cost_model, tensors: list, inputs: list):
    """(latency(size) -> predicted seconds, how): the symbolic cost (hwopt.cost_symbolic) as a
    lambdified sympy expression in the size; when the cost model cannot stay symbolic on this
    graph, the concrete cost of the graph specialised to each size asked for."""
    import sympy

    from hwopt.cost_symbolic import symbolic_cost

    try:
        expr = symbolic_cost(gm, cost_model).latency_s
        free = getattr(expr, "free_symbols", set())
        if free - {sym}:
            raise ValueError(f"latency depends on {sorted(map(str, free - {sym}))}")
        f = sympy.lambdify([sym], expr, modules=["math", "sympy"])
        return (lambda n: float(f(n))), f"symbolic cost in {sym}"
    except Exception as e:  # noqa: BLE001 - e.g. max() of symbolic sizes in the cost model
        log.info("hwopt: symbolic cost of the dynamic graph failed (%s: %s); costing each "
                 "candidate size", type(e).__name__, e)

    def concrete(n: int) -> float:
        from hwopt.dynamic.buckets import static_copy
        from hwopt.graph import propagate_meta

        g = static_copy(gm)
        padded = list(tensors)
        for i, axis in inputs:
            padded[i] = pad_axis(padded[i], axis, n)
        propagate_meta(g, padded)
        return float(cost_model.graph_cost(g).latency_s)

    return concrete, "concrete cost per candidate size (symbolic cost unavailable)"


def numeric_check(run, tensors: list, plan: ShapePlan, lengths: list[int], size: int,
                  rtol: float = 1e-5) -> str | None:
    """None when, at each length n, running `run` on inputs padded to `size` gives the unpadded
    outputs in the first n positions (max error <= rtol * max |output|); else the reason."""
    for n in lengths:
        exact = plan.pad(tensors, n)  # cut to length n
        with torch.no_grad():
            want = _flat(run(*exact))
            got = plan.unpad(_flat(run(*plan.pad(exact, size))), n)
        for k, (g, w) in enumerate(zip(got, want)):
            if not isinstance(w, torch.Tensor) or not w.is_floating_point():
                if isinstance(w, torch.Tensor) and not torch.equal(g, w):
                    return f"output {k} differs at length {n} when padded to {size}"
                continue
            err = float((g - w).abs().max()) if w.numel() else 0.0
            if err > rtol * max(float(w.abs().max()), 1e-6):
                return (f"output {k} changes by {err:.2e} at length {n} when padded to {size} "
                        f"(tolerance {rtol:g} x max |output|)")
    return None


def _flat(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def plan_shapes(gm: fx.GraphModule, sym, lo: int, hi: int | None, tensors: list, run,
                cost_model, max_buckets: int) -> ShapePlan:
    """The ShapePlan of a symbolic graph: buckets from the cost model, padding if proven safe.

    `tensors` are concrete example inputs (flat, in placeholder order) and `run` a callable
    that runs the model on them (for the numeric check)."""
    from hwopt.dynamic.padsafe import ZERO, pad_safety

    ins, outs = locate(gm, sym)
    plan = ShapePlan(str(sym), lo, hi, ins, outs)
    if not ins:
        plan.reason = f"no input axis has the size {sym} itself"
        return plan
    phs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    reason = pad_safety(gm, sym, {phs[i]: ZERO for i, _ in ins}, min_size=lo)
    if reason is None and hi is not None:
        latency, plan.how = latency_fn(gm, sym, cost_model, tensors, ins)
        limit = 16 if plan.how.startswith("symbolic") else 8
        plan.buckets, plan.predicted = choose_buckets(latency, lo, hi, max_buckets, limit=limit)
        plan.how += f" over {lo}..{hi}"
        n0 = plan.length(tensors)
        checks = sorted({lo, n0} & set(range(lo, n0 + 1)) or {n0})
        reason = numeric_check(run, tensors, plan, checks, plan.buckets[-1])
    elif reason is None:  # unbounded: powers of two, checked at the example's
        plan.how = "powers of two (the size has no upper bound)"
        n0 = plan.length(tensors)
        reason = numeric_check(run, tensors, plan, [n0], 2 * n0)
    plan.padded = reason is None
    plan.reason = reason or f"padding along {sym} is safe (masked or row-wise)"
    if not plan.padded:
        plan.buckets = []
    return plan


__all__ = ["ShapePlan", "candidate_sizes", "choose_buckets", "normalize_dynamic_shapes",
           "numeric_check", "pad_axis", "plan_shapes", "symbolic_capture"]
