"""Index bounds checks for TVM regions: a part of the *lower* step (hwopt.lowering.region).

TVM's ``take`` (what embedding, index_select, gather and advanced indexing become) reads memory
at whatever index it gets: an out-of-range token id would crash the process or read garbage,
where PyTorch raises ``IndexError``. For every such op whose indices are a region input (token
ids, routed positions), the region checks the input's range before calling TVM and raises the
same error PyTorch would. Indices computed inside a region (argmax, arange) are in range by
construction and are not checked. ``clip_takes`` (a Relax phase of ``relax_import.prepare``)
then lowers every take in "clip" mode, so TVM does not warn about "fast" mode at each build.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from hwopt.errors import HwoptError

aten = torch.ops.aten
# index operand position, dim of the indexed tensor (None: from the `dim` argument), negatives ok
_INDEXING = {aten.embedding.default: (1, 0, False),
             aten.index_select.default: (2, None, False),
             aten.gather.default: (2, None, False)}
# ops that pass the values of their input through unchanged (shape or dtype only)
_SAME_VALUES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default,
                aten.flatten.using_ints, aten._to_copy.default, aten.clone.default,
                aten.expand.default, aten.contiguous.default, aten.alias.default}


class IndexOutOfRange(HwoptError, IndexError):
    pass


def _source(node) -> fx.Node | None:
    """The placeholder whose values `node` carries unchanged, if any."""
    while isinstance(node, fx.Node):
        if node.op == "placeholder":
            return node
        if node.op != "call_function" or node.target not in _SAME_VALUES:
            return None
        node = node.args[0]
    return None


def _shape(node):
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def index_checks(gm: fx.GraphModule) -> tuple[tuple[int, int, bool], ...]:
    """(input position, size of the indexed dim, negatives allowed) per index input of `gm`."""
    pos = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    found: dict[tuple[int, bool], int] = {}

    def add(idx_node, src_node, dim, negative):
        ph, shape = _source(idx_node), _shape(src_node)
        v = idx_node.meta.get("val") if isinstance(idx_node, fx.Node) else None
        if ph is None or shape is None or not isinstance(v, torch.Tensor) \
                or v.dtype in (torch.bool, torch.uint8) or not isinstance(shape[dim], int):
            return
        key = (pos[ph], negative)
        found[key] = min(found.get(key, shape[dim]), shape[dim])

    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in _INDEXING:
            at, dim, negative = _INDEXING[n.target]
            if len(n.args) > at:
                if dim is None:
                    dim = n.args[1] % max(len(_shape(n.args[0]) or (1,)), 1)
                add(n.args[at], n.args[0], dim, negative)
        elif n.target is aten.index.Tensor:
            for dim, idx in enumerate(n.args[1]):
                if idx is not None:
                    add(idx, n.args[0], dim, True)
    return tuple((p, size, neg) for (p, neg), size in sorted(found.items()))


def check_indices(args, checks) -> None:
    """Raise IndexOutOfRange where an index input holds a value outside its dim."""
    for p, size, negative in checks:
        t = args[p]
        if not t.numel():
            continue
        lo, hi = torch.aminmax(t)
        lo, hi = int(lo), int(hi)
        if hi >= size or lo < (-size if negative else 0):
            bad = hi if hi >= size else lo
            raise IndexOutOfRange(
                f"hwopt: index out of range in self: input {p} of a compiled region holds "
                f"{bad}, valid indices are {-size if negative else 0}..{size - 1} (PyTorch "
                "raises the same IndexError; TVM's code would read outside the tensor)")


def clip_takes(mod):
    """Relax ``take`` in mode "clip" instead of "fast" (a Relax phase of ``relax_import.prepare``).

    The importer emits "fast" (no index arithmetic), for which TVM warns at every lowering that
    out-of-range indices crash. Region inputs are checked above and computed indices are in
    range, so "clip" gives the same numbers; it adds a min/max per read, not measurable next to
    the gather's memory traffic, and makes an unguarded index clamp instead of crash.
    """
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    pattern = is_op("relax.take")(wildcard(), wildcard())

    def clip(orig, _):
        if orig.attrs.mode != "fast":
            return orig
        return relax.op.take(orig.args[0], orig.args[1], axis=orig.attrs.axis, mode="clip")

    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gv] = rewrite_call(pattern, clip, func)
    return mod
