"""int8 table lookups (``hwopt::int8_lut``, hwopt.lowering.qlut) with AVX-512 VBMI byte permutes.

TVM scalarizes a load whose index is data (a 256-entry table read per element: 38 us for
197 x 768 int8 values on Zen 4). With VBMI, ``vpermi2b`` picks 64 bytes at once from a 128-byte
table by the low 7 bits of each index byte; two of them (table halves) and a select on the
index's sign give the lookup of 64 int8 values: 2.1 us. The int8 value ``x`` itself is the index:
``x + 128`` is in the upper half exactly when ``x >= 0``, and its low 7 bits are ``x & 127`` in
both halves. Runs in ``LLVMLowering.schedule`` after the rules (which gave the lookup a scalar
injective schedule, what runs without VBMI) and replaces the whole func.
"""
from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.script import tirx as T

from .common import block_name, blocks

BLOCK = "hwopt_lut"  # the name of the lookup's compute (hwopt.lowering.qlut) ...
NAME = "int8_lut"  # ... and of its PrimFunc (only these are looked at: no schedule per func)
_PERMUTE = "llvm.x86.avx512.vpermi2var.qi.512"


def vbmi_lookup(shape: tuple[int, ...]) -> tirx.PrimFunc:
    """``y = table[x + 128]`` for int8 `x` and `y` of `shape`, 64 values per vector."""
    n = 1
    for d in shape:
        n *= d
    nv, tail = n // 64, n % 64
    dims = tuple(T.int64(d) for d in shape)

    @T.prim_func
    def main(x: T.Buffer(dims, "int8"), table: T.Buffer((T.int64(256),), "int8"),
             y: T.Buffer(dims, "int8")):
        T.func_attr({"tirx.noalias": True})
        xf = T.decl_buffer((T.int64(n),), "int8", data=x.data)
        yf = T.decl_buffer((T.int64(n),), "int8", data=y.data)
        for i in T.parallel(nv):
            yf[T.ramp(i * 64, 1, 64)] = T.Select(
                xf[T.ramp(i * 64, 1, 64)] < T.broadcast(T.int8(0), 64),
                T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(_PERMUTE),
                                        table[T.ramp(0, 1, 64)], xf[T.ramp(i * 64, 1, 64)],
                                        table[T.ramp(64, 1, 64)], dtype="int8x64"),
                T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(_PERMUTE),
                                        table[T.ramp(128, 1, 64)], xf[T.ramp(i * 64, 1, 64)],
                                        table[T.ramp(192, 1, 64)], dtype="int8x64"))
        for j in range(tail):
            yf[nv * 64 + j] = table[T.Cast("int32", xf[nv * 64 + j]) + 128]

    return main


def _lookup_shape(func: tirx.PrimFunc) -> tuple[int, ...] | None:
    """The shape of x when `func` is the int8 lookup the qlut converter emits, else None."""
    try:
        sch = s_tir.Schedule(func)
        names = [block_name(sch, b) for b in blocks(sch)]
    except Exception:  # noqa: BLE001 - not a block func
        return None
    if names != [BLOCK] or len(func.params) != 3:
        return None
    blk = sch.get(sch.get_sblock(BLOCK))
    out = blk.writes[0].source
    shape = tuple(int(d) for d in out.shape)
    tables = [r.source for r in blk.reads if tuple(int(d) for d in r.source.shape) == (256,)]
    xs = [r.source for r in blk.reads if tuple(int(d) for d in r.source.shape) == shape]
    if len(blk.reads) != 2 or len(tables) != 1 or len(xs) != 1 or shape == (256,) or \
            any(str(b.dtype) != "int8" for b in (out, tables[0], xs[0])):
        return None
    return shape


def has_vbmi(target) -> bool:
    from tvm.target.codegen import llvm_cpu_has_features

    try:
        return str(target.kind.name) == "llvm" and bool(llvm_cpu_has_features(["avx512vbmi"],
                                                                              target))
    except Exception:  # noqa: BLE001 - not an x86 LLVM target
        return False


def use_vbmi_lookups(mod: tvm.IRModule, target, choices: dict) -> tuple:
    """(mod, choices) with every lookup PrimFunc of the scheduled `mod` replaced by
    `vbmi_lookup` where `target` has VBMI (its choice becomes ``lookup_vbmi``)."""
    from . import Choice

    found = {gv: shape for gv, f in mod.functions.items()
             if isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith(NAME)
             and (shape := _lookup_shape(f)) is not None}
    if not found or not has_vbmi(target):
        return mod, choices
    mod, choices = tvm.IRModule(dict(mod.functions), attrs=mod.attrs), dict(choices)
    for gv, shape in found.items():
        mod[gv] = vbmi_lookup(shape).with_attr("global_symbol", gv.name_hint)
        choices[gv.name_hint] = Choice("lookup_vbmi", ())
    return mod, choices
