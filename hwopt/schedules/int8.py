"""Schedule rules for the integer kernels of quantized layers (integer dot products + epilogue).

Input: the PrimFuncs that ``hwopt.lowering.qdq`` produces for int8 layers: an NHWC conv2d or a
matmul whose int32 accumulator feeds a fused requantize epilogue, with operands either int8 values
widened to int16 (activation minus its zero point; ``I16``) or uint8 activations (``x + 128``)
against int8 weights (``VNNI``, AVX-512 VNNI only). Each rule is parametrized by its `Dot`:
operand dtypes, the products per int32 lane of one instruction (k) and the tensor intrinsic.

VNNI: ``vpdpbusd`` multiplies four u8 x s8 pairs per int32 lane and adds them into the
accumulator in the same instruction (no saturation; ``vpdpbusds`` would saturate), 4x the
multiply-adds of an fp32 FMA. The kernels are the same templates with k = 4 (weights packed as
(L outputs x 4 k) slabs, input channels padded to a multiple of 4 by the importer).

x86 without VNNI has no int8 dot-product instruction that cannot overflow: ``vpmaddubsw`` adds two
u8 x s8 products into a *saturating* int16. ``vpmaddwd`` (int16 x int16, pairs summed into int32)
is exact for these ranges and does 2x the multiply-adds of an fp32 FMA per instruction, so the
inner product is tensorized as ``C[0:L] += A[k:k+2] . B[0:L, k:k+2]`` with one ``vpmaddwd``
(`dot_intrin`): the pair of activations is broadcast as one int32, the weights are packed so each
(L outputs x 2 k) slab is contiguous. L = 8 (AVX2) or 16 (AVX-512). The packing copy is marked
as a layout-rewrite preprocess; `prepack_weights` splits it out and Relax folds it on the
constant weights, so the kernels read pre-packed weights. Other CPUs, odd reduction lengths
(convs get an even channel count in ``hwopt.lowering.qdq``) and shapes the templates do not fit
fall through to the fp32 rules, which schedule the same integer block with vector multiplies.

Measured on Zen 3 (AVX2, no VNNI; noisy shared machine): the integer conv kernels run 1.3-2x
faster than the fp32 ones; per vpmaddwd a vpaddd is needed, and both compete for the same
vector pipes, which caps the gain below the 2x that the multiply count alone suggests.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from .common import (
    acc_regs,
    block_name,
    blocks,
    extents,
    parallel_outer,
    reuse,
    round_up,
    tile_fits,
    vectorize_tail,
)
from .conv2d import PREPACK, _conv_block, _schedule_pad
from .dense import _mm_block, _schedule_copy, _shape, inline_side_inputs

_MIN_ROWS = 1
_LLVM = {8: "llvm.x86.avx2.pmadd.wd", 16: "llvm.x86.avx512.pmaddw.d.512"}


@dataclass(frozen=True)
class Dot:
    """An integer dot-product instruction: `k` products of (a, b) per int32 lane."""

    name: str
    a: str  # dtype of the broadcast operand (activations)
    b: str  # dtype of the packed operand (weights)
    k: int
    lanes: tuple[int, ...]  # vector widths (int32 lanes) it exists for

    def intrin(self, lanes: int) -> str:
        return vnni_intrin() if self.name == "vnni" else dot_intrin(lanes)


I16 = Dot("int16", "int16", "int16", 2, tuple(_LLVM))
VNNI = Dot("vnni", "uint8", "int8", 4, (16,))


def _make_intrin(lanes: int):
    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((2,), "int16", offset_factor=1),
             B: T.Buffer((lanes, 2), "int16", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:2], B[0:lanes, 0:2])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 2):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((2,), "int16", offset_factor=1),
             B: T.Buffer((lanes, 2), "int16", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:2], B[0:lanes, 0:2])
            T.writes(C[0:lanes])
            # One expression: a name bound here would become a buffer allocated per call
            # (see _vnni_impl).
            C[T.ramp(T.int32(0), 1, lanes)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(_LLVM[lanes]),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int16x2"), dtype="int32"),
                                          lanes), dtype=f"int16x{2 * lanes}"),
                B.vload([0, 0], dtype=f"int16x{2 * lanes}"), dtype=f"int32x{lanes}")

    return desc, impl


def dot_intrin(lanes: int) -> str:
    """Name of the registered ``vpmaddwd`` tensor intrinsic for `lanes` int32 outputs."""
    name = f"hwopt_dot_{lanes}x2_i16i16i32"
    try:
        TensorIntrin.get(name)
    except Exception:  # noqa: BLE001 - not registered yet
        TensorIntrin.register(name, *_make_intrin(lanes))
    return name


@T.prim_func(s_tir=True)
def _vnni_desc(A: T.Buffer((4,), "uint8", offset_factor=1),
               B: T.Buffer((16, 4), "int8", offset_factor=1),
               C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _vnni_impl(A: T.Buffer((4,), "uint8", offset_factor=1),
               B: T.Buffer((16, 4), "int8", offset_factor=1),
               C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
    # TVM's own VNNI_DOT_16x4_INTRIN passes <16 x i32> operands, which the LLVM in the
    # 0.27 wheels rejects (its vpdpbusd.512 takes <64 x i8>). One expression: a name bound
    # in TVMScript (``a = ...``) becomes a local buffer, which inside a parallel loop is a
    # TVMBackendAllocWorkspace/FreeWorkspace pair per task (digits conv 16->32: 38 -> 24 us).
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16),
                          dtype="int8x64"),
            B.vload([0, 0], dtype="int8x64"), dtype="int32x16")


def vnni_intrin() -> str:
    """Name of the registered ``vpdpbusd`` (AVX-512 VNNI) tensor intrinsic, 16 x 4 u8 x s8."""
    name = "hwopt_dot_16x4_u8i8i32_vnni"
    try:
        TensorIntrin.get(name)
    except Exception:  # noqa: BLE001 - not registered yet
        TensorIntrin.register(name, _vnni_desc, _vnni_impl)
    return name


def _int_mac(sch: s_tir.Schedule, block, dot: Dot) -> bool:
    """An int32 accumulation of products of `dot`'s operand dtypes (activation first)."""
    blk = sch.get(block)
    if str(blk.writes[0].source.dtype) != "int32":
        return False
    reads = [r for r in blk.reads if not r.source.same_as(blk.writes[0].source)]
    return len(reads) == 2 and [str(r.source.dtype) for r in reads] == [dot.a, dot.b]


