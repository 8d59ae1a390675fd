"""Test helper: write Q/DQ int8 layers into small graphs per the quantized-graph contract.

Stands in for the ``quantize`` pass in target tests, so they do not depend on it: every conv /
addmm / mm with a constant weight becomes dq(activation) + dq(per-channel int8 weight) -> op
[-> relu/hardtanh] -> quantize_per_tensor -> dequantize_per_tensor, with activation ranges from
running the float graph on the given batches (min/max, affine int8) and symmetric weights.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.ao.quantization.fx import _decomposed  # noqa: F401  registers quantized_decomposed

from hwopt.graph import add_constant, constant_value, propagate_meta

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
ANCHORS = (aten.convolution.default, aten.addmm.default, aten.mm.default)
ACTS = (aten.relu.default, aten.hardtanh.default)


class _Ranges(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.lo, self.hi = {}, {}

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            lo, hi = float(out.min()), float(out.max())
            self.lo[n.name] = min(lo, self.lo.get(n.name, lo))
            self.hi[n.name] = max(hi, self.hi.get(n.name, hi))
        return out


def act_qparams(lo: float, hi: float) -> tuple[float, int]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255 or 1.0
    zp = int(max(-128, min(127, round(-128 - lo / scale))))
    return scale, zp


def _qdq(gm, node, scale, zp, users) -> fx.Node:
    g = gm.graph
    with g.inserting_after(node):
        q = g.call_function(qd.quantize_per_tensor.default,
                            (node, scale, zp, -128, 127, torch.int8))
    with g.inserting_after(q):
        dq = g.call_function(qd.dequantize_per_tensor.default,
                             (q, scale, zp, -128, 127, torch.int8))
    for u in users:
        u.replace_input_with(node, dq)
    return dq


def _weight(gm, anchor):
    idx = 2 if anchor.target is aten.addmm.default else 1
    w_node = anchor.args[idx]
    w = constant_value(gm, w_node).detach().float()
    axis = 0 if anchor.target is aten.convolution.default else 1  # addmm/mm weight is [K, N]
    dims = [d for d in range(w.dim()) if d != axis]
    scale = (w.abs().amax(dim=dims) / 127).clamp_min(1e-8)
    shape = [1] * w.dim()
    shape[axis] = -1
    w_q = torch.round(w / scale.reshape(shape)).clamp(-127, 127).to(torch.int8)
    wq = add_constant(gm, w_q, anchor, "w_q")
    sc = add_constant(gm, scale, anchor, "w_scale")
    zp = add_constant(gm, torch.zeros_like(scale, dtype=torch.int64), anchor, "w_zp")
    with gm.graph.inserting_before(anchor):
        dq = gm.graph.call_function(qd.dequantize_per_channel.default,
                                    (wq, sc, zp, axis, -127, 127, torch.int8))
    anchor.replace_input_with(w_node, dq)


def quantize_graph(gm: fx.GraphModule, batches: list[tuple]) -> fx.GraphModule:
    """Insert Q/DQ around every conv/matmul of `gm` (in place); `batches` calibrate ranges."""
    rec = _Ranges(gm)
    with torch.no_grad():
        for b in batches:
            rec.run(*b)
    for anchor in [n for n in gm.graph.nodes if n.target in ANCHORS]:
        _weight(gm, anchor)
        act = anchor.args[1] if anchor.target is aten.addmm.default else anchor.args[0]
        if act.target is not qd.dequantize_per_tensor.default:
            s, zp = act_qparams(rec.lo[act.name], rec.hi[act.name])
            _qdq(gm, act, s, zp, [anchor])
        end = anchor
        if len(anchor.users) == 1 and next(iter(anchor.users)).target in ACTS:
            end = next(iter(anchor.users))
        s, zp = act_qparams(rec.lo[end.name], rec.hi[end.name])
        _qdq(gm, end, s, zp, list(end.users))
    gm.graph.lint()
    gm.recompile()
    propagate_meta(gm, batches[0])
    return gm
