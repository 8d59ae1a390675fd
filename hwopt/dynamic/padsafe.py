"""Padding safety: can a dynamic input axis be padded to a bucket without changing real outputs?

Used by hwopt.dynamic.shapes before it compiles one static variant per shape bucket. The input
is an ATen graph captured by torch.export with a ``Dim`` (sizes in ``meta['val']`` are SymInts);
the question is whether, when every input is padded along the symbol's axes (to a size b >= n),
the first n positions of every output are what the unpadded graph computes.

The check is an abstract interpretation over the graph. For every tensor it tracks, per axis of
symbolic size, what the *padded slab* (positions >= n along that axis) holds:

- ``zero`` / ``one``: exact zeros (or False) / ones (True), e.g. a padded attention mask;
- ``neg``: a huge negative number (<= -1e30 or -inf), e.g. an additive mask from a 0-padded mask;
- ``arange``: the position index itself (``arange(0, s)``), used as an index;
- ``any``: finite values that are never read into real positions.

Row-wise ops keep the invariant "real positions equal the unpadded result". An op that mixes
positions along a padded axis must be *masked* to be safe: a softmax over the axis needs ``neg``
pads (it then yields ``zero``), a contraction (bmm / mm) over it needs one operand with ``zero``
pads, a sum needs ``zero``; a mean, a norm or a reshape that interleaves the axis with another is
unsafe. Anything the rules do not know is unsafe, with the node named. ``shapes.numeric_check``
then confirms the answer on numbers.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

ZERO, ONE, NEG, ARANGE, ANY = "zero", "one", "neg", "arange", "any"

_IDENTITY = {"clone", "_to_copy", "alias", "contiguous", "detach", "lift_fresh_copy", "to",
             "type_as", "dropout"}
_VIEWS = {"view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "flatten"}
_ZERO_KEEPING = {"relu", "gelu", "silu", "tanh", "neg", "abs", "hardtanh", "leaky_relu", "sin",
                 "erf", "sqrt"}
_ELEMENTWISE = _ZERO_KEEPING | {"add", "sub", "rsub", "mul", "div", "where", "exp", "sigmoid",
                                "rsqrt", "pow", "clamp", "clamp_min", "clamp_max", "maximum",
                                "minimum", "bitwise_and", "bitwise_or", "logical_and",
                                "logical_or", "logical_not", "bitwise_not", "ge", "gt", "le", "lt",
                                "eq", "ne", "hardswish", "hardsigmoid", "log", "masked_fill",
                                "softplus", "reciprocal", "square", "cos", "floor", "round"}


class Unsafe(Exception):
    """Padding could change real outputs; the message names the node and why."""


@dataclass
class Abs:
    """Abstract value of a tensor: {axis: slab kind} for its symbolic axes, and `whole`, the
    kind of all its values when known (constants, e.g. a scalar -inf)."""

    dyn: dict = field(default_factory=dict)
    whole: str = ANY
    rank: int = 0


def _base(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t._opname
    return getattr(t, "__name__", str(t))


def _expr(s):
    return s.node.expr if isinstance(s, torch.SymInt) else s


def _shape(node) -> tuple | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(_expr(s) for s in v.shape) if isinstance(v, torch.Tensor) else None


def _scalar_kind(v) -> str:
    if isinstance(v, bool):
        return ONE if v else ZERO
    if isinstance(v, (int, float)):
        if v == 0:
            return ZERO
        if v == 1:
            return ONE
        if v <= -1e30 or (isinstance(v, float) and math.isinf(v) and v < 0):
            return NEG
    return ANY


def _combine(op: str, kinds: list[str], args: list) -> str:
    """Kind of an elementwise result from its operands' kinds (a small, sound table)."""
    if op in _IDENTITY:
        return kinds[0]
    if op in _ZERO_KEEPING:
        return ZERO if kinds[0] == ZERO else ANY
    if op == "logical_not" or op == "bitwise_not":
        return {ZERO: ONE, ONE: ZERO}.get(kinds[0], ANY)
    if op == "where":
        cond, a, b = kinds
        return a if cond == ONE else b if cond == ZERO else a if a == b else ANY
    if op in ("bitwise_and", "logical_and"):
        return ZERO if ZERO in kinds else ONE if all(k == ONE for k in kinds) else ANY
    if op in ("bitwise_or", "logical_or"):
        return ONE if ONE in kinds else ZERO if all(k == ZERO for k in kinds) else ANY
    if op in ("ge", "gt") and kinds[0] == ARANGE and len(args) > 1 and args[1] == 0:
        return ONE if op == "ge" else ANY
    if len(kinds) < 2:
        return ANY
    a, b = kinds[0], kinds[1]
    if op == "add":
        if NEG in (a, b) and ARANGE not in (a, b):
            return NEG
        return b if a == ZERO else a if b == ZERO else ANY
    if op == "sub":
        return a if b == ZERO else NEG if a == NEG else ANY
    if op == "rsub":  # rsub(x, y) = y - x
        return b if a == ZERO else {(ONE, ONE): ZERO}.get((a, b), ANY)
    if op == "mul":
        if ZERO in (a, b):
            return ZERO
        if ONE in (a, b):
            return b if a == ONE else a
        if NEG in (a, b) and isinstance(args[1], (int, float)) and args[1] > 0:
            return NEG
        if (a, b) == (ONE, NEG) or (a, b) == (NEG, ONE):
            return NEG
        return ANY
    if op == "div":
        return ZERO if a == ZERO else NEG if a == NEG and _positive(args[1]) else ANY
    return ANY


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and v > 0


