"""Tests for the AVX2-oriented schedule features: fast math, vector row reductions, packing."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import tvm
from tvm import te, tirx

from hwopt.schedules import RULES, schedule_func
from hwopt.schedules.fastmath import use_fast_math


def _rule(name: str):
    return next(r for r in RULES if r.name == name)

LANES = 8
TARGET = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                            "num-cores": 2})


def _run(func, arrays):
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    lib = tvm.compile(mod, target=TARGET)
    args = [tvm.runtime.tensor(a) for a in arrays]
    lib["main"](*args)
    return [a.numpy() for a in args]


def _rand(*shape):
    return np.random.default_rng(0).standard_normal(shape).astype("float32")


_ERF = np.vectorize(math.erf)


@pytest.mark.parametrize("name,op,ref", [
    ("exp", te.exp, np.exp),
    ("erf", te.erf, _ERF),
    ("tanh", te.tanh, np.tanh),
    ("pow", lambda x: te.power(x, 3.0), lambda x: x ** 3),
])
def test_fast_math_accuracy(name, op, ref):
    x = np.concatenate([np.linspace(-80, 80, 4001), np.linspace(-5, 5, 4001),
                        [0.0, 1e-6, -3e-4]]).astype("float32")
    A = te.placeholder(x.shape, name="A")
    B = te.compute(x.shape, lambda i: op(A[i]) * 2.0, name="B")
    func = use_fast_math(te.create_prim_func([A, B]))
    assert f"T.{name}(" not in func.script()
    got = _run(func, [x, np.zeros_like(x)])[-1]
    want = 2 * ref(x.astype("float64"))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)


def test_fast_math_leaves_other_funcs_alone():
    A = te.placeholder((16,), name="A")
    B = te.compute((16,), lambda i: te.sqrt(A[i]), name="B")
    func = te.create_prim_func([A, B])
    assert use_fast_math(func).same_as(func)


def test_quantize_rounding_is_exact_and_vectorized():
    """nearbyint (every quantize kernel) stays round-half-to-even and becomes vector code: TVM
    kept the call scalar and LLVM then vectorized the loop with gathers (3.5x slower)."""
    from tvm import tirx

    x = _rand(128, 256) * 300
    x[0, :40] = np.arange(-20, 20) + 0.5  # ties
    x[1, :8] = [2**22 + 0.5, -(2**22 + 0.5), 2**23 + 2, 1e10, -0.3, -0.0, np.inf, np.nan]
    A = te.placeholder(x.shape, name="A")
    Q = te.compute(x.shape, lambda i, j: tirx.Cast("int8", te.max(te.min(
        tirx.nearbyint(A[i, j] * 0.5), 127.0), -128.0)), name="Q")
    R = te.compute(x.shape, lambda i, j: tirx.nearbyint(A[i, j]), name="R")
    for out, want in ((Q, np.clip(np.rint(x * 0.5), -128, 127)), (R, np.rint(x))):
        sched, choice = schedule_func(te.create_prim_func([A, out]), 16)
        assert choice.rule == "injective"
        mod = tvm.IRModule({"main": sched.with_attr("global_symbol", "main")})
        ll = tvm.tirx.build(mod, target=TARGET).inspect_source("ll")
        assert "masked.gather" not in ll and "llvm.nearbyint.v" in ll
        fin = np.isfinite(want) if out is R else np.isfinite(x)
        got = _run(sched, [x, np.zeros(x.shape, str(out.dtype))])[-1]
        np.testing.assert_array_equal(got[fin], want[fin].astype(got.dtype))
        if out is R:
            assert np.isnan(got[1, 7]) and got[1, 6] == np.inf
            assert (np.signbit(got) == np.signbit(want))[~np.isnan(want)].all()


def _layer_norm(rows, cols):
    A = te.placeholder((rows, cols), name="A")
    k = te.reduce_axis((0, cols), "k")
    s = te.compute((rows,), lambda i: te.sum(A[i, k], axis=k), name="A_sum")
    k2 = te.reduce_axis((0, cols), "k2")
    v = te.compute((rows,), lambda i: te.sum((A[i, k2] - s[i] / cols) * (A[i, k2] - s[i] / cols),
                                             axis=k2), name="A_var")
    out = te.compute((rows, cols), lambda i, j: (A[i, j] - s[i] / cols)
                     * te.rsqrt(v[i] / cols + 1e-5), name="norm")
    return te.create_prim_func([A, out])


def test_row_reduction_is_vectorized():
    func = _layer_norm(12, 64)
    sched, choice = schedule_func(func, LANES)
    assert choice.rule == "reduction" and dict(choice.params) == {"fuse_rows": 1}
    text = sched.script()
    assert "_rf" in text and "T.vectorized" in text
    # the partial sums are the vector lanes of both row reductions (not a unit loop)
    assert text.count(f"T.vectorized({LANES})") >= 5
    a = _rand(12, 64)
    out = _run(sched, [a, np.zeros_like(a)])[-1]
    ref = (a - a.mean(1, keepdims=True)) / np.sqrt(a.var(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_ragged_elementwise_rows_vectorized():
    X = te.placeholder((3, 37), name="X")
    Y = te.compute((3, 37), lambda i, j: X[i, j] * 2.0 + 1.0, name="Y")
    sched, choice = schedule_func(te.create_prim_func([X, Y]), LANES)
    assert choice.rule == "injective" and "T.vectorized" in sched.script()
    x = _rand(3, 37)
    np.testing.assert_allclose(_run(sched, [x, np.zeros_like(x)])[-1], x * 2 + 1, rtol=1e-6)


def _matmul(m, n, k):
    A = te.placeholder((m, k), name="A")
    B = te.placeholder((k, n), name="B")
    r = te.reduce_axis((0, k), "k")
    C = te.compute((m, n), lambda i, j: te.sum(A[i, r] * B[r, j], axis=r), name="matmul")
    return te.create_prim_func([A, B, C])


@pytest.mark.parametrize("m,n,k", [(64, 64, 32), (30, 100, 16)])
def test_dense_packs_b_panels(m, n, k):
    func = _matmul(m, n, k)
    cand = _rule("dense").candidates(func, LANES)[0]
    assert cand["pack"] == 1
    sched, _ = schedule_func(func, LANES, cand)
    assert re.search(r"B(_pad)?_global", sched.script())  # the packed panel buffer
    a, b = _rand(m, k), _rand(k, n)
    out = _run(sched, [a, b, np.zeros((m, n), "float32")])[-1]
    np.testing.assert_allclose(out, a @ b, rtol=1e-4, atol=1e-4)


def _conv(ci, co, groups):
    X = te.placeholder((1, 10, 10, ci), name="X")
    W = te.placeholder((3, 3, ci // groups, co), name="W")
    ry, rx = te.reduce_axis((0, 3), "ry"), te.reduce_axis((0, 3), "rx")
    rc = te.reduce_axis((0, ci // groups), "rc")
    per = co // groups
    C = te.compute((1, 8, 8, co), lambda n, y, x, f: te.sum(
        X[n, y + ry, x + rx, f // per * (ci // groups) + rc] * W[ry, rx, rc, f],
        axis=[ry, rx, rc]), name="conv2d_nhwc")
    return te.create_prim_func([X, W, C])


@pytest.mark.parametrize("ci,co,groups,pack", [(16, 32, 1, 1), (16, 16, 16, 0)])
def test_conv_packs_weights_unless_depthwise(ci, co, groups, pack):
    import torch

    func = _conv(ci, co, groups)
    cand = _rule("conv2d_nhwc").candidates(func, LANES)[0]
    assert cand["pack"] == pack
    sched, _ = schedule_func(func, LANES, cand)
    x, w = _rand(1, 10, 10, ci), _rand(3, 3, ci // groups, co)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2),
                                     torch.from_numpy(w).permute(3, 2, 0, 1), groups=groups)
    out = _run(sched, [x, w, np.zeros((1, 8, 8, co), "float32")])[-1]
    np.testing.assert_allclose(out, ref.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-4)


def test_global_pool_reduces_with_channel_vectors():
    X = te.placeholder((1, 7, 7, 32), name="X")
    ry, rx = te.reduce_axis((0, 7), "ry"), te.reduce_axis((0, 7), "rx")
    S = te.compute((1, 1, 1, 32), lambda n, a, b, c: te.sum(X[n, ry, rx, c], axis=[ry, rx]),
                   name="X_red")
    M = te.compute((1, 1, 1, 32), lambda n, a, b, c: S[n, a, b, c] / 49.0, name="T_divide")
    sched, choice = schedule_func(te.create_prim_func([X, M]), LANES)
    assert choice.rule == "reduction" and "T.vectorized" in sched.script()
    x = _rand(1, 7, 7, 32)
    out = _run(sched, [x, np.zeros((1, 1, 1, 32), "float32")])[-1]
    np.testing.assert_allclose(out, x.mean((1, 2), keepdims=True), rtol=1e-5, atol=1e-6)


def test_nchw_to_nhwc_input_vectorizes_width():
    X = te.placeholder((1, 3, 8, 32), name="X")
    Y = te.compute((1, 8, 32, 3), lambda n, h, w, c: X[n, c, h, w], name="T_transpose")
    sched, choice = schedule_func(te.create_prim_func([X, Y]), LANES)
    assert choice.rule == "injective" and "T.vectorized" in sched.script()
    x = _rand(1, 3, 8, 32)
    out = _run(sched, [x, np.zeros((1, 8, 32, 3), "float32")])[-1]
    np.testing.assert_array_equal(out, x.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("perm,shape", [((0, 2, 3, 1), (1, 128, 4, 64)),  # K^T per head
                                        ((0, 2, 1, 3), (1, 128, 4, 64)),  # head split: plain
                                        ((1, 0), (48, 32))])
def test_transposing_copies_tile_through_a_local_buffer(perm, shape):
    from tvm import topi

    rows = shape[0] * shape[1] if len(shape) == 4 else shape[0]
    A = te.placeholder((rows, math.prod(shape) // rows), name="A")
    T = topi.transpose(topi.reshape(A, shape), perm)
    sched, choice = schedule_func(te.create_prim_func([A, T]), 16)
    tiled = dict(choice.params).get("tile_transpose") == 1
    # the output's inner axis reads a strided input axis only for K^T and the 2-D transpose
    assert tiled == (perm != (0, 2, 1, 3))
    assert ('scope="local"' in sched.script()) == tiled
    a = _rand(*(int(d) for d in A.shape))
    want = a.reshape(shape).transpose(perm)
    got = _run(sched, [a, np.zeros(want.shape, "float32")])[-1]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", ["float32", "int32"])
def test_lone_row_max_or_sum_is_vectorized(dtype):
    """A func that is one row reduction (a mask's max, int8 attention's row max and row sum)
    reduces through vector partials too; it ran scalar (25 us vs 3.2 us for 591 x 208)."""
    X = te.placeholder((6, 64), dtype, name="X")
    k = te.reduce_axis((0, 64), "k")
    op = te.max if dtype == "float32" else te.sum
    Y = te.compute((6, 1), lambda i, j: op(X[i, k], axis=k), name="Y")
    sched, choice = schedule_func(te.create_prim_func([X, Y]), LANES)
    assert choice.rule == "reduction"
    text = sched.script()
    assert "_rf" in text and f"T.vectorized({LANES})" in text
    x = (_rand(6, 64) * 100).astype(dtype)
    want = x.max(1, keepdims=True) if dtype == "float32" else x.sum(1, keepdims=True)
    np.testing.assert_array_equal(_run(sched, [x, np.zeros((6, 1), dtype)])[-1], want)


def test_masked_scores_with_padded_keys_keep_the_dense_rule():
    """``QK^T * s + pad(mask)``: the mask's pad, fused before the matmul, is inlined into the
    epilogue (it stopped the epilogue folding into the tile: the func fell to a scalar rule)."""
    A = te.placeholder((1, 2, 13, 32), name="A")
    B = te.placeholder((1, 2, 32, 16), name="B")
    M = te.placeholder((1, 1, 1, 13), name="M")
    P = te.compute((1, 1, 1, 16), lambda a, b, c, j: tirx.if_then_else(
        j < 13, M[a, b, c, j], tirx.const(-1e9, "float32")), name="PadInput")  # as topi pads
    r = te.reduce_axis((0, 32), "k")
    C = te.compute((1, 2, 13, 16), lambda a, b, i, j: te.sum(A[a, b, i, r] * B[a, b, r, j],
                                                             axis=r), name="matmul")
    S = te.compute(C.shape, lambda a, b, i, j: C[a, b, i, j] * 0.5, name="T_multiply")
    # P first: its block comes before the matmul, as FuseOps orders the real func
    D = te.compute(C.shape, lambda a, b, i, j: P[a, 0, 0, j] + S[a, b, i, j], name="T_add")
    sched, choice = schedule_func(te.create_prim_func([A, B, M, D]), 16)  # one 16-lane panel
    assert choice.rule == "dense"
    a, b, m = _rand(1, 2, 13, 32), _rand(1, 2, 32, 16), _rand(1, 1, 1, 13)
    pm = np.concatenate([m, np.full((1, 1, 1, 3), -1e9, "float32")], -1)
    out = _run(sched, [a, b, m, np.zeros((1, 2, 13, 16), "float32")])[-1]
    np.testing.assert_allclose(out, a @ b * 0.5 + pm, rtol=1e-4, atol=1e-4)


def test_short_channel_layout_change_copies_without_gathers():
    """NCHW -> padded NHWC with 4 channels and a 10-wide row (digits CNN input, int8): neither
    axis fills a vector, so the copy is not vectorized by TVM (its fused index gathered 4 bytes
    at a time: 35 -> 5 us in the digits CNN)."""
    X = te.placeholder((6, 1, 8, 8), name="X")
    Y = te.compute((6, 10, 10, 4), lambda n, h, w, c: tirx.if_then_else(
        tirx.all(c < 1, h >= 1, h < 9, w >= 1, w < 9),
        tirx.Cast("uint8", X[n, tirx.min(c, 0), h - 1, w - 1]), tirx.const(0, "uint8")),
        name="T_pad_transpose")  # the quantized input's shift to uint8, padded, NHWC
    sched, choice = schedule_func(te.create_prim_func([X, Y]), 16)
    assert choice.rule == "injective"
    assert "T.vectorized" not in sched.script()  # the fused index as vectors gathered
    x = np.abs(_rand(6, 1, 8, 8) * 50).round()
    want = np.zeros((6, 10, 10, 4), "uint8")
    want[:, 1:9, 1:9, 0] = x[:, 0]
    out = _run(sched, [x, np.zeros_like(want)])[-1]
    np.testing.assert_array_equal(out, want)
