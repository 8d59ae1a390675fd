"""Schedule rule for dense / matmul / batched matmul (incl. attention QK^T and PV) + epilogue.

Template: an ``mr x nr`` register tile (``cache_write``) accumulates over k (split by ``k_unroll``,
unrolled); rows are unrolled, columns vectorized by ``lanes``.  With ``pack=1`` (the default) the
loops run (batch, col-panel, row-tile): each k x nr panel of B is copied once into a contiguous
buffer (its zero padding inlined into the copy) and reused by every row tile, and (batch,
col-panel) run in parallel; without it, or with fewer than 4 panels, (batch, row-tile, col-tile)
run in parallel and B is read in place.  Shapes that do not divide the tile are padded with
``pad_einsum`` (zero rows/cols), so the vector loop never needs a predicate; a padded epilogue is
computed per panel.  B is read as [.., k, j] (what Relax legalizes ``matmul`` to); a [.., j, k]
operand still computes correctly, only slower.
"""
from __future__ import annotations

import math
import re

from tvm import s_tir, tirx

from .common import (
    acc_regs,
    block_name,
    blocks,
    extents,
    iter_kinds,
    parallel_outer,
    reuse,
    round_up,
    vectorize_tail,
)

# Register tiles in preference order (rows, columns in vectors).
_TILES = ((4, 3), (6, 2), (3, 4), (4, 4), (8, 2), (12, 2), (6, 3), (4, 2), (8, 3), (2, 4), (1, 4),
          (1, 2), (1, 1))


def _avx512_time(params: dict, lanes: int, waste: float) -> float:
    """Relative time of a tile on AVX-512: the padded work times the worst of three limits,
    one 512-bit FMA per cycle, FMA latency (8 independent accumulators hide it) and one
    512-bit load per cycle (the B vectors and A broadcasts of a k step).  On Zen 4 a 1 x 16
    tile for padding-free 197 x 208 attention scores was 1.7x slower than a 4 x 32 one that
    pads 8 %; the waste-first order of AVX2 picked the former."""
    mr, vecs = params["mr"], max(params["nr"] // lanes, 1)
    accs = mr * vecs
    return (1.0 + waste) * max(1.0, 8.0 / accs, (mr + vecs) / accs)


GROUPED_BLOCK = "hwopt_grouped_mm_t"  # hwopt.lowering.grouped: B picked per row tile


def _mm_block(sch: s_tir.Schedule, grouped: bool = False):
    for b in blocks(sch):
        if (re.fullmatch("S{2,}R", iter_kinds(sch, b))
                and block_name(sch, b).startswith(GROUPED_BLOCK) == grouped
                and _is_mac(sch.get(b), grouped)):
            return b
    return None


def _is_mac(block, grouped: bool = False) -> bool:
    """Two distinct operands, both indexed by the reduction var, multiplied and summed (a
    grouped matmul also reads its row groups, which do not depend on the reduction var)."""
    k = block.iter_vars[-1].var
    reads = [r for r in block.reads if not r.source.same_as(block.writes[0].source)]
    uses_k = [any(_uses(rg.min, k) for rg in r.region) for r in reads]
    if grouped:
        reads = [r for r, u in zip(reads, uses_k) if u]
        uses_k = [True] * len(reads)
    if len(reads) != 2 or reads[0].source.same_as(reads[1].source):
        return False
    return all(uses_k) and "*" in str(block.body)


def _uses(expr, var) -> bool:
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr))


def inline_side_inputs(sch: s_tir.Schedule, mm) -> None:
    """Inline the blocks before the matmul that only feed its epilogue (a key-padded mask:
    ``pad(mask)`` fused in front of ``QK^T * scale + mask``), which otherwise stop the epilogue
    from folding into the register tile's write-back."""
    operands = {r.source for r in sch.get(mm).reads}
    names = [block_name(sch, b) for b in blocks(sch)]
    for name in names[:names.index(block_name(sch, mm))]:
        blk = sch.get(sch.get_sblock(name))
        if any(w.source.same_as(o) for w in blk.writes for o in operands):
            continue
        try:
            sch.compute_inline(sch.get_sblock(name))
        except Exception:  # noqa: BLE001 - stays its own loop nest
            pass


