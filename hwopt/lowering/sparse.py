"""Pruned layers into TVM: ``hwopt::sparse_conv2d`` / ``hwopt::sparse_linear`` -> one sparse kernel.

Sits in the *lower* step: `CONVERTERS` joins the ``custom_convert_map`` of the Relax import
(``hwopt.lowering.relax_import``), next to the int8 converters of ``hwopt.lowering.qdq``.

Both ops become the same TIR kernel (`sparse_kernel`), NCHW, vectorized along the output width:

    y[n, o, h, x] = sum_j w[o, j] * xp[n, chan[o, j], h*sh + dy[o, j], x*sw + dx[o, j]]

with ``xp`` the zero-padded input and ``dy, dx`` the offsets of entry j's kernel tap. The kernel
reads ``xp`` flattened, through one precomputed offset per entry (folded at compile time from
channel, tap and dilation): an entry costs one index load and one weight broadcast. Each output
row reads only its kept entries (``J``: 4 per kept kernel for pattern pruning, N/M of the inputs
for N:M), so skipped kernels are never touched; for a fixed (o, j) the inputs of consecutive
output pixels are contiguous, so the inner loop is a plain vector FMA, no per-element index.
A linear layer is the 1x1 case on ``x^T`` (tokens along the width). The width is padded to whole
vectors and cropped after. ``hwopt.schedules.sparse`` schedules the kernel. Layers whose filters
share their entries in blocks of 4 or more (the prune pass's default) go to the filter-vectorized
kernels of ``hwopt.lowering.sparse_block`` instead.
"""
from __future__ import annotations

import numpy as np

from hwopt.lowering import sparse_block

ACC_BLOCK = "hwopt_sparse_acc"  # the schedule rule finds the kernel by this block name
LANES = 8  # output width is padded to a multiple of this (>= the vector width in use)


