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
        return [{"parallel": 1}, {"parallel": 0}]

    def apply(self, func: tirx.PrimFunc, params: dict, lanes: int) -> tirx.PrimFunc:
        sch = s_tir.Schedule(func)
        inline_producers(sch, keep=set())
        for b in blocks(sch):
            schedule_spatial(sch, b, lanes, bool(params.get("parallel", 1)))
        return sch.mod["main"]


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
