"""Replace float32 ``exp`` / ``erf`` / ``tanh`` / ``nearbyint`` (and ``pow(x, 2..4)``) calls by
vectorizable code.

LLVM lowers these calls to scalar libm calls, one per vector lane, so a GELU or softmax loop that
is otherwise vectorized runs at libm speed.  The replacements are the float32 approximations TVM's
``topi.fast_exp`` / ``fast_erf`` / ``fast_tanh`` use (Cephes / Eigen rational polynomials, a few
ulp from libm: far inside the 1e-4 tolerance hwopt checks); ``nearbyint`` (every quantize
kernel's rounding) becomes exact vector arithmetic; ``pow`` by a small integer constant
becomes multiplications.  Only SBlock bodies that are a plain
``BufferStore`` are rewritten; any other statement, and any expression node the rewriter does not
know, is left as it was (still correct, only slower).
"""
from __future__ import annotations

import logging

from tvm import s_tir, tirx
from tvm.ir import expr as ir_expr
from tvm.ir.prim import expr as pe

log = logging.getLogger("hwopt")

_BINARY = (pe.Add, pe.Sub, pe.Mul, pe.Div, pe.Min, pe.Max, pe.FloorDiv, pe.FloorMod, pe.Mod,
           pe.EQ, pe.NE, pe.LT, pe.LE, pe.GT, pe.GE, pe.And, pe.Or)


def _f(v: float):
    return tirx.const(v, "float32")


def _poly(x, coeffs):
    acc = _f(coeffs[0])
    for c in coeffs[1:]:
        acc = acc * x + _f(c)
    return acc


def fast_exp(x):
    """exp(x) as 2**n * p(f) with a degree-7 polynomial (Cephes expf)."""
    x = tirx.max(tirx.min(x, _f(88.3762626647950)), _f(-88.3762626647949))
    n = tirx.floor(x * _f(1.44269504088896341) + _f(0.5))
    f = x - n * _f(0.6931471805599453)
    p = _poly(f, (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                  1.6666665459e-1, 5.0000001201e-1)) * f * f + f + _f(1.0)
    scale = tirx.reinterpret("float32", tirx.shift_left(
        tirx.Cast("int32", n + _f(127.0)), tirx.const(23, "int32")))
    return tirx.max(scale * p, x)


def fast_erf(x):
    """erf(x) as an odd rational function on [-4, 4] (Eigen's float erf)."""
    x = tirx.max(tirx.min(x, _f(4.0)), _f(-4.0))
    x2 = x * x
    p = x * _poly(x2, (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
                       -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
                       -1.60960333262415e-02))
    q = _poly(x2, (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
                   -7.37332916720468e-03, -1.42647390514189e-02))
    return p / q


def fast_tanh(x):
    """tanh(x) as an odd rational function on [-9, 9]; x itself below 4e-4 (Eigen's float tanh)."""
    xc = tirx.max(tirx.min(x, _f(9.0)), _f(-9.0))
    x2 = xc * xc
    p = xc * _poly(x2, (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
                        5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04,
                        4.89352455891786e-03))
    q = _poly(x2, (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03,
                   4.89352518554385e-03))
    return tirx.Select(tirx.abs(x) < _f(0.0004), x, p / q)


def exact_nearbyint(x):
    """Round half to even, as LLVM's own ``llvm.nearbyint`` intrinsic (one vrndscaleps per
    vector). TVM's vectorizer keeps a ``tirx.nearbyint`` call scalar, and LLVM then turned every
    quantize loop into a gathering one (3.5x slower); the intrinsic is the same function."""
    return tirx.call_llvm_pure_intrin("float32", "llvm.nearbyint", x)


_FAST = {"tirx.exp": fast_exp, "tirx.erf": fast_erf, "tirx.tanh": fast_tanh,
         "tirx.nearbyint": exact_nearbyint}


def _rewrite(e):
    """``e`` with every float32 exp/erf/tanh/small pow replaced; unknown nodes are kept as is."""
    if isinstance(e, ir_expr.Call):
        args = [_rewrite(a) for a in e.args]
        name = getattr(e.op, "name", "")
        fast = _FAST.get(name)
        if fast is not None and str(e.ty) == "float32" and len(args) == 1:
            return fast(args[0])
        if name == "tirx.pow" and _small_power(args[1]):
            out = args[0]
            for _ in range(int(args[1].value) - 1):
                out = out * args[0]
            return out
        if all(a.same_as(b) for a, b in zip(args, e.args, strict=True)):
            return e
        return ir_expr.Call(e.op, args, attrs=e.attrs, ret_ty=e.ty)
    if isinstance(e, _BINARY):
        a, b = _rewrite(e.a), _rewrite(e.b)
        return e if a.same_as(e.a) and b.same_as(e.b) else type(e)(a, b)
    if isinstance(e, pe.Cast):
        v = _rewrite(e.value)
        return e if v.same_as(e.value) else pe.Cast(e.ty, v)
    if isinstance(e, pe.Select):
        c, t, f = _rewrite(e.condition), _rewrite(e.true_value), _rewrite(e.false_value)
        return pe.Select(c, t, f)
    return e


def _small_power(exponent) -> bool:
    """True for a constant exponent 2, 3 or 4 (pow(x, n) is then n - 1 multiplications)."""
    return isinstance(exponent, (pe.FloatImm, pe.IntImm)) and float(exponent.value) in (2, 3, 4)


def _has_slow_call(text: str) -> bool:
    return any(f"T.{name}(" in text for name in ("exp", "erf", "tanh", "pow", "nearbyint"))


def use_fast_math(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with its float32 exp/erf/tanh/pow calls replaced (see module doc)."""
    if not _has_slow_call(func.script()):
        return func
    sch = s_tir.Schedule(func)
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        blk = sch.get(block)
        body = blk.body
        if not isinstance(body, tirx.BufferStore):
            continue
        value = _rewrite(body.value)
        if value.same_as(body.value):
            continue
        new = s_tir.SBlock(blk.iter_vars, blk.reads, blk.writes, blk.name_hint,
                           tirx.BufferStore(body.buffer, value, body.indices), blk.init,
                           blk.alloc_buffers, blk.match_buffers, blk.annotations)
        sch.state.replace(sch.get_sref(block), new, {blk: new})
    return sch.mod["main"]