def sparse_kernel(xf, w, off, bias, out_hw: tuple[int, int], stride: tuple[int, int],
                  row: int):
    """TE: the sparse conv over the flattened padded input ``xf [N, C*Hp*Wp]`` (row length
    ``row`` = Wp); ``off[o, j]`` is entry j's flat offset ``chan*Hp*Wp + dy*Wp + dx``."""
    from tvm import te

    n, o = xf.shape[0], w.shape[0]
    g = int(o) // int(off.shape[0])  # rows sharing their entries
    ho, wo = out_hw
    sh, sw = stride
    j = te.reduce_axis((0, w.shape[1]), name="j")
    acc = te.compute(
        (n, o, ho, wo),
        lambda b, f, h, x: te.sum(
            w[f, j] * xf[b, off[f // g if g > 1 else f, j] + h * (sh * row) + x * sw], axis=j),
        name=ACC_BLOCK, attrs={"hwopt_group": g})
    if bias is None:
        return acc
    return te.compute(acc.shape, lambda b, f, h, x: acc[b, f, h, x] + bias[f],
                      name="hwopt_sparse_bias")


def sparse_kernel_batch(xf, w, off, bias, out_hw: tuple[int, int], stride: tuple[int, int],
                        row: int, nb: int):
    """TE: the sparse conv with the batch innermost: ``xf`` is ``[1, C*Hp*Wp*nb]`` (CHWN), the
    output ``[1, O, Ho*Wo, nb]``; vectors run over images (small maps, large batches)."""
    from tvm import te

    o = w.shape[0]
    g = int(o) // int(off.shape[0])
    ho, wo = out_hw
    sh, sw = stride
    j = te.reduce_axis((0, w.shape[1]), name="j")
    acc = te.compute(
        (1, o, ho * wo, nb),
        lambda b, f, p, x: te.sum(
            w[f, j] * xf[b, off[f // g if g > 1 else f, j]
                         + ((p // wo) * (sh * row) + (p % wo) * sw) * nb + x], axis=j),
        name=ACC_BLOCK, attrs={"hwopt_group": g})
    if bias is None:
        return acc
    return te.compute(acc.shape, lambda b, f, p, x: acc[b, f, p, x] + bias[f],
                      name="hwopt_sparse_bias")


def _offsets(bb, chan, tap, kw: int, dilation, hp: int, wp: int, scale: int = 1):
    """Flat input offset of every entry: ``((chan*Hp + ky*dil)*Wp + kx*dil) * scale``.

    Constants are bound after conversion; FoldConstant folds this at compile time."""
    from tvm import relax

    def i32(v):
        return relax.const(v, "int32")

    dy = relax.op.multiply(relax.op.floor_divide(tap, i32(kw)), i32(dilation[0] * wp))
    dx = relax.op.multiply(relax.op.floor_mod(tap, i32(kw)), i32(dilation[1]))
    off = relax.op.add(relax.op.multiply(chan, i32(hp * wp)), relax.op.add(dy, dx))
    return bb.emit(relax.op.multiply(off, i32(scale)) if scale != 1 else off)


def _emit_batch_inner(imp, x, shape, w, chan, tap, bias, kernel, stride, padding, dilation,
                      out_hw, o: int):
    """Small maps, batch >= a vector: NCHW -> padded CHWN, the batch-innermost kernel, NCHW."""
    from tvm import relax

    bb = imp.block_builder
    n, c, h, wd = shape
    nb = -(-n // LANES) * LANES
    hp, wp = h + 2 * padding[0], wd + 2 * padding[1]
    off = _offsets(bb, chan, tap, kernel[1], dilation, hp, wp, nb)
    xp = relax.op.nn.pad(x, [0, nb - n, 0, 0, padding[0], padding[0], padding[1], padding[1]])
    xf = bb.emit(relax.op.reshape(relax.op.permute_dims(xp, [1, 2, 3, 0]), (1, c * hp * wp * nb)))
    y = bb.emit_te(sparse_kernel_batch, xf, w, off, bias, out_hw, tuple(stride), wp, nb,
                   primfunc_name_hint="hwopt_sparse")
    if nb != n:
        y = bb.emit(relax.op.strided_slice(y, axes=[3], begin=[0], end=[n]))
    y = relax.op.reshape(y, (o, out_hw[0], out_hw[1], n))
    return bb.emit(relax.op.permute_dims(y, [3, 0, 1, 2]))


def _emit(imp, x, shape, w, chan, tap, bias, kernel, stride, padding, dilation, o=None):
    """Pad, run the sparse kernel, crop: NCHW ``x`` of ``shape`` in, NCHW out."""
    from tvm import relax

    bb = imp.block_builder
    n, c, h, wd = shape
    kh, kw = kernel
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if o is not None and n >= LANES and wo < 2 * LANES:
        return _emit_batch_inner(imp, x, shape, w, chan, tap, bias, kernel, stride, padding,
                                 dilation, (ho, wo), o)
    wo_pad = -(-wo // LANES) * LANES
    extra = (wo_pad - wo) * stride[1]  # extra zero columns read by the padded outputs
    hp, wp = h + 2 * padding[0], wd + 2 * padding[1] + extra
    off = _offsets(bb, chan, tap, kw, dilation, hp, wp)
    xp = x
    if any(padding) or extra:
        xp = relax.op.nn.pad(x, [0, 0, 0, 0, padding[0], padding[0], padding[1],
                                 padding[1] + extra])
    xf = bb.emit(relax.op.reshape(xp, (n, c * hp * wp)))
    y = bb.emit_te(sparse_kernel, xf, w, off, bias, (ho, wo_pad), tuple(stride), wp,
                   primfunc_name_hint="hwopt_sparse")
    if wo_pad != wo:
        y = bb.emit(relax.op.strided_slice(y, axes=[3], begin=[0], end=[wo]))
    return y


def _shape(arg) -> tuple[int, ...]:
    return tuple(int(v) for v in arg.meta["val"].shape)


def _group(node) -> int:
    """Consecutive output channels sharing their entries: O / rows of the index table."""
    return int(node.args[1].meta["val"].shape[0]) // int(node.args[2].meta["val"].shape[0])


def _sparse_conv2d(node, imp):
    x, w, chan, tap, bias, kernel, stride, padding, dilation = imp.retrieve_args(node)
    shape = tuple(int(s) for s in node.args[0].meta["val"].shape)
    o = int(node.args[1].meta["val"].shape[0])
    g = _group(node)
    if g >= sparse_block.MIN_GROUP:
        return sparse_block.emit_conv(imp, x, shape, w, _shape(node.args[1]), chan, tap, bias,
                                      kernel, stride, padding, dilation, g)
    return _emit(imp, x, shape, w, chan, tap, bias, kernel, stride, padding, dilation, o)


def _sparse_linear(node, imp):
    from tvm import relax

    bb = imp.block_builder
    x, w, chan, bias = imp.retrieve_args(node)
    g = _group(node)
    if g >= sparse_block.MIN_GROUP:
        return sparse_block.emit_linear(imp, x, w, _shape(node.args[1]), chan, bias, g)
    m, k = (int(s) for s in node.args[0].meta["val"].shape)
    xt = bb.emit(relax.op.reshape(relax.op.permute_dims(x, [1, 0]), (1, k, 1, m)))
    tap = relax.const(np.zeros(tuple(node.args[2].meta["val"].shape), dtype="int32"))
    y = _emit(imp, xt, (1, k, 1, m), w, chan, tap, None, (1, 1), (1, 1), (0, 0), (1, 1))
    o = int(node.args[1].meta["val"].shape[0])
    y = bb.emit(relax.op.permute_dims(relax.op.reshape(y, (o, m)), [1, 0]))
    return bb.emit(relax.op.add(y, bias)) if bias is not None else y


CONVERTERS = {
    "sparse_conv2d.default": _sparse_conv2d,
    "sparse_linear.default": _sparse_linear,
}
