"""Bit-exact host simulation of the ``fpga`` target's int8 kernels.

Runs on this machine what the generated C kernels (`hwopt.fpga.codegen`) compute, with the same
integer arithmetic (see `hwopt.fpga.int8layer`): int8 x int8 products summed in int32, then the
int64 fixed-point requantization of `hwopt.fpga.requant`. The accumulation runs as a float64
convolution / matmul: every product and partial sum is an integer below 2^53, so float64 holds
it exactly and the result does not depend on the summation order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hwopt.fpga.int8layer import Int8Layer
from hwopt.fpga.requant import requantize


def accumulate(layer: Int8Layer, x_q: torch.Tensor) -> torch.Tensor:
    """int64 accumulators ``acc + B`` of `layer` on int8 input `x_q` (its arriving shape)."""
    if x_q.dtype != torch.int8:
        raise TypeError(f"fpga layer {layer.name} expects an int8 input, got {x_q.dtype}")
    x = x_q.to(torch.float64)
    w = layer.weight.to(torch.float64)
    if layer.kind == "conv2d":
        ph, pw = layer.padding
        x = F.pad(x, (pw, pw, ph, ph), value=float(layer.zp_in))
        acc = F.conv2d(x, w, None, layer.stride, 0, layer.dilation, layer.groups)
        bias = layer.bias.to(torch.int64).view(1, -1, 1, 1)
    else:
        m, k = layer.gemm_io()
        acc = x.reshape(m, k) @ w.t()
        bias = layer.bias.to(torch.int64).view(1, -1)
    return acc.to(torch.int64) + bias


def run_layer(layer: Int8Layer, x_q: torch.Tensor) -> torch.Tensor:
    """The int8 output of `layer` (shaped like the graph's quantize node) for int8 `x_q`."""
    acc = accumulate(layer, x_q)
    shape = (1, -1, 1, 1) if layer.kind == "conv2d" else (1, -1)
    y = requantize(acc, layer.mult.view(shape), layer.shift.view(shape), layer.zp_out,
                   layer.lo, layer.hi)
    return y.reshape(layer.out_shape)
