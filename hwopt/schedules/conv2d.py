"""Schedule rule for NHWC/HWIO conv2d (plain, grouped, depthwise) with a fused elementwise epilogue.

Template: the epilogue (BatchNorm, bias, activation) is inlined into the write-back of a
``cache_write`` register tile of ``reg_w`` output columns x ``oc_block`` output channels; loops run
(n, h, oc-outer, w-outer, kh, kw, ic, w-inner, oc-inner), the fused outer loops in parallel, the
w-inner loop unrolled and oc-inner vectorized by ``lanes``.  With ``pack=1`` (the default unless
depthwise) the HWIO weights are first copied to (oc/oc_block, kh, kw, ic, oc_block), so a tile
streams one contiguous weight slab instead of ``oc_block``-wide pieces 4*oc bytes apart (about
1.5x on 3x3 convs with 128+ channels on AVX2; the copy is ~1% of the conv).  Needs the layout from
``hwopt.lowering.relax_import.prepare`` (NHWC data, HWIO weights).
"""
from __future__ import annotations

import math

from tvm import s_tir, tirx

from .common import (
    block_name,
    blocks,
    extents,
    iter_kinds,
    parallel_outer,
    reuse,
    tile_fits,
    vectorize_tail,
)

PREPACK = "meta_schedule.layout_rewrite_preproc"
_OC_BLOCKS = (64, 32, 128, 48, 96, 16)
_REG_W = (7, 8, 14, 4, 6, 3, 5, 16, 28, 2, 1)


def _rank(lanes: int, depthwise: bool):
    """Sort key of the (oc_block, reg_w) candidates, best first.

    AVX2: most FMAs per load first, among equals the wider w tile (measured on Zen 3). AVX-512
    (measured on Zen 5, full-width 512-bit FMAs, every candidate of every zoo conv timed): tiles
    of 12-16 accumulators in two weight vectors per row won (32x7 / 32x8: 5-12 % faster than
    one vector x 14 rows on the CNN and MobileNet, up to 1.7x on the digits CNN's 4-wide rows,
    where 64x4 won); 28 accumulators (32x14) lost up to 1.6x on pointwise convs whose weights
    are not packed. Depthwise tiles, which reuse nothing across channels, were fastest with up
    to 8 accumulators in two vectors per row (the reuse order was up to 2x slower there).
    """
    def key(c):
        vecs, rw = max(c["oc_block"] // lanes, 1), c["reg_w"]
        if lanes == 16 and depthwise:
            return (rw * vecs > 8, abs(vecs - 2), abs(rw - 3))
        if lanes == 16:
            return (not 12 <= rw * vecs <= 16, abs(vecs - 2), abs(rw - 7))
        return (-round(reuse(rw, vecs), 1), -rw)

    return key


def _conv_block(sch: s_tir.Schedule):
    for b in blocks(sch):
        if iter_kinds(sch, b) == "SSSSRRR" and "nhwc" in block_name(sch, b):
            return b
    return None


class Conv2dNHWC:
    """NHWC conv2d + epilogue, register-tiled over (w, oc)."""

    name = "conv2d_nhwc"

    def match(self, func: tirx.PrimFunc) -> bool:
        return _conv_block(s_tir.Schedule(func)) is not None

    def candidates(self, func: tirx.PrimFunc, lanes: int) -> list[dict]:
        sch = s_tir.Schedule(func)
        _, _, w, oc, kh, kw, ic = extents(sch, sch.get_loops(_conv_block(sch)))
        # Packed weights pay off when each tile reads a long weight slab (not depthwise).
        pack = int(kh * kw * ic >= 16)
        if oc % lanes:
            oc_blocks = [oc]
        else:
            oc_blocks = [b for b in _OC_BLOCKS if b % lanes == 0 and oc % b == 0] or [oc]
        cands = []
        for ob in oc_blocks:
            vecs = max(ob // lanes, 1)
            for rw in _REG_W:
                if w % rw == 0 and tile_fits(rw, vecs, lanes):
                    cands.append({"oc_block": ob, "reg_w": rw, "pack": pack})
        cands.sort(key=_rank(lanes, depthwise=not pack))
        return cands[:12]

    def apply(self, func: tirx.PrimFunc, params: dict, lanes: int) -> tirx.PrimFunc:
        ob, rw = params["oc_block"], params["reg_w"]
        sch = s_tir.Schedule(func)
        conv = _conv_block(sch)
        names = [block_name(sch, b) for b in blocks(sch)]
        pos = names.index(block_name(sch, conv))
        pre, epi = names[:pos], names[pos + 1:]
        for name in epi[:-1]:
            sch.compute_inline(sch.get_sblock(name))
        n, h, w, oc, rh, rw_, rc = sch.get_loops(conv)
        cache = sch.cache_write(conv, 0, "global")
        if epi:
            sch.reverse_compute_inline(sch.get_sblock(epi[-1]))
        wo, wi = sch.split(w, [None, rw])
        oco, oci = sch.split(oc, [None, ob])
        sch.reorder(n, h, oco, wo, rh, rw_, rc, wi, oci)
        sch.reverse_compute_at(cache, wo)
        sch.parallel(sch.fuse(n, h, oco))
        sch.unroll(wi)
        if ob % lanes == 0 and ob > lanes:
            vo, vi = sch.split(oci, [None, lanes])
            sch.unroll(vo)
            sch.vectorize(vi)
        else:
            sch.vectorize(oci)
        sch.decompose_reduction(conv, rh)
        vectorize_tail(sch, sch.get_loops(cache)[-1], lanes)
        if params.get("pack", 0):
            _pack_weights(sch, conv, ob, lanes)
        for name in pre:
            _schedule_pad(sch, sch.get_sblock(name), lanes)
        return sch.mod["main"]


def _pack_weights(sch: s_tir.Schedule, conv, ob: int, lanes: int) -> None:
    """Copy the HWIO weights into (oc/ob, kh, kw, ic, ob) so one tile's weights are contiguous."""
    blk = sch.get(conv)
    f = blk.iter_vars[3].var
    idx = next(n for n, r in enumerate(blk.reads)
               if not r.source.same_as(blk.writes[0].source)
               and r.region[-1].min.same_as(f))
    wb = sch.cache_read(conv, idx, "global")
    sch.transform_layout(wb, ("write", 0),
                         lambda a, b, c, d: (d // ob, a, b, c, d % ob))
    # Constant weights: `prepack_weights` moves this copy out and Relax folds it at compile time.
    sch.annotate(wb, PREPACK, 1)
    loops = sch.get_loops(wb)
    sizes = extents(sch, loops)
    total = math.prod(sizes)
    vectorize_tail(sch, loops[-1], lanes)
    parallel_outer(sch, sch.get_loops(wb)[:1], total)


def _schedule_pad(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Padding / layout producer of the conv input: parallel rows, vector channels."""
    loops = sch.get_loops(block)
    sizes = extents(sch, loops)
    total = math.prod(sizes)
    vectorize_tail(sch, loops[-1], lanes)
    parallel_outer(sch, loops[:2], total)
