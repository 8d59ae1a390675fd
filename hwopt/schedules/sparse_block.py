"""Schedule rules for the filter-vectorized sparse kernels of ``hwopt.lowering.sparse_block``.

Both kernels are register-tiled like hwopt's dense conv and matmul: a ``cache_write`` tile of
``rows`` output pixels (conv: along the width) or rows (linear) x the ``g`` filters of one block,
accumulated over the block's kept entries j. Per entry: one index load, one vector load of the
block's weights, ``rows`` broadcast input values and ``rows`` FMAs. Loops run (conv: n, h,
block, width-tile, j, rows, lanes; linear: block, row-tile, j, rows, lanes), the outer ones fused
and parallel; the epilogue (bias, activation) is written back from the tile.
"""
from __future__ import annotations

from tvm import s_tir, tirx

from .common import block_name, blocks, extents, parallel_outer, tile_fits, vectorize_tail

CONV_BLOCK = "hwopt_sparse_block_conv"
LINEAR_BLOCK = "hwopt_sparse_block_linear"
_ROWS = (14, 7, 8, 12, 16, 6, 4, 28, 10, 5, 3, 2, 1)


def _find(sch: s_tir.Schedule, name: str):
    return next((b for b in blocks(sch) if block_name(sch, b) == name), None)


def _group(sch: s_tir.Schedule, acc) -> int:
    """Filters per block: the last extent of the [O/g, J, g] weight the kernel reads."""
    blk = sch.get(acc)
    for r in blk.reads:
        if len(r.source.shape) == 3 and str(r.source.dtype) == "float32":
            return int(r.source.shape[2])
    return 1


def _row_candidates(extent: int, vecs: int, lanes: int) -> list[int]:
    rows = [r for r in _ROWS if r <= extent and extent % r == 0 and tile_fits(r, vecs, lanes)]
    return rows or [1]


class _BlockRule:
    acc_name = ""
    name = ""

    def match(self, func: tirx.PrimFunc) -> bool:
        return _find(s_tir.Schedule(func), self.acc_name) is not None

    def _vecs(self, g: int, lanes: int) -> tuple[int, int]:
        """(vector width, vectors per block): the block's filters as lanes."""
        width = min(g, lanes)
        return width, max(g // width, 1)

    def _tile(self, sch, params, lanes, row_loop, o_loop, g):
        """Split rows and filters; returns (row-outer, block, row-inner, vector loops)."""
        rows = params["rows"]
        width, vecs = self._vecs(g, lanes)
        ro, ri = sch.split(row_loop, [None, rows])
        ob, oi = sch.split(o_loop, [None, g])
        ov, ol = sch.split(oi, [None, width])
        return ro, ob, ri, ov, ol, width

    def _prologue(self, sch, acc):
        names = [block_name(sch, b) for b in blocks(sch)]
        epi = names[names.index(self.acc_name) + 1:]
        for name in epi[:-1]:
            sch.compute_inline(sch.get_sblock(name))
        cache = sch.cache_write(acc, 0, "global")
        if epi:
            sch.reverse_compute_inline(sch.get_sblock(epi[-1]))
        return cache

    def _finish(self, sch, acc, cache, ri, ov, ol, j, width):
        sch.unroll(ri)
        sch.unroll(ov)
        sch.vectorize(ol)
        sch.decompose_reduction(acc, j)
        vectorize_tail(sch, sch.get_loops(cache)[-1], width)
        return sch.mod["main"]


class SparseBlockConv(_BlockRule):
    """NHWC conv whose blocks of g filters share their entries, tiled (width x g filters)."""

    name = "sparse_block_conv"
    acc_name = CONV_BLOCK

    def candidates(self, func: tirx.PrimFunc, lanes: int) -> list[dict]:
        sch = s_tir.Schedule(func)
        acc = _find(sch, self.acc_name)
        _, _, wo, _, _ = extents(sch, sch.get_loops(acc))
        _, vecs = self._vecs(_group(sch, acc), lanes)
        return [{"rows": r} for r in _row_candidates(wo, vecs, lanes)[:8]]

    def apply(self, func: tirx.PrimFunc, params: dict, lanes: int) -> tirx.PrimFunc:
        sch = s_tir.Schedule(func)
        acc = _find(sch, self.acc_name)
        g = _group(sch, acc)
        n, h, w, o, j = sch.get_loops(acc)
        cache = self._prologue(sch, acc)
        wo, ob, wi, ov, ol, width = self._tile(sch, params, lanes, w, o, g)
        sch.reorder(n, h, ob, wo, j, wi, ov, ol)
        sch.reverse_compute_at(cache, wo)
        sch.parallel(sch.fuse(n, h, ob))
        return self._finish(sch, acc, cache, wi, ov, ol, j, width)


class SparseBlockLinear(_BlockRule):
    """``x [M, K]`` times blocks of g rows sharing their kept inputs, tiled (rows x g)."""

    name = "sparse_block_linear"
    acc_name = LINEAR_BLOCK

    def candidates(self, func: tirx.PrimFunc, lanes: int) -> list[dict]:
        sch = s_tir.Schedule(func)
        acc = _find(sch, self.acc_name)
        m, _, _ = extents(sch, sch.get_loops(acc))
        _, vecs = self._vecs(_group(sch, acc), lanes)
        return [{"rows": r} for r in _row_candidates(m, vecs, lanes)[:8]]

    def apply(self, func: tirx.PrimFunc, params: dict, lanes: int) -> tirx.PrimFunc:
        sch = s_tir.Schedule(func)
        acc = _find(sch, self.acc_name)
        g = _group(sch, acc)
        m, o, j = sch.get_loops(acc)
        mm, oo, nj = extents(sch, [m, o, j])
        cache = self._prologue(sch, acc)
        mo, ob, mi, ov, ol, width = self._tile(sch, params, lanes, m, o, g)
        sch.reorder(ob, mo, j, mi, ov, ol)
        sch.reverse_compute_at(cache, mo)
        parallel_outer(sch, [ob, mo], mm * oo * nj)
        return self._finish(sch, acc, cache, mi, ov, ol, j, width)
