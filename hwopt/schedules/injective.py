"""Schedule rule for funcs without reductions: elementwise, broadcast, transpose, reshape, take.

Inlines every intermediate block into its consumer, then for each output: vectorize the innermost
axis by ``lanes`` (a long ragged axis with a predicated last vector; the fused index when the axis
is short, or when a reshape's // and % would turn row vectors into gathers) and run the outer
loops in parallel when the tensor is large enough to pay for a thread launch.  A layout change
with a short innermost output axis (NCHW -> NHWC of 3 channels) vectorizes the next axis instead.
"""
from __future__ import annotations

import math

from tvm import s_tir, tirx

from .common import (
    blocks,
    extents,
    has_reduction,
    inline_producers,
    parallel_outer,
    vector_safe,
    vectorize_tail,
)


class Injective:
    """Elementwise / layout funcs: inline, vectorize, parallelize."""

    name = "injective"

    def match(self, func: tirx.PrimFunc) -> bool:
        return not has_reduction(func)

    def candidates(self, func: tirx.PrimFunc, lanes: int) -> list[dict]:
        return [{"parallel": 1, "tile_transpose": 1}, {"parallel": 1}, {"parallel": 0}]

    def apply(self, func: tirx.PrimFunc, params: dict, lanes: int) -> tirx.PrimFunc:
        sch = s_tir.Schedule(func)
        inline_producers(sch, keep=set())
        if params.get("tile_transpose"):
            sch = tile_transpose(sch, lanes)  # raises where it does not apply: next candidate
            return sch.mod["main"]
        for b in blocks(sch):
            schedule_spatial(sch, b, lanes, bool(params.get("parallel", 1)))
        return sch.mod["main"]


def tile_transpose(sch: s_tir.Schedule, lanes: int) -> s_tir.Schedule:
    """A copy whose innermost output axis walks a strided input axis (K^T, head splits): lanes x
    lanes tiles through a local buffer, read along the input's contiguous axis and written
    along the output's (2.2x faster than strided vector reads for [128,256] -> [4,64,128]).
    The reshape indices are simplified first so the tile's read region is affine."""
    from tvm import IRModule
    from tvm.tirx.analysis import undefined_vars

    mod = s_tir.transform.StmtSimplify()(IRModule({"main": sch.mod["main"]}))
    sch = s_tir.Schedule(mod["main"])
    (block,) = blocks(sch)
    blk = sch.get(block)
    if len(blk.reads) != 1 or len(blk.writes) != 1 or not isinstance(blk.body, tirx.BufferStore):
        raise ValueError("not a single copy")
    loops = sch.get_loops(block)
    ivars = [iv.var for iv in blk.iter_vars]
    if len(loops) != len(ivars) or len(loops) < 2:
        raise ValueError("loops are not the block's axes")
    region = blk.reads[0].region

    def uses(expr):
        return {v.name for v in undefined_vars(expr, [])}

    last, inner = uses(region[-1].min), ivars[-1].name
    feeding = [k for k, v in enumerate(ivars[:-1]) if v.name in last]
    if inner in last or not feeding or not any(inner in uses(r.min) for r in region[:-1]):
        raise ValueError("not a transposing copy")
    k = feeding[-1]
    sizes = extents(sch, loops)
    if sizes[-1] % lanes or sizes[k] % lanes or math.prod(sizes) < 4 * lanes * lanes:
        raise ValueError("tile does not divide the axes")
    ko, ki = sch.split(loops[k], [None, lanes])
    so, si = sch.split(loops[-1], [None, lanes])
    outer = [lp for j, lp in enumerate(loops[:-1]) if j != k]
    sch.reorder(*outer, ko, so, ki, si)
    local = sch.cache_read(block, 0, "local")
    sch.compute_at(local, so)
    sch.vectorize(sch.get_loops(local)[-1])
    sch.unroll(ki)
    sch.vectorize(si)
    parallel_outer(sch, [*outer, ko, so], math.prod(sizes))
    return sch


def schedule_spatial(sch: s_tir.Schedule, block, lanes: int, parallel: bool = True) -> None:
    """Vectorize the innermost axis and parallelize the rest of one spatial block."""
    loops = sch.get_loops(block)
    if not loops:
        return
    sizes = extents(sch, loops)
    total = math.prod(sizes)
    if _transposed_short_inner(sch, block, lanes):
        *rest, w, c = loops
        wo, wi = sch.split(w, [None, lanes])
        sch.reorder(wo, c, wi)
        sch.unroll(c)
        sch.vectorize(wi)
        parallel_outer(sch, rest, total if parallel else 0)
        return
    if _short_inner_layout_change(sch, block):
        # ... and the next axis too short to vectorize: gathers of 4 bytes cost more than
        # scalar copies (60x1x8x8 -> NHWC u8 with 4 channels: 35 us gathering)
        sch.unroll(loops[-1])
        parallel_outer(sch, loops[:-1], total if parallel else 0)
        return
    # A ragged inner axis keeps its rows (predicated last vector) when reads index it plainly;
    # a reshape (// and % in its indices) would gather, so there the fused index is vectorized.
    reads = str(sch.get(block).reads)
    plain = "//" not in reads and "%" not in reads and sizes[-1] >= 2 * lanes
    if sizes[-1] % lanes and not plain and len(loops) > 1:
        loops = [sch.fuse(*loops)]
    if vector_safe(sch, block):
        vectorize_tail(sch, loops[-1], lanes, ragged=plain)
    outer = sch.get_loops(block)
    if int(sch.get(outer[-1]).kind) == int(tirx.ForKind.VECTORIZED):
        outer = outer[:-1]
    parallel_outer(sch, outer, total if parallel else 0)


def _short_inner_layout_change(sch: s_tir.Schedule, block) -> bool:
    """A short innermost output axis (<= 4) that no multi-dimensional read walks contiguously
    (its reads' last index is another axis): a layout change such as NCHW -> NHWC."""
    loops = sch.get_loops(block)
    if len(loops) < 2 or extents(sch, loops)[-1] > 4:
        return False
    blk = sch.get(block)
    var_c = blk.iter_vars[-1].var
    reads = [r for r in blk.reads if len(r.region) > 1]
    return bool(reads) and not any(_uses(r.region[-1].min, var_c) for r in reads)


def _uses(expr, var) -> bool:
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr))


def _transposed_short_inner(sch: s_tir.Schedule, block, lanes: int) -> bool:
    """True for a layout change whose short innermost output axis (e.g. 3 channels of an
    NCHW -> NHWC input) is not the inputs' contiguous axis, but the next axis is: vectorizing
    that axis then reads whole vectors (writes are strided) instead of gathering."""
    loops = sch.get_loops(block)
    if len(loops) < 2 or not vector_safe(sch, block):
        return False
    *_, w, c = extents(sch, loops)
    if c > 4 or w % lanes or w < 2 * lanes:
        return False
    blk = sch.get(block)
    var_w = blk.iter_vars[-2].var
    reads = [r for r in blk.reads if len(r.region) > 1]
    return bool(reads) and all(r.region[-1].min.same_as(var_w) for r in reads)