def _split_epilogue(sch: s_tir.Schedule, main) -> tuple[list[str], list[str]]:
    names = [block_name(sch, b) for b in blocks(sch)]
    pos = names.index(block_name(sch, main))
    return names[:pos], names[pos + 1:]


class Conv2dNHWCDot:
    """NHWC integer conv2d (not grouped, input channels a multiple of k) on `dot`, tiled."""

    def __init__(self, dot: Dot):
        self.dot, self.name = dot, f"conv2d_nhwc_{dot.name}"

    def match(self, func: tirx.PrimFunc) -> bool:
        sch = s_tir.Schedule(func)
        conv = _conv_block(sch)
        if conv is None or not _int_mac(sch, conv, self.dot):
            return False
        ic = extents(sch, sch.get_loops(conv))[6]
        blk = sch.get(conv)
        f = blk.iter_vars[3].var
        data = next(r.source for r in blk.reads if not r.source.same_as(blk.writes[0].source)
                    and not any(_uses(rg.min, f) for rg in r.region))
        return ic % self.dot.k == 0 and int(data.shape[-1]) == ic  # not grouped

    def candidates(self, func: tirx.PrimFunc, lanes: int) -> list[dict]:
        if lanes not in self.dot.lanes:
            return []
        sch = s_tir.Schedule(func)
        _, _, w, oc, *_ = extents(sch, sch.get_loops(_conv_block(sch)))
        cands = []
        for ob in (64, 32, 128, 48, 96, 16, 8):
            if ob % lanes or oc % ob:
                continue
            vecs = ob // lanes
            for rw in (7, 8, 14, 4, 6, 3, 5, 16, 2, 1):
                if w % rw == 0 and tile_fits(rw, vecs, lanes):
                    cands.append({"oc_block": ob, "reg_w": rw})
        # Most multiply-adds per load first; among equals the wider oc block (32x2 measured
        # up to 1.2x faster than 16x4 on Zen 3: fewer broadcasts per vpmaddwd).
        cands.sort(key=lambda c: (-round(reuse(c["reg_w"], c["oc_block"] // lanes), 1),
                                  -c["oc_block"]))
        return cands[:12]

    def apply(self, func: tirx.PrimFunc, params: dict, lanes: int) -> tirx.PrimFunc:
        ob, rw = params["oc_block"], params["reg_w"]
        sch = s_tir.Schedule(func)
        conv = _conv_block(sch)
        pre, epi = _split_epilogue(sch, conv)
        for name in epi[:-1]:
            sch.compute_inline(sch.get_sblock(name))
        n, h, w, oc, rh, rw_, rc = sch.get_loops(conv)
        cache = sch.cache_write(conv, 0, "global")
        if epi:
            sch.reverse_compute_inline(sch.get_sblock(epi[-1]))
        wo, wi = sch.split(w, [None, rw])
        oco, oci = sch.split(oc, [None, ob])
        ov, ol = sch.split(oci, [None, lanes])
        k = self.dot.k
        rco, rci = sch.split(rc, [None, k])
        sch.reorder(n, h, oco, wo, rh, rw_, rco, wi, ov, ol, rci)
        sch.reverse_compute_at(cache, wo)
        sch.parallel(sch.fuse(n, h, oco))
        _pack(sch, conv, lambda a, b, c, d: (d // ob, a, b, c // k, d % ob, c % k), 3, lanes)
        sch.decompose_reduction(conv, rh)
        sch.tensorize(ol, self.dot.intrin(lanes))
        sch.unroll(ov)
        sch.unroll(wi)
        vectorize_tail(sch, sch.get_loops(cache)[-1], lanes)
        for name in pre:
            _schedule_pad(sch, sch.get_sblock(name), lanes)
        return sch.mod["main"]


def _pack(sch: s_tir.Schedule, block, index_map, out_axis: int, lanes: int,
          prepack: bool = True):
    """Copy the weight operand (the read indexed by iter var `out_axis`) into `index_map` layout;
    with `prepack` (constant weights) the copy is marked to move out of the kernel."""
    blk = sch.get(block)
    f = blk.iter_vars[out_axis].var
    idx = next(n for n, r in enumerate(blk.reads)
               if not r.source.same_as(blk.writes[0].source)
               and any(_uses(rg.min, f) for rg in r.region))
    wb = sch.cache_read(block, idx, "global")
    sch.transform_layout(wb, ("write", 0), index_map)
    if prepack:  # `prepack_weights` moves this copy out of the kernel; Relax folds it
        sch.annotate(wb, PREPACK, 1)
    loops = sch.get_loops(wb)
    total = math.prod(extents(sch, loops))
    vectorize_tail(sch, loops[-1], lanes)
    parallel_outer(sch, sch.get_loops(wb)[:1], total)
    return wb


def _uses(expr, var) -> bool:
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr))


class DenseDot:
    """Integer matmul on `dot`, register-tiled: activations [.., M, K] x weights [K, N]
    (constants, packed at compile time), or batched [B.., M, K] x [B.., K, N] with both operands
    computed at run time (int8 attention, ``hwopt.lowering.qattention``): each batch's B is
    packed inside the kernel, (batch, column panel) run in parallel."""

    def __init__(self, dot: Dot):
        self.dot, self.name = dot, f"dense_{dot.name}"

    def match(self, func: tirx.PrimFunc) -> bool:
        sch = s_tir.Schedule(func)
        mm = _mm_block(sch)
        if mm is None or not _int_mac(sch, mm, self.dot):
            return False
        return True

    def candidates(self, func: tirx.PrimFunc, lanes: int) -> list[dict]:
        if lanes not in self.dot.lanes:
            return []
        sch = s_tir.Schedule(func)
        batch, m, n, k = _shape(sch, _mm_block(sch))
        if n % lanes or k % self.dot.k or m < _MIN_ROWS:
            return []
        cands = []
        for mr, vecs in ((4, 3), (6, 2), (3, 4), (4, 2), (2, 4), (1, 4), (2, 2), (1, 2), (1, 1)):
            nr = vecs * lanes
            if mr * vecs > acc_regs(lanes) or n % nr or mr > m:
                continue
            waste = round_up(m, mr) / m - 1.0  # rows padded with zeros (pad_einsum)
            cands.append(({"mr": mr, "nr": nr}, waste))
        cands.sort(key=lambda c: (c[1] > 0.06, -reuse(c[0]["mr"], c[0]["nr"] // lanes)))
        return [c[0] for c in cands[:8]]

    def apply(self, func: tirx.PrimFunc, params: dict, lanes: int) -> tirx.PrimFunc:
        mr, nr = params["mr"], params["nr"]
        sch = s_tir.Schedule(func)
        mm = _mm_block(sch)
        inline_side_inputs(sch, mm)
        mm = _mm_block(sch)
        batch, m, n, k = _shape(sch, mm)
        nb = len(sch.get_loops(mm)) - 3
        name, padded = block_name(sch, mm), m % mr != 0
        before = {block_name(sch, b) for b in blocks(sch)}
        if padded:  # zero rows up to a multiple of mr: a copy of A before, an unpad after
            sch.pad_einsum(mm, [1] * nb + [mr, 1, 1])
            mm = sch.get_sblock(name)
        pre, epi = _split_epilogue(sch, mm)
        copies = [b for b in pre if b not in before]
        for blk in epi[:-1]:
            sch.compute_inline(sch.get_sblock(blk))
        cache = sch.cache_write(mm, 0, "global")
        if epi and not padded:
            sch.reverse_compute_inline(sch.get_sblock(epi[-1]))
        *bl, i, j, kk = sch.get_loops(mm)
        io, ii = sch.split(i, [None, mr])
        jo, ji = sch.split(j, [None, nr])
        jv, jl = sch.split(ji, [None, lanes])
        kd = self.dot.k
        ko, ki = sch.split(kk, [None, kd])
        sch.reorder(*bl, jo, io, ko, ii, jv, jl, ki)
        sch.reverse_compute_at(cache, io)
        if epi and padded:  # the epilogue reads the padded tile: right after it, valid rows
            sch.reverse_compute_at(sch.get_sblock(epi[-1]), io)
            vectorize_tail(sch, sch.get_loops(sch.get_sblock(epi[-1]))[-1], lanes)
        few = batch * (n // nr) < 2
        parallel_outer(sch, [*bl, jo, io] if few else [*bl, jo], batch * m * n * k)
        for blk in copies:
            _schedule_copy(sch, sch.get_sblock(blk), lanes)
        _pack(sch, mm, lambda *x: (*x[:-2], x[-1] // nr, x[-2] // kd, x[-1] % nr, x[-2] % kd),
              nb + 1, lanes, prepack=not bl)
        sch.decompose_reduction(mm, ko)
        sch.tensorize(jl, self.dot.intrin(lanes))
        sch.unroll(jv)
        sch.unroll(ii)
        vectorize_tail(sch, sch.get_loops(cache)[-1], lanes)
        return sch.mod["main"]


def prepack_weights(mod, choices: dict) -> tuple:
    """Move the weight-packing copies the integer rules made (annotated `PREPACK`) out of their
    kernels and fold them on the constant weights: the packed weights become compile-time
    constants. `choices` is re-keyed to the renamed (``*_prepacked``) functions."""
    import tvm
    from tvm import relax

    if not any(c.rule.startswith(("conv2d_nhwc_", "dense_")) or dict(c.params).get("pack")
               for c in choices.values()):
        return mod, choices
    seq = tvm.transform.Sequential([relax.transform.SplitLayoutRewritePreproc(),
                                    relax.transform.FoldConstant(),
                                    relax.transform.DeadCodeElimination()])
    mod = seq(mod)
    names = {gv.name_hint for gv in mod.functions}
    renamed = {(k + "_prepacked" if k not in names and k + "_prepacked" in names else k): c
               for k, c in choices.items()}
    return mod, renamed