class PadAnalysis:
    """Runs the abstract interpretation; `run()` returns None when padding is safe."""

    def __init__(self, gm: fx.GraphModule, sym, pad_kinds: dict, min_size: int = 1):
        self.gm, self.sym, self.pad_kinds, self.min_size = gm, sym, pad_kinds, min_size
        self.env: dict = {}

    def run(self) -> str | None:
        try:
            for n in self.gm.graph.nodes:
                self.env[n] = self._node(n)
        except Unsafe as e:
            return str(e)
        return None

    # -- helpers -------------------------------------------------------------------------
    def _is_dyn(self, size) -> bool:
        if isinstance(size, int) or not hasattr(size, "free_symbols"):
            return False
        if self.sym not in size.free_symbols:
            return False
        return True

    def _dyn_axes(self, node, shape) -> list[int]:
        axes = [i for i, s in enumerate(shape) if self._is_dyn(s)]
        for i in axes:
            if shape[i] != self.sym:
                raise Unsafe(f"{node.name} ({_base(node)}) has size {shape[i]} along a padded "
                             "axis (only the symbol itself can be padded)")
        return axes

    def _abs(self, v) -> Abs:
        if isinstance(v, fx.Node):
            got = self.env.get(v)
            return got if isinstance(got, Abs) else Abs()
        return Abs(whole=_scalar_kind(v))

    def _fresh(self, node, kind: str = ANY) -> Abs:
        shape = _shape(node) or ()
        return Abs({i: kind for i in self._dyn_axes(node, shape)}, ANY, len(shape))

    def _touches(self, node) -> bool:
        return any(self._abs(a).dyn for a in node.all_input_nodes) or bool(
            self._dyn_axes(node, _shape(node) or ()))

    # -- transfer functions --------------------------------------------------------------
    def _node(self, n: fx.Node):
        if n.op == "placeholder":
            shape = _shape(n)
            return self._fresh(n, self.pad_kinds.get(n.name, ANY)) if shape is not None else None
        if n.op in ("get_attr", "output"):
            return Abs(rank=len(_shape(n) or ()))
        if n.op != "call_function":
            raise Unsafe(f"{n.name}: {n.op} nodes are not analysed")
        if n.target is operator.getitem:
            src = self.env.get(n.args[0])
            return src[n.args[1]] if isinstance(src, list) else None
        if _shape(n) is None and not isinstance(n.meta.get("val"), (tuple, list)):
            return None  # a size computation (sym_size, operator.mul on SymInts)
        return self._op(n, _base(n))

    def _op(self, n: fx.Node, op: str):
        handler = getattr(self, f"_op_{op}", None)
        if handler is not None:
            return handler(n)
        if op in _VIEWS:
            return self._view(n)
        if op in _IDENTITY or op in _ELEMENTWISE:
            return self._elementwise(n, op)
        if op in ("full", "scalar_tensor", "zeros", "ones", "full_like", "zeros_like",
                  "ones_like"):
            return self._filled(n, op)
        if not self._touches(n):
            return Abs(rank=len(_shape(n) or ()))
        raise Unsafe(f"{n.name} ({op}) touches a padded axis and is not known to be row-wise")

    def _filled(self, n, op):
        value = {"zeros": 0, "ones": 1, "zeros_like": 0, "ones_like": 1}.get(op)
        if value is None:
            value = n.args[1] if op in ("full", "full_like") else n.args[0]
        kind = _scalar_kind(value)
        out = self._fresh(n, kind)
        out.whole = kind
        return out

    def _elementwise(self, n, op) -> Abs:
        shape = _shape(n)
        rank = len(shape)
        operands = [a for a in n.args if isinstance(a, (fx.Node, int, float, bool))]
        out = Abs(rank=rank)
        for axis in self._dyn_axes(n, shape):
            kinds = []
            for a in operands:
                ab = self._abs(a)
                k = axis - (rank - ab.rank)  # broadcasting aligns from the right
                kinds.append(ab.dyn[k] if k >= 0 and k in ab.dyn else ab.whole)
            out.dyn[axis] = _combine(op, kinds, list(n.args))
        out.whole = _combine(op, [self._abs(a).whole for a in operands], list(n.args))
        return out

    def _view(self, n) -> Abs:
        """view/reshape/(un)squeeze/flatten: a padded axis must survive with the same elements
        before and after it (otherwise padded positions interleave with real ones)."""
        src = n.args[0]
        ins, outs = _shape(src), _shape(n)
        a = self._abs(src)
        out = Abs(whole=a.whole, rank=len(outs))
        for i, kind in a.dyn.items():
            pre, post = _prod(ins[:i]), _prod(ins[i + 1:])
            j = next((j for j, s in enumerate(outs) if s == self.sym and _eq(_prod(outs[:j]), pre)
                      and _eq(_prod(outs[j + 1:]), post)), None)
            if j is None:
                raise Unsafe(f"{n.name} ({_base(n)}) merges the padded axis {i} of {src.name} "
                             f"with another axis ({list(ins)} -> {list(outs)})")
            out.dyn[j] = kind
        if set(self._dyn_axes(n, outs)) != set(out.dyn):
            raise Unsafe(f"{n.name} ({_base(n)}) creates a padded axis from static ones")
        return out

    def _op_permute(self, n) -> Abs:
        a, dims = self._abs(n.args[0]), [d % max(len(n.args[1]), 1) for d in n.args[1]]
        return Abs({j: a.dyn[d] for j, d in enumerate(dims) if d in a.dyn}, a.whole, len(dims))

    def _op_transpose(self, n) -> Abs:
        a = self._abs(n.args[0])
        d0, d1 = (d % a.rank for d in n.args[1:3])
        perm = {d0: d1, d1: d0}
        return Abs({perm.get(i, i): k for i, k in a.dyn.items()}, a.whole, a.rank)

    def _op_t(self, n) -> Abs:
        a = self._abs(n.args[0])
        return Abs({(1 - i if a.rank == 2 else i): k for i, k in a.dyn.items()}, a.whole, a.rank)

    def _op_expand(self, n) -> Abs:
        a, outs = self._abs(n.args[0]), _shape(n)
        off = len(outs) - a.rank
        out = Abs({i + off: k for i, k in a.dyn.items()}, a.whole, len(outs))
        for j in self._dyn_axes(n, outs):
            out.dyn.setdefault(j, a.whole)  # a broadcast axis: its values are the same everywhere
        return out

    def _op_arange(self, n) -> Abs:
        args = [a for a in n.args]
        start, end = (0, args[0]) if len(args) == 1 else (args[0], args[1])
        step = args[2] if len(args) > 2 else 1
        out = self._fresh(n, ANY)
        if out.dyn:
            if not (start == 0 and step == 1):
                raise Unsafe(f"{n.name}: arange({start}, {end}, {step}) over the padded size")
            out.dyn = {0: ARANGE}
        return out

    def _op_slice(self, n) -> Abs:
        src, dim = n.args[0], n.args[1] if len(n.args) > 1 else 0
        start = n.args[2] if len(n.args) > 2 else None
        end = n.args[3] if len(n.args) > 3 else None
        step = n.args[4] if len(n.args) > 4 else 1
        a, outs = self._abs(src), _shape(n)
        dim %= len(outs)
        out = Abs({i: k for i, k in a.dyn.items() if i != dim}, a.whole, len(outs))
        if dim in a.dyn or dim in self._dyn_axes(n, outs):
            end_e = _expr(end.meta.get("val")) if isinstance(end, fx.Node) else end
            if start not in (0, None) or step != 1 or not (end_e == self.sym or (
                    dim in a.dyn and isinstance(end, int) and end >= 2**62)):
                raise Unsafe(f"{n.name}: slice [{start}:{end}:{step}] along the padded axis")
            out.dyn[dim] = a.dyn.get(dim, ANY)  # the first s rows of a static table: real stays
        return out

    def _op_select(self, n) -> Abs:
        a = self._abs(n.args[0])
        dim, idx = n.args[1] % a.rank, n.args[2]
        if dim in a.dyn and not (isinstance(idx, int) and 0 <= idx < self.min_size):
            raise Unsafe(f"{n.name}: select index {idx} along the padded axis (only indices "
                         f"0..{self.min_size - 1}, below the smallest length, are real)")
        return Abs({(i if i < dim else i - 1): k for i, k in a.dyn.items() if i != dim},
                   a.whole, a.rank - 1)

    def _op_embedding(self, n) -> Abs:
        if self._abs(n.args[0]).dyn:
            raise Unsafe(f"{n.name}: embedding table with a padded axis")
        return self._fresh(n, ANY)

    def _op_gather(self, n) -> Abs:
        if self._abs(n.args[0]).dyn:
            raise Unsafe(f"{n.name}: gather from a tensor with a padded axis")
        return self._fresh(n, ANY)

    def _op_index(self, n) -> Abs:
        """x[i0, i1, ...] (advanced indexing by every axis): a padded axis of x may only be
        indexed by its position (an arange), so real positions read real positions."""
        x, indices = self._abs(n.args[0]), list(n.args[1])
        if len(indices) != x.rank or any(i is None for i in indices):
            if x.dyn:
                raise Unsafe(f"{n.name}: partial advanced indexing of a padded tensor")
            return self._fresh(n, ANY)
        outs = _shape(n)
        out = Abs(rank=len(outs))
        for axis, idx in enumerate(indices):
            ia = self._abs(idx)
            if axis in x.dyn and (not ia.dyn or any(k != ARANGE for k in ia.dyn.values())):
                raise Unsafe(f"{n.name}: indexes the padded axis {axis} of {n.args[0].name} by "
                             "values that are not its positions")
            for j in ia.dyn:
                out.dyn[j + len(outs) - ia.rank] = x.dyn[axis] if axis in x.dyn else ANY
        missing = set(self._dyn_axes(n, outs)) - set(out.dyn)
        if missing:
            raise Unsafe(f"{n.name}: index result has padded axes {sorted(missing)} of unknown "
                         "origin")
        return out

    def _softmax(self, n, result_kind: str) -> Abs:
        a = self._abs(n.args[0])
        dim = n.args[1] % a.rank
        if dim in a.dyn and a.dyn[dim] != NEG:
            raise Unsafe(f"{n.name} ({_base(n)}) normalises over the padded axis and the pads are "
                         f"not masked to -inf (they hold {a.dyn[dim]!r})")
        return Abs({i: (result_kind if i == dim else ANY) for i in a.dyn}, ANY, a.rank)

    def _op__softmax(self, n) -> Abs:
        return self._softmax(n, ZERO)

    def _op__log_softmax(self, n) -> Abs:
        return self._softmax(n, NEG)

    def _op_native_layer_norm(self, n) -> list:
        a, ns = self._abs(n.args[0]), len(n.args[1])
        if any(i >= a.rank - ns for i in a.dyn):
            raise Unsafe(f"{n.name}: layer norm over the padded axis")
        row = Abs({i: ANY for i in a.dyn}, ANY, a.rank)
        return [row, row, row]

    def _contract(self, n, a_node, b_node, batch: bool) -> Abs:
        a, b = self._abs(a_node), self._abs(b_node)
        ka, kb = a.rank - 1, b.rank - 2
        if (ka in a.dyn) != (kb in b.dyn):
            raise Unsafe(f"{n.name}: contraction over mismatched padded axes")
        if ka in a.dyn and ZERO not in (a.dyn[ka], b.dyn[kb]):
            raise Unsafe(f"{n.name} ({_base(n)}) sums over the padded axis and neither operand "
                         "has zero pads there (mask the padded positions)")
        out = Abs(rank=len(_shape(n)))
        for i in a.dyn:
            if i != ka:
                out.dyn[i] = ANY
        if b.rank - 1 in b.dyn:
            out.dyn[out.rank - 1] = ANY
        if batch and 0 in b.dyn:
            out.dyn[0] = ANY
        if set(self._dyn_axes(n, _shape(n))) != set(out.dyn):
            raise Unsafe(f"{n.name}: unexpected padded axes after {_base(n)}")
        return out

    def _op_bmm(self, n) -> Abs:
        return self._contract(n, n.args[0], n.args[1], True)

    def _op_mm(self, n) -> Abs:
        return self._contract(n, n.args[0], n.args[1], False)

    def _op_addmm(self, n) -> Abs:
        if self._abs(n.args[0]).dyn and not self._abs(n.args[1]).dyn:
            raise Unsafe(f"{n.name}: addmm bias with a padded axis")
        return self._contract(n, n.args[1], n.args[2], False)

    def _reduce(self, n, need: str | None) -> Abs:
        a = self._abs(n.args[0])
        dims = n.args[1] if len(n.args) > 1 and n.args[1] is not None else list(range(a.rank))
        dims = [d % a.rank for d in ([dims] if isinstance(dims, int) else dims)]
        keep = bool(n.args[2]) if len(n.args) > 2 else bool(n.kwargs.get("keepdim", False))
        hit = [d for d in dims if d in a.dyn]
        if hit and (need is None or any(a.dyn[d] != need for d in hit)):
            raise Unsafe(f"{n.name} ({_base(n)}) reduces over the padded axis"
                         + (f" whose pads are not {need}" if need else ""))
        out = Abs(rank=len(_shape(n)))
        for i in a.dyn:
            if i not in dims:
                out.dyn[i if keep else i - sum(d < i for d in dims)] = ANY
        return out

    def _op_sum(self, n) -> Abs:
        return self._reduce(n, ZERO)

    def _op_amax(self, n) -> Abs:
        return self._reduce(n, NEG)

    def _op_mean(self, n) -> Abs:
        return self._reduce(n, None)

    def _op_var(self, n) -> Abs:
        return self._reduce(n, None)


def _prod(sizes):
    out = 1
    for s in sizes:
        out = out * s
    return out


def _eq(a, b) -> bool:
    try:
        return bool(a == b) or (hasattr(a - b, "expand") and (a - b).expand() == 0)
    except TypeError:
        return False


def pad_safety(gm: fx.GraphModule, sym, pad_kinds: dict, min_size: int = 1) -> str | None:
    """None when padding every input along `sym` (pads of kind `pad_kinds[placeholder]`, by
    default ``any``) leaves the real positions of all outputs unchanged; else the reason."""
    return PadAnalysis(gm, sym, pad_kinds, min_size).run()
