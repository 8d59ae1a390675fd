"""Schedule rule for funcs without reductions: elementwise, broadcast, transpose, reshape, take.

Inlines every intermediate block into its consumer, then for each output: vectorize the innermost
axis by ``lanes`` (or the fused index when the innermost axis is short) and run the outer loops in
parallel when the tensor is large enough to pay for a thread launch.
"""
from __future__ import annotations

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
    total = 1
    for s in sizes:
        total *= s
    if sizes[-1] % lanes and len(loops) > 1:
        # Short or ragged inner axis: vectorize the fused index instead.
        loops = [sch.fuse(*loops)]
    if vector_safe(sch, block):
        vectorize_tail(sch, loops[-1], lanes)
    outer = sch.get_loops(block)
    if int(sch.get(outer[-1]).kind) == int(tirx.ForKind.VECTORIZED):
        outer = outer[:-1]
    parallel_outer(sch, outer, total if parallel else 0)
