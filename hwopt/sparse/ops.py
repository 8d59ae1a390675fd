"""``hwopt::sparse_conv2d`` and ``hwopt::sparse_linear``: layers with compact pruned weights.

What the ``prune`` pass rewrites pruned layers into, and what ``hwopt.lowering.sparse`` lowers to
the sparse TVM kernel. Their PyTorch implementation is the exact reference: the compact weights
scattered back to a dense tensor, then the dense op (so eager mode, and regions that fall back to
PyTorch, compute the same values as the pruned dense layer).
"""
from __future__ import annotations

import torch

aten = torch.ops.aten


def _dense(w: torch.Tensor, chan: torch.Tensor, tap: torch.Tensor, k: int, taps: int):
    cols = (chan.long() * taps + tap.long()).repeat_interleave(w.shape[0] // chan.shape[0], 0)
    return torch.zeros(w.shape[0], k * taps, dtype=w.dtype).scatter_add_(1, cols, w)


@torch.library.custom_op("hwopt::sparse_conv2d", mutates_args=())
def sparse_conv2d(x: torch.Tensor, w: torch.Tensor, chan: torch.Tensor, tap: torch.Tensor,
                  bias: torch.Tensor | None, kernel: list[int], stride: list[int],
                  padding: list[int], dilation: list[int]) -> torch.Tensor:
    """NCHW conv2d whose weight is ``w [O, J]`` at input channel ``chan`` and position ``tap``
    (``[O / g, J]``: each group of g consecutive output channels reads the same entries)."""
    kh, kw = kernel
    dense = _dense(w, chan, tap, x.shape[1], kh * kw).reshape(w.shape[0], x.shape[1], kh, kw)
    return aten.convolution.default(x, dense, bias, stride, padding, dilation, False, [0, 0], 1)


@sparse_conv2d.register_fake
def _(x, w, chan, tap, bias, kernel, stride, padding, dilation):
    kh, kw = kernel
    dense = x.new_empty((w.shape[0], x.shape[1], kh, kw))
    return aten.convolution.default(x, dense, None, stride, padding, dilation, False, [0, 0], 1)


@torch.library.custom_op("hwopt::sparse_linear", mutates_args=())
def sparse_linear(x: torch.Tensor, w: torch.Tensor, chan: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """``x [M, K] @ W^T (+ bias)`` where row o of W keeps ``w[o, j]`` at input
    ``chan[o // g, j]`` (``chan``: ``[O / g, J]``)."""
    dense = _dense(w, chan, torch.zeros_like(chan), x.shape[1], 1)
    y = aten.mm.default(x, dense.t())
    return y + bias if bias is not None else y


@sparse_linear.register_fake
def _(x, w, chan, bias):
    return x.new_empty((x.shape[0], w.shape[0]))
