"""Helpers shared by the schedule rules: block analysis and small loop transformations.

Everything here works on a ``tvm.s_tir.Schedule``; nothing builds or runs code.
"""
from __future__ import annotations

import contextlib

from tvm import s_tir, tirx


def acc_regs(lanes: int) -> int:
    """Vector registers a register tile may use for accumulators.

    AVX-512 (16 fp32 lanes) and NEON (4 lanes) have 32 vector registers, AVX2 (8 lanes) has 16;
    a few stay free for the broadcast operand and the weight vectors.
    """
    return 12 if lanes == 8 else 28


def tile_fits(rows: int, vecs: int, lanes: int) -> bool:
    """A ``rows x vecs`` accumulator tile that streams ``vecs`` weight vectors and one broadcast.

    With 32 vector registers (AVX-512, NEON) the weights and the broadcast must fit beside the
    accumulators: 7 x 4 vectors spilled and ran 1.5x slower than 6 x 4 on Zen 4. AVX2's 16
    registers are too few for that; there LLVM streams the weights from L1 as memory operands
    and the accumulator bound alone is what measured well on Zen 3.
    """
    if rows * vecs > acc_regs(lanes):
        return False
    return lanes == 8 or rows * vecs + vecs + 1 <= 32

# Below this many scalar operations a parallel launch costs more than it saves.
PARALLEL_MIN_WORK = 1 << 15


def blocks(sch: s_tir.Schedule) -> list[s_tir.schedule.SBlockRV]:
    """Top-level blocks of the func body in program order."""
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def block_name(sch: s_tir.Schedule, block) -> str:
    return sch.get(block).name_hint


def iter_kinds(sch: s_tir.Schedule, block) -> str:
    """'S'/'R'/'O' per block iter var, e.g. 'SSR' for a matmul."""
    kinds = {tirx.IterVar.DataPar: "S", tirx.IterVar.CommReduce: "R"}
    return "".join(kinds.get(int(iv.iter_type), "O") for iv in sch.get(block).iter_vars)


def extents(sch: s_tir.Schedule, loops) -> list[int]:
    return [int(sch.get(loop).extent) for loop in loops]


def is_reduction(sch: s_tir.Schedule, block) -> bool:
    return "R" in iter_kinds(sch, block)


def has_reduction(func: tirx.PrimFunc) -> bool:
    sch = s_tir.Schedule(func)
    return any(is_reduction(sch, b) for b in blocks(sch))


def inline_producers(sch: s_tir.Schedule, keep: set[str], cheap_only: bool = False) -> None:
    """Inline every spatial, non-output block whose name is not in ``keep`` (best effort)."""
    outputs = {block_name(sch, b) for b in sch.get_output_blocks(sch.get_sblock("root"))}
    for b in blocks(sch):
        name = block_name(sch, b)
        if name in keep or name in outputs or is_reduction(sch, b):
            continue
        if cheap_only and not _is_cheap(sch, b) and len(sch.get_consumers(b)) > 1:
            continue
        with contextlib.suppress(Exception):  # not inlinable: stays a loop nest of its own
            sch.compute_inline(b)


def _is_cheap(sch: s_tir.Schedule, block) -> bool:
    """True when the block body has no transcendental call (safe to recompute per consumer)."""
    text = str(sch.get(block).body)
    return not any(f in text for f in ("exp", "tanh", "erf", "log", "sqrt", "pow", "sigmoid"))


def vector_safe(sch: s_tir.Schedule, block) -> bool:
    """False when the block touches bool buffers (LLVM codegen rejects vectors of i1 compares)."""
    blk = sch.get(block)
    return all(str(r.source.dtype) != "bool" for r in list(blk.reads) + list(blk.writes))


def reuse(rows: int, vecs: int) -> float:
    """FMAs per load of a rows x vecs register tile: the analytic score of a tile shape."""
    return rows * vecs / (rows + vecs)


def vectorize_tail(sch: s_tir.Schedule, loop, lanes: int, ragged: bool = True) -> None:
    """Vectorize ``loop`` by ``lanes`` when its extent allows it (else leave it scalar).

    With ``ragged`` a long loop whose extent ``lanes`` does not divide (e.g. 197 tokens) is
    split by ``lanes`` with a predicated last vector.
    """
    n = int(sch.get(loop).extent)
    if n % lanes == 0 and n > lanes:
        _, inner = sch.split(loop, [None, lanes])
        sch.vectorize(inner)
    elif 1 < n <= 4 * lanes and n % 4 == 0:
        sch.vectorize(loop)
    elif ragged and n >= 2 * lanes:
        _, inner = sch.split(loop, [None, lanes])
        sch.vectorize(inner)


def parallel_outer(sch: s_tir.Schedule, loops, work: int) -> None:
    """Fuse ``loops`` and run them in parallel if the total work pays for a thread launch."""
    if not loops:
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if work >= PARALLEL_MIN_WORK and int(sch.get(fused).extent) >= 2:
        sch.parallel(fused)


def round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m
