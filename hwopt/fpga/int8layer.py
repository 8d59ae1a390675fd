"""One int8 layer of the ``fpga`` target, with the integers its kernel computes with.

Built from a `hwopt.fpga.layers.LayerMatch` and the graph's constants. The arithmetic (the same in
the simulator and in the generated C) is

    acc[p, o] = sum_k x_q[p, k] * w_q[o, k]                    int8 x int8 -> int32
    y[p, o]   = clamp(zp_out + ((acc + B[o]) * M[o] + 2^(S[o]-1)) >> S[o], lo, hi)   int64

with padding filled with ``zp_in`` (the int8 code of 0.0), ``B = round(bias / (s_in * s_w)) -
zp_in * sum_k w_q`` (the zero-point correction folded into the bias, so the array multiplies raw
int8 codes), ``(M, S) = quantize_multiplier(s_in * s_w / s_out)`` per output channel and
``[lo, hi]`` the output range narrowed by the fused activation (ReLU: lo = zp_out).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from hwopt.fpga.layers import LayerMatch, activation_bounds, arguments
from hwopt.fpga.requant import quantize_multiplier, quantize_value
from hwopt.fpga.systolic import GemmShape
from hwopt.graph import constant_value

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


class LayerError(ValueError):
    """The layer's constants cannot be expressed in the kernel's integer arithmetic."""


@dataclass
class Int8Layer:
    name: str
    kind: str  # "conv2d" | "linear"
    in_shape: tuple  # int8 input as it arrives
    out_shape: tuple  # int8 output (the quantize node's shape)
    weight: torch.Tensor  # int8 [O, Cin/g, kh, kw] or [N, K]
    bias: torch.Tensor  # int32 [O]: quantized bias + zero-point correction
    mult: torch.Tensor  # int32 [O]
    shift: torch.Tensor  # int32 [O]
    zp_in: int
    zp_out: int
    lo: int
    hi: int
    gemm: GemmShape
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
    scales: tuple = (1.0, 1.0)  # (s_in, s_out), for reports

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    def conv_io(self) -> tuple:
        """(N, C, H, W, Ho, Wo) of a conv layer."""
        n, c, h, w = self.in_shape
        return n, c, h, w, self.out_shape[2], self.out_shape[3]

    def gemm_io(self) -> tuple[int, int]:
        """(M, K) of a linear layer: the input flattened to rows."""
        return self.gemm.m, self.gemm.k


def build_layer(gm: fx.GraphModule, match: LayerMatch) -> Int8Layer:
    """The kernel parameters of `match`; raises LayerError when they do not fit the kernel."""
    din = arguments(match.dq_in)
    qout = arguments(match.q_out)
    s_in, zp_in = float(din["scale"]), int(din["zero_point"])
    s_out, zp_out = float(qout["scale"]), int(qout["zero_point"])
    weight, w_scale = _weight(gm, match)
    o = weight.shape[0]
    bias = (constant_value(gm, match.bias).detach().reshape(-1).double()
            if match.bias is not None else torch.zeros(o, dtype=torch.float64))
    if bias.numel() != o:
        raise LayerError(f"bias has {bias.numel()} elements for {o} output channels")
    eff = s_in * w_scale.double()  # real value of one accumulator unit, per channel
    if bool((eff <= 0).any()):
        raise LayerError("a weight scale is zero or negative")
    bias_q = torch.round(bias / eff).clamp(INT32_MIN, INT32_MAX).to(torch.int64)
    corr = zp_in * weight.reshape(o, -1).to(torch.int64).sum(1)
    b = bias_q - corr
    if bool((b < INT32_MIN).any() or (b > INT32_MAX).any()):
        raise LayerError("bias plus zero-point correction overflows int32")
    pairs = [quantize_multiplier(float(m)) for m in (eff / s_out).tolist()]
    lo, hi = int(qout["quant_min"]), int(qout["quant_max"])
    a_lo, a_hi = activation_bounds(match.out_chain)
    if a_lo > -float("inf"):
        lo = max(lo, quantize_value(a_lo, s_out, zp_out, lo, hi))
    if a_hi < float("inf"):
        hi = min(hi, quantize_value(a_hi, s_out, zp_out, lo, hi))
    layer = Int8Layer(
        name=match.name, kind=match.kind,
        in_shape=tuple(match.input_node.meta["val"].shape),
        out_shape=tuple(match.q_out.meta["val"].shape), weight=weight,
        bias=b.to(torch.int32), mult=torch.tensor([p[0] for p in pairs], dtype=torch.int32),
        shift=torch.tensor([p[1] for p in pairs], dtype=torch.int32), zp_in=zp_in,
        zp_out=zp_out, lo=lo, hi=hi, gemm=match.gemm(), scales=(s_in, s_out))
    if match.kind == "conv2d":
        a = match.anchor.args
        layer.stride, layer.padding, layer.dilation = tuple(a[3]), tuple(a[4]), tuple(a[5])
        layer.groups = int(a[8])
    return layer


def _weight(gm: fx.GraphModule, match: LayerMatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 weight as [O, ...] (output channel first) and its per-output-channel scale.

    The weight views between the dequantize and the conv/matmul are replayed on the int8 codes and
    on a tensor of channel ids, so that any transpose the graph applies is followed exactly.
    """
    a = arguments(match.dq_w)
    w_q = constant_value(gm, a["input"]).detach()
    scales = constant_value(gm, a["scales"]).detach().reshape(-1).float()
    zps = a["zero_points"]
    zps = (constant_value(gm, zps).detach().reshape(-1) if isinstance(zps, fx.Node)
           else torch.zeros_like(scales))
    axis = int(a["axis"]) % w_q.dim()
    shape = [1] * w_q.dim()
    shape[axis] = -1
    ids = torch.arange(w_q.shape[axis]).reshape(shape).expand(w_q.shape).contiguous()
    for view in match.w_views:
        w_q, ids = (view.target(t, *view.args[1:], **view.kwargs) for t in (w_q, ids))
    if match.anchor.target in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default):
        w_q, ids = w_q.t(), ids.t()  # [K, N] -> [N, K]
    w_q, ids = w_q.contiguous(), ids.contiguous()
    flat = ids.reshape(ids.shape[0], -1)
    if not bool((flat == flat[:, :1]).all()):
        raise LayerError("weight scales are not per output channel")
    chan = flat[:, 0]
    if bool((zps[chan] != 0).any()):
        raise LayerError("weight zero points are not 0 (symmetric int8 expected)")
    return w_q.to(torch.int8), scales[chan]
