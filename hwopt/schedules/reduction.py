"""Schedule rule for funcs with a reduction that is not a conv or matmul: softmax, layer norm,
mean / pooling, masks reduced with max.

``fuse_rows=1``: cheap producers are inlined, every block is computed under the shared leading
spatial ("row") loops of the output, which run in parallel; spatial inner loops are vectorized.
``fuse_rows=0`` is the safe fallback: each block gets its own parallel outer loops.
"""
from __future__ import annotations

from tvm import s_tir, tirx

from .common import (
    blocks,
    extents,
    has_reduction,
    inline_producers,
    iter_kinds,
    parallel_outer,
    vector_safe,
    vectorize_tail,
)
from .injective import schedule_spatial


class Reduction:
    """Row-wise reductions and their elementwise neighbours."""

    name = "reduction"

    def match(self, func: tirx.PrimFunc) -> bool:
        return has_reduction(func)

    def candidates(self, func: tirx.PrimFunc, lanes: int) -> list[dict]:
        return [{"fuse_rows": 1}, {"fuse_rows": 0}]

    def apply(self, func: tirx.PrimFunc, params: dict, lanes: int) -> tirx.PrimFunc:
        sch = s_tir.Schedule(func)
        inline_producers(sch, keep=set(), cheap_only=True)
        if params.get("fuse_rows", 1):
            _fuse_rows(sch, lanes)
        else:
            for b in blocks(sch):
                _schedule_alone(sch, b, lanes)
        return sch.mod["main"]


def _lead_spatial(sch: s_tir.Schedule, bs) -> int:
    """Number of leading loops that are spatial with equal extents in every block."""
    ref = extents(sch, sch.get_loops(bs[-1]))
    lead = len(ref)
    for b in bs:
        kinds = iter_kinds(sch, b)
        sizes = extents(sch, sch.get_loops(b))
        n = 0
        while n < min(lead, len(sizes), len(kinds)) and kinds[n] == "S" and sizes[n] == ref[n]:
            n += 1
        lead = n
    return lead


def _fuse_rows(sch: s_tir.Schedule, lanes: int) -> None:
    bs = blocks(sch)
    lead = _lead_spatial(sch, bs)
    if lead == 0:
        raise ValueError("no shared row loops")
    last = bs[-1]
    loops = sch.get_loops(last)
    work = 1
    for b in bs:
        size = 1
        for s in extents(sch, sch.get_loops(b)):
            size *= s
        work += size
    rows = sch.fuse(*loops[:lead]) if lead > 1 else loops[0]
    for b in reversed(bs[:-1]):
        sch.compute_at(b, rows, preserve_unit_loops=True)
    for b in bs:
        inner = sch.get_loops(b)[1:]
        if inner and "R" not in iter_kinds(sch, b) and vector_safe(sch, b):
            vectorize_tail(sch, inner[-1], lanes)
    parallel_outer(sch, [rows], work)


def _schedule_alone(sch: s_tir.Schedule, block, lanes: int) -> None:
    kinds = iter_kinds(sch, block)
    if "R" not in kinds:
        schedule_spatial(sch, block, lanes)
        return
    loops = sch.get_loops(block)
    n = len(kinds) - len(kinds.lstrip("S"))
    work = 1
    for s in extents(sch, loops):
        work *= s
    parallel_outer(sch, loops[:n], work)