def _shape(sch: s_tir.Schedule, block) -> tuple[int, int, int, int]:
    """(batch, M, N, K) of the matmul block."""
    sizes = extents(sch, sch.get_loops(block))
    batch = math.prod(sizes[:-3])
    return batch, sizes[-3], sizes[-2], sizes[-1]


class Dense:
    """Dense / batched matmul with a fused elementwise epilogue."""

    name = "dense"
    grouped = False

    def match(self, func: tirx.PrimFunc) -> bool:
        return _mm_block(s_tir.Schedule(func), self.grouped) is not None

    def candidates(self, func: tirx.PrimFunc, lanes: int) -> list[dict]:
        sch = s_tir.Schedule(func)
        batch, m, n, k = _shape(sch, _mm_block(sch, self.grouped))
        ku = next(u for u in (4, 2, 1) if k % u == 0)
        if n < lanes:
            return [{"mr": mr, "nr": n, "k_unroll": ku} for mr in (4, 1) if mr <= m] or \
                   [{"mr": 1, "nr": n, "k_unroll": ku}]
        cands = []
        for mr, vecs in _TILES:
            nr = vecs * lanes
            if mr * vecs > acc_regs(lanes) or mr > m or nr > round_up(n, lanes):
                continue
            waste = round_up(m, mr) * round_up(n, nr) / (m * n) - 1.0
            tasks = batch * -(-m // mr) * -(-n // nr)
            cands.append(({"mr": mr, "nr": nr, "k_unroll": ku, "pack": 1}, waste, tasks))
        # Little padding first (packing pads B for free), enough tasks for two threads, then
        # the most FMAs per load, then the preference order.  With 16 registers (AVX2) all
        # 12-accumulator tiles measured alike by reuse, so there the preference order decides.
        if lanes == 16:
            # ties: the widest column panel (4 vectors measured best or within noise of it)
            cands.sort(key=lambda c: (c[2] < 4, round(_avx512_time(c[0], lanes, c[1]), 2),
                                      -c[0]["nr"]))
            return [c[0] for c in cands[:12]]
        w0 = min(c[1] for c in cands)
        cap = 1.5 if acc_regs(lanes) <= 12 else float("inf")
        cands.sort(key=lambda c: (c[1] - w0 > 0.06, c[2] < 4,
                                  -min(round(reuse(c[0]["mr"], c[0]["nr"] // lanes), 1), cap)))
        return [c[0] for c in cands[:12]]

    def apply(self, func: tirx.PrimFunc, params: dict, lanes: int) -> tirx.PrimFunc:
        mr, nr, ku = params["mr"], params["nr"], params["k_unroll"]
        sch = s_tir.Schedule(func)
        mm = _mm_block(sch, self.grouped)
        inline_side_inputs(sch, mm)
        batch, m, n, k = _shape(sch, mm)
        mm_name = block_name(sch, mm)
        pad = [1] * (len(sch.get_loops(mm)) - 3) + [mr if m % mr else 1, nr if n % nr else 1, 1]
        padded = any(p > 1 for p in pad)
        before = {block_name(sch, b) for b in blocks(sch)}
        if padded:
            sch.pad_einsum(mm, pad)
        mm = sch.get_sblock(mm_name)
        names = [block_name(sch, b) for b in blocks(sch)]
        pos = names.index(mm_name)
        epi = names[pos + 1:]
        copies = [x for x in names[:pos] if x not in before]  # pad_einsum's input copies
        # The unpad copy (if any) and all but the last epilogue block fold into their consumer.
        for name in epi[:-1]:
            sch.compute_inline(sch.get_sblock(name))
        cache = sch.cache_write(mm, 0, "global")
        if epi and not padded:
            sch.reverse_compute_inline(sch.get_sblock(epi[-1]))
        *bl, i, j, kk = sch.get_loops(mm)
        io, ii = sch.split(i, [None, mr])
        jo, ji = sch.split(j, [None, nr])
        ko, ki = sch.split(kk, [None, ku])
        # Column panels outermost (each B panel packed once, reused by all row tiles) when
        # there are enough of them for both cores; else row tiles outermost, B read in place.
        panels = params.get("pack", 0) and batch * -(-n // nr) >= 4 and m > mr
        outer = [*bl, jo, io] if panels else [*bl, io, jo]
        sch.reorder(*outer, ko, ki, ii, ji)
        sch.reverse_compute_at(cache, jo)
        if epi and padded:
            # The epilogue reads the padded result: compute its part right after the tile.
            try:
                sch.reverse_compute_at(sch.get_sblock(epi[-1]), jo)
                vectorize_tail(sch, sch.get_loops(sch.get_sblock(epi[-1]))[-1], lanes)
            except Exception:  # noqa: BLE001 - stays a separate loop nest
                copies.append(epi[-1])
        if panels:
            copies = _pack_panel(sch, mm, jo, lanes, copies)
        parallel_outer(sch, outer[:-1] if panels else outer, batch * m * n * k)
        sch.unroll(ki)
        sch.unroll(ii)
        if nr % lanes == 0 and nr > lanes:
            jv, jl = sch.split(ji, [None, lanes])
            sch.unroll(jv)
            sch.vectorize(jl)
        else:
            sch.vectorize(ji)
        sch.decompose_reduction(mm, ko)
        vectorize_tail(sch, sch.get_loops(cache)[-1], lanes)
        for name in copies:
            _schedule_copy(sch, sch.get_sblock(name), lanes)
        return sch.mod["main"]


class GroupedDense(Dense):
    """The grouped matmul of hwopt.lowering.grouped: a register tile is one tile of rows (one
    group, so one B), B is read in place (it changes per row tile: no panel packing), and the
    widest column panel that divides N keeps the tile free of padding."""

    name = "grouped_dense"
    grouped = True

    def candidates(self, func: tirx.PrimFunc, lanes: int) -> list[dict]:
        sch = s_tir.Schedule(func)
        mm = _mm_block(sch, True)
        tile = int(block_name(sch, mm).removeprefix(GROUPED_BLOCK))
        _, m, n, k = _shape(sch, mm)
        ku = next(u for u in (4, 2, 1) if k % u == 0)
        if m % tile:
            return []
        widths = [v * lanes for v in (4, 3, 2, 1) if tile * v <= acc_regs(lanes)
                  and n % (v * lanes) == 0] or [n]
        return [{"mr": tile, "nr": nr, "k_unroll": ku, "pack": 0} for nr in widths]


def _pack_panel(sch: s_tir.Schedule, mm, loop, lanes: int, copies: list[str]) -> list[str]:
    """Copy the B panel (k x nr) read under ``loop`` into a contiguous buffer, padding inlined.

    Returns ``copies`` without the B padding block it absorbed.
    """
    blk = sch.get(mm)
    j = blk.iter_vars[-2].var
    idx = next(n for n, r in enumerate(blk.reads)
               if not r.source.same_as(blk.writes[0].source)
               and any(_uses(rg.min, j) for rg in r.region))
    src = blk.reads[idx].source
    pb = sch.cache_read(mm, idx, "global")
    for name in copies:
        if any(w.source.same_as(src) for w in sch.get(sch.get_sblock(name)).writes):
            sch.compute_inline(sch.get_sblock(name))
            copies = [c for c in copies if c != name]
            break
    sch.compute_at(pb, loop)
    inner = [lp for lp in sch.get_loops(pb) if lp not in sch.get_loops(mm)]
    vectorize_tail(sch, inner[-1], lanes)
    return copies


def _schedule_copy(sch: s_tir.Schedule, block, lanes: int) -> None:
    loops = sch.get_loops(block)
    total = math.prod(extents(sch, loops))
    vectorize_tail(sch, loops[-1], lanes)
    parallel_outer(sch, sch.get_loops(block)[:-1] if len(loops) > 1 else [], total)
