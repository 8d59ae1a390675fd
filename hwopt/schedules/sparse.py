"""Schedule rule for the sparse kernel of ``hwopt.lowering.sparse`` (pruned conv / linear layers).

Template: a register tile of ``rows`` output rows x ``vecs`` vectors along the output width
(``cache_write``), accumulated over the kept entries j of one output channel: per entry one
weight broadcast and ``rows * vecs`` contiguous vector loads + FMAs (the input index is loaded
once per entry, not per element). Loops run (n, row-tile, width-tile, o, j, rows, vecs, lanes),
the outer four fused and parallel, so the input rows a spatial tile reads stay in cache while all
output channels pass over them. When blocks of output channels read the same entries
(block-punched, block-structured, N:M shared by rows), the tile also spans ``orow`` channels, so
each input vector is loaded once for all of them. The bias (and any elementwise epilogue FuseOps
put in the same function) is written back from the register tile.
"""
from __future__ import annotations

import math

from tvm import s_tir, tirx

from .common import block_name, blocks, extents, parallel_outer, vectorize_tail

ACC_BLOCK = "hwopt_sparse_acc"
_MAX_ACC = 8  # accumulators per tile (measured: 8 beat 12 and 16 on AVX2; loads dominate)


def _acc_block(sch: s_tir.Schedule):
    for b in blocks(sch):
        if block_name(sch, b) == ACC_BLOCK:
            return b
    return None


def _group(sch: s_tir.Schedule, acc) -> int:
    """Output rows that share their entries: O / rows of the int32 offset table."""
    blk = sch.get(acc)
    o = int(sch.get(sch.get_loops(acc)[1]).extent)
    for r in blk.reads:
        buf = r.source
        if str(buf.dtype) == "int32" and len(buf.shape) == 2:
            return o // int(buf.shape[0])
    return 1


def _tile(ho: int, vw: int) -> tuple[int, int]:
    """(rows, vecs): the widest vector run dividing the width, then rows that fit."""
    vecs = max(v for v in range(1, min(vw, _MAX_ACC) + 1) if vw % v == 0)
    rows = max(r for r in range(1, ho + 1) if ho % r == 0 and r * vecs <= _MAX_ACC)
    return rows, vecs


def _split_epilogue(sch: s_tir.Schedule, names: list[str]) -> tuple[list[str], list[str]]:
    """(blocks over the kernel's padded output, blocks from the width crop on): only the first
    may be written back from the register tile (the crop writes a smaller buffer)."""
    shape = [int(v) for v in sch.get(sch.get_sblock(ACC_BLOCK)).writes[0].source.shape]
    for i, name in enumerate(names):
        out = sch.get(sch.get_sblock(name)).writes[0].source
        if [int(v) for v in out.shape] != shape:
            return names[:i], names[i:]
    return names, []


class SparseIndexed:
    """The indexed sparse conv / linear kernel (pruned layers), tiled over (rows, width)."""

    name = "sparse_indexed"

    def match(self, func: tirx.PrimFunc) -> bool:
        return _acc_block(s_tir.Schedule(func)) is not None

    def candidates(self, func: tirx.PrimFunc, lanes: int) -> list[dict]:
        sch = s_tir.Schedule(func)
        _, _, ho, wo, _ = extents(sch, sch.get_loops(_acc_block(sch)))
        lanes = lanes if wo % lanes == 0 else 8 if wo % 8 == 0 else 4
        vw = max(wo // lanes, 1)
        g = _group(sch, _acc_block(sch))
        cands = []
        # Rows sharing entries: an (o x width) register tile reuses every input vector across
        # its rows, like a dense matmul's (loads per FMA 1/orow + 1/vecs instead of ~1).
        # Order measured on BERT-base FFN 2:4 (rows share by 8): 2x4 0.72x dense, 4x2 0.82x,
        # 8x1 1.06x (noisy 2-core machine).
        for orow, vecs in ((2, 4), (4, 2), (4, 3), (6, 2), (3, 4), (8, 1)):
            if g % orow == 0 and g > 1 and vw % vecs == 0:
                cands.append({"rows": 1, "vecs": vecs, "lanes": lanes, "orow": orow})
        rows, vecs = _tile(ho, vw)
        cands.append({"rows": rows, "vecs": vecs, "lanes": lanes})
        if vecs % 2 == 0:
            cands.append({"rows": rows, "vecs": vecs // 2, "lanes": lanes})
        return cands

    def apply(self, func: tirx.PrimFunc, params: dict, lanes: int) -> tirx.PrimFunc:
        rows, vecs, lanes = params["rows"], params["vecs"], params.get("lanes", lanes)
        orow = params.get("orow", 1)
        sch = s_tir.Schedule(func)
        acc = _acc_block(sch)
        names = [block_name(sch, b) for b in blocks(sch)]
        pos = names.index(ACC_BLOCK)
        pre, epi, rest = names[:pos], *_split_epilogue(sch, names[pos + 1:])
        for name in epi[:-1] + rest[:-1]:
            sch.compute_inline(sch.get_sblock(name))
        b, o, h, x, j = sch.get_loops(acc)
        n, oc, ho, wo, nj = extents(sch, [b, o, h, x, j])
        cache = sch.cache_write(acc, 0, "global")
        if epi:
            sch.reverse_compute_inline(sch.get_sblock(epi[-1]))
        h_o, h_i = sch.split(h, [None, rows])
        x_o, x_i = sch.split(x, [None, vecs * lanes])
        x_v, x_l = sch.split(x_i, [None, lanes])
        o, o_i = sch.split(o, [None, orow])
        sch.reorder(b, h_o, x_o, o, j, o_i, h_i, x_v, x_l)
        sch.reverse_compute_at(cache, o)
        parallel_outer(sch, [b, h_o, x_o, o], n * oc * ho * wo * nj)
        sch.unroll(o_i)
        sch.unroll(h_i)
        sch.unroll(x_v)
        sch.vectorize(x_l)
        sch.decompose_reduction(acc, j)
        vectorize_tail(sch, sch.get_loops(cache)[-1], lanes)
        for name in pre + rest[-1:]:  # padding / the crop: rows in parallel, vector columns
            loops = sch.get_loops(sch.get_sblock(name))
            total = math.prod(extents(sch, loops))
            vectorize_tail(sch, loops[-1], lanes)
            parallel_outer(sch, sch.get_loops(sch.get_sblock(name))[:2], total)
        return sch.mod["main"]
