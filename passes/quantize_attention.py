"""quantize, last step: fused attention on int8 q/k/v becomes ``hwopt::qattention``.

Runs inside the ``quantize`` pass after its layers are rewritten (passes/quantize.py). A fused
``hwopt::attention`` (passes/fuse_attention.py) whose q, k and v are each an int8 layer output
seen through ops that only move elements (``moves(DQ(x_q))``: the per-head view/permute of the
projections) is replaced by ``hwopt::qattention`` on the int8 values through the same moves,
with their scales and zero points (hwopt.lowering.qattention: both matmuls integer, the
exponentials stored as uint8). No new observer is needed: the inputs are the layers' int8
outputs. Kept fp32 when the target has no int8 compute, its cost model predicts no gain, or the
attention output's SQNR on the calibration data (int8 vs the fp32 attention of the same
dequantized inputs) falls below ``min_sqnr_db``.
"""
from __future__ import annotations

import torch
import torch.fx as fx

import hwopt.lowering.qattention  # noqa: F401  (registers torch.ops.hwopt.qattention)
from hwopt.lowering.qdq import _MOVES, _is, per_tensor_int8
from hwopt.quant import QMAX, QMIN, sqnr

qd = torch.ops.quantized_decomposed
_SQNR_BATCHES = 4


def _int8_source(node):
    """(moves, DQ node) when `node` is ``moves(DQ(x_q))`` of a per-tensor int8 value, else None."""
    chain = []
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _MOVES:
        chain.append(node)
        node = node.args[0]
    if not per_tensor_int8(node, qd.dequantize_per_tensor.default):
        return None
    return chain, node


def candidates(gm: fx.GraphModule) -> list[tuple[fx.Node, list]]:
    """Every fused attention whose q, k, v are int8 values: (node, [(moves, DQ)] * 3)."""
    out = []
    for n in gm.graph.nodes:
        if not _is(n, torch.ops.hwopt.attention.default):
            continue
        srcs = [_int8_source(a) for a in n.args[:3]]
        if all(s is not None for s in srcs):
            out.append((n, srcs))
    return out


def _int8_args(node: fx.Node, srcs: list) -> tuple:
    """qattention's positional args (int8 q/k/v built by replaying the moves; no graph edit)."""
    mask = node.args[3] if len(node.args) > 3 else None
    scale = node.args[4] if len(node.args) > 4 else 1.0
    qparams = [(float(dq.args[1]), int(dq.args[2])) for _, dq in srcs]
    return mask, float(scale), qparams


def _replay(gm, chain: list, dq: fx.Node, where: fx.Node) -> fx.Node:
    """The moves of `chain` applied to the int8 value under `dq` (meta["val"] on meta tensors)."""
    src = dq.args[0]  # Q(y): int8 with the shape of y
    v = src.meta.get("val")
    if v is None and src.args and isinstance(src.args[0], fx.Node):
        v = src.args[0].meta.get("val")
    val = torch.empty(v.shape, dtype=torch.int8, device="meta") if v is not None else None
    with gm.graph.inserting_before(where):
        for op in reversed(chain):
            src = gm.graph.call_function(op.target, (src, *op.args[1:]), dict(op.kwargs))
            if val is not None:
                val = op.target(val, *op.args[1:], **op.kwargs)
                src.meta["val"] = val
    return src


def rewrite(gm: fx.GraphModule, node: fx.Node, srcs: list) -> fx.Node:
    mask, scale, ((qs, qz), (ks, kz), (vs, vz)) = _int8_args(node, srcs)
    q, k, v = (_replay(gm, chain, dq, node) for chain, dq in srcs)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(torch.ops.hwopt.qattention.default,
                                     (q, k, v, mask, scale, qs, qz, ks, kz, vs, vz))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


class _Inputs(fx.Interpreter):
    """Records the argument values of the given attention nodes."""

    def __init__(self, gm, nodes):
        super().__init__(gm)
        self.nodes, self.seen = set(nodes), {n: [] for n in nodes}

    def run_node(self, n):
        if n in self.nodes:
            args, _ = self.fetch_args_kwargs_from_env(n)
            self.seen[n].append(args)
        return super().run_node(n)


def attention_sqnr(gm: fx.GraphModule, found: list, batches) -> dict:
    """SQNR (dB) of each attention's int8 form against its fp32 form, same dequantized inputs."""
    rec = _Inputs(gm, [n for n, _ in found])
    with torch.no_grad():
        for batch in list(batches)[:_SQNR_BATCHES]:
            rec.run(*batch)
    out = {}
    for n, srcs in found:
        _, scale, qparams = _int8_args(n, srcs)
        refs, tests = [], []
        for q, k, v, *rest in rec.seen[n]:
            mask = rest[0] if rest else None
            refs.append(torch.ops.hwopt.attention.default(q, k, v, mask, scale).flatten())
            ints = [torch.clamp(torch.round(t / s) + z, QMIN, QMAX).to(torch.int8)
                    for t, (s, z) in zip((q, k, v), qparams)]
            tests.append(torch.ops.hwopt.qattention.default(
                *ints, mask, scale, *[x for p in qparams for x in p]).flatten())
        out[n] = sqnr(torch.cat(refs), torch.cat(tests)) if refs else float("inf")
    return out
