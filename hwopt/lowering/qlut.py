"""int8 -> int8 elementwise functions as 256-entry lookup tables (lower step, before Relax import).

In a quantized graph an activation between two int8 layers reads as ``Q(f(DQ(x_q)))`` (GELU
between a transformer's two MLP linears). Its result depends only on the 256 values of the int8
input, so `fold_tables` replaces it (any elementwise ops of that one input, up to 16) by
``hwopt::int8_lut(x_q, table)`` whose table is that very computation run by PyTorch on all 256
inputs: bit-exact to the fake-quant graph, and the kernel
does one gather per element instead of evaluating erf (the GELU epilogue cost ViT's first MLP
linear 55 of 135 us). Runs in ``relax_import.to_relax`` after ``qdq.fuse_int8_layers``.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from hwopt.graph import add_constant
from hwopt.lowering.qdq import QMAX, QMIN, per_tensor_int8

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
# Elementwise ops; a table region is made of these (constant scalar args) over one DQ.
UNARY = {aten.gelu.default, aten.tanh.default, aten.sigmoid.default, aten.silu.default,
         aten.erf.default, aten.hardswish.default, aten.hardsigmoid.default, aten.elu.default,
         aten.leaky_relu.default, aten.softplus.default, aten.mish.default, aten.exp.default,
         aten.relu.default, aten.hardtanh.default, aten.neg.default, aten.abs.default}


@torch.library.custom_op("hwopt::int8_lut", mutates_args=())
def int8_lut(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``table[x + 128]`` for int8 `x` and a 256-entry int8 `table`."""
    return table[x.to(torch.int64) + 128]


@int8_lut.register_fake
def _(x, table):
    return torch.empty_like(x)


_BINARY = {aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.mul.Scalar,
           aten.add.Scalar, aten.sub.Scalar, aten.div.Scalar, aten.pow.Tensor_Scalar,
           aten.clamp.default, aten.minimum.default, aten.maximum.default, aten.where.self}


def _region(q: fx.Node):
    """(DQ node, nodes in order) when Q's input is elementwise ops of one per-tensor DQ, only
    used inside (``Q(f(DQ(x)))``; f e.g. GELU, or SiLU's ``x * sigmoid(x)``), else None."""
    nodes, dq, todo = set(), None, [q.args[0]]
    while todo:
        n = todo.pop()
        if n in nodes or n is dq:
            continue
        if per_tensor_int8(n, qd.dequantize_per_tensor.default):
            if dq is not None and n is not dq:
                return None
            dq = n
            continue
        if not (isinstance(n, fx.Node) and n.op == "call_function" and
                n.target in UNARY | _BINARY) or len(nodes) >= 16:
            return None
        nodes.add(n)
        todo += [a for a in (*n.args, *n.kwargs.values()) if isinstance(a, fx.Node)]
    if dq is None or any(u not in nodes and u is not q for n in nodes for u in n.users):
        return None
    return dq, [n for n in q.graph.nodes if n in nodes]


def _table(dq: fx.Node, nodes: list, q: fx.Node) -> torch.Tensor:
    """Q(f(DQ(x))) for the 256 int8 values x, computed by PyTorch with the graph's own ops."""
    env = {dq: qd.dequantize_per_tensor.default(torch.arange(QMIN, QMAX + 1, dtype=torch.int8),
                                                *dq.args[1:6])}
    with torch.no_grad():
        for n in nodes:
            args = fx.node.map_arg(n.args, lambda a: env[a])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
            env[n] = n.target(*args, **kwargs)
        return qd.quantize_per_tensor.default(env[q.args[0]], *q.args[1:6])


def fold_tables(gm: fx.GraphModule) -> int:
    """``Q(f(DQ(x_q)))`` with per-tensor int8 Q/DQ and f elementwise of x alone ->
    ``int8_lut``; returns the count."""
    count = 0
    for q in list(gm.graph.nodes):
        if not per_tensor_int8(q, qd.quantize_per_tensor.default):
            continue
        found = _region(q)
        if found is None:
            continue
        dq, nodes = found
        table = add_constant(gm, _table(dq, nodes, q), q, "lut")
        with gm.graph.inserting_before(q):
            new = gm.graph.call_function(torch.ops.hwopt.int8_lut.default, (dq.args[0], table))
        new.meta = dict(q.meta)
        q.replace_all_uses_with(new)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return count


def _lookup_te(x, table):
    from tvm import te, tirx

    from hwopt.schedules.lookup import BLOCK

    def at(*i):
        idx = tirx.Cast("int32", x(*i)) + 128
        return table[tirx.max(tirx.min(idx, 255), 0)]

    return te.compute(x.shape, at, name=BLOCK)


def _int8_lut(node, imp):
    """A lookup func of its own (kept out of fusion: hwopt.schedules.lookup rewrites it whole
    where the target has VBMI; else the injective rule schedules it)."""
    from hwopt.schedules import lookup

    bb = imp.block_builder
    x, table = imp.retrieve_args(node)
    call = bb.call_te(_lookup_te, x, table, primfunc_name_hint=lookup.NAME)
    gv = call.args[0]
    bb.update_func(gv, bb.get()[gv].with_attr("op_pattern", 8))  # kOpaque: not fused
    return bb.emit(call)


CONVERTERS = {"int8_lut.default": _int8_lut}
