"""Pruned layers whose filters share their kept entries in blocks: the filter-vectorized kernels.

Sits in the *lower* step, called by ``hwopt.lowering.sparse`` for a ``hwopt::sparse_conv2d`` /
``hwopt::sparse_linear`` whose entries are shared by groups of ``g >= MIN_GROUP`` consecutive
output channels (what the ``prune`` pass makes by default: masks chosen per block of filters).
Then the kernel is a dense-like register tile: the ``g`` filters of a block are the vector lanes,

    conv (NHWC): y[n, h, w, o] = sum_j W[o // g, j, o % g] * x[n, h*sh + dy_j, w*sw + dx_j, c_j]
    linear:      y[m, o]       = sum_j W[o // g, j, o % g] * x[m, c_j]

so an entry costs one weight vector load (the block's g weights, contiguous) and one broadcast
input value per output pixel / row of the tile, the same as hwopt's dense conv and matmul
kernels: the kernel runs at the dense FLOP rate and its time falls with the density. The conv
input is made NHWC and padded, then read flattened through one precomputed offset per entry
(``(dy * Wp + dx) * C + c``, folded at compile time). ``hwopt.schedules.sparse_block`` schedules
both kernels.
"""
from __future__ import annotations

MIN_GROUP = 4  # blocks this size or larger use these kernels (vectors of 4-16 lanes)
CONV_BLOCK = "hwopt_sparse_block_conv"
LINEAR_BLOCK = "hwopt_sparse_block_linear"


def block_conv_kernel(xf, w, off, bias, out_hw: tuple[int, int], stride: tuple[int, int],
                      row: int, chans: int):
    """TE: ``xf [N, Hp*Wp*C]`` (NHWC, padded, flat; ``row`` = Wp), ``w [O/g, J, g]``,
    ``off [O/g, J]`` -> NHWC ``[N, Ho, Wo, O]`` (+ bias)."""
    from tvm import te

    n = xf.shape[0]
    ob, nj, g = (int(v) for v in w.shape)
    ho, wo = out_hw
    sh, sw = stride
    j = te.reduce_axis((0, nj), name="j")
    acc = te.compute(
        (n, ho, wo, ob * g),
        lambda b, h, x, o: te.sum(
            w[o // g, j, o % g] * xf[b, (h * (sh * row) + x * sw) * chans + off[o // g, j]],
            axis=j),
        name=CONV_BLOCK)
    if bias is None:
        return acc
    return te.compute(acc.shape, lambda b, h, x, o: acc[b, h, x, o] + bias[o],
                      name="hwopt_sparse_block_bias")


def block_linear_kernel(x, w, chan, bias):
    """TE: ``x [M, K]``, ``w [O/g, J, g]``, ``chan [O/g, J]`` -> ``[M, O]`` (+ bias)."""
    from tvm import te

    m = x.shape[0]
    ob, nj, g = (int(v) for v in w.shape)
    j = te.reduce_axis((0, nj), name="j")
    acc = te.compute((m, ob * g),
                     lambda r, o: te.sum(w[o // g, j, o % g] * x[r, chan[o // g, j]], axis=j),
                     name=LINEAR_BLOCK)
    if bias is None:
        return acc
    return te.compute(acc.shape, lambda r, o: acc[r, o] + bias[o], name="hwopt_sparse_block_bias")


def _blocked(bb, w, wshape, g: int):
    """``[O, J]`` compact weights -> ``[O/g, J, g]`` (the block's weights of an entry adjacent)."""
    from tvm import relax

    o, nj = wshape
    return bb.emit(relax.op.permute_dims(relax.op.reshape(w, (o // g, g, nj)), [0, 2, 1]))


def emit_conv(imp, x, shape, w, wshape, chan, tap, bias, kernel, stride, padding, dilation,
              g: int):
    """NCHW ``x`` in, NCHW out; NHWC inside (``hwopt.lowering.transposes`` cancels the transposes
    between NHWC layers)."""
    from tvm import relax

    bb = imp.block_builder
    n, c, h, wd = shape
    kh, kw = kernel
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    hp, wp = h + 2 * padding[0], wd + 2 * padding[1]

    def i32(v):
        return relax.const(v, "int32")

    dy = relax.op.multiply(relax.op.floor_divide(tap, i32(kw)), i32(dilation[0] * wp * c))
    dx = relax.op.multiply(relax.op.floor_mod(tap, i32(kw)), i32(dilation[1] * c))
    off = bb.emit(relax.op.add(chan, relax.op.add(dy, dx)))
    nhwc = bb.emit(relax.op.permute_dims(x, [0, 2, 3, 1]))
    if any(padding):
        nhwc = bb.emit(relax.op.nn.pad(nhwc, [0, 0, padding[0], padding[0], padding[1],
                                              padding[1], 0, 0]))
    xf = bb.emit(relax.op.reshape(nhwc, (n, hp * wp * c)))
    y = bb.emit_te(block_conv_kernel, xf, _blocked(bb, w, wshape, g), off, bias, (ho, wo),
                   tuple(stride), wp, c, primfunc_name_hint="hwopt_sparse_block")
    return bb.emit(relax.op.permute_dims(y, [0, 3, 1, 2]))


def emit_linear(imp, x, w, wshape, chan, bias, g: int):
    bb = imp.block_builder
    return bb.emit_te(block_linear_kernel, x, _blocked(bb, w, wshape, g), chan, bias,
                      primfunc_name_hint="hwopt_sparse_block")
