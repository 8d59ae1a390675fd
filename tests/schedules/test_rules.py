"""Numeric and robustness tests for hwopt.schedules on small TE-built PrimFuncs."""
from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import tvm
from tvm import te, tirx

from hwopt.schedules import RULES, Choice, schedule_func, schedule_module


def _rule(name: str):
    return next(r for r in RULES if r.name == name)

LANES = 8
TARGET = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                            "num-cores": 2})


def _run(func: tirx.PrimFunc, arrays: list[np.ndarray]) -> list[np.ndarray]:
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    lib = tvm.compile(mod, target=TARGET)
    args = [tvm.runtime.tensor(a) for a in arrays]
    lib["main"](*args)
    return [a.numpy() for a in args]


def _dense_bias_relu(b, m, n, k):
    shape_a = (b, m, k) if b else (m, k)
    shape_b = (b, k, n) if b else (k, n)
    A = te.placeholder(shape_a, name="A")
    B = te.placeholder(shape_b, name="B")
    bias = te.placeholder((n,), name="bias")
    r = te.reduce_axis((0, k), "k")
    if b:
        C = te.compute((b, m, n), lambda x, i, j: te.sum(A[x, i, r] * B[x, r, j], axis=r),
                       name="matmul")
        D = te.compute((b, m, n), lambda x, i, j: te.max(C[x, i, j] + bias[j], 0.0), name="T_relu")
    else:
        C = te.compute((m, n), lambda i, j: te.sum(A[i, r] * B[r, j], axis=r), name="matmul")
        D = te.compute((m, n), lambda i, j: te.max(C[i, j] + bias[j], 0.0), name="T_relu")
    return te.create_prim_func([A, B, bias, D])


def _conv_nhwc(h, w, ci, co, kh, stride, groups=1):
    pad = kh // 2
    X = te.placeholder((1, h, w, ci), name="X")
    W = te.placeholder((kh, kh, ci // groups, co), name="W")
    scale = te.placeholder((co,), name="scale")
    P = te.compute((1, h + 2 * pad, w + 2 * pad, ci), lambda n, y, x, c: tvm.tirx.if_then_else(
        tvm.tirx.all(y >= pad, y < h + pad, x >= pad, x < w + pad), X[n, y - pad, x - pad, c],
        0.0), name="pad_temp")
    ho, wo = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kh) // stride + 1
    ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kh), "rx")
    rc = te.reduce_axis((0, ci // groups), "rc")
    per = co // groups
    C = te.compute((1, ho, wo, co), lambda n, y, x, f: te.sum(
        P[n, y * stride + ry, x * stride + rx, f // per * (ci // groups) + rc] * W[ry, rx, rc, f],
        axis=[ry, rx, rc]), name="conv2d_nhwc")
    D = te.compute((1, ho, wo, co), lambda n, y, x, f: te.max(C[n, y, x, f] * scale[f], 0.0),
                   name="T_relu")
    return te.create_prim_func([X, W, scale, D])


def _softmax(rows, cols):
    A = te.placeholder((rows, cols), name="A")
    k = te.reduce_axis((0, cols), "k")
    mx = te.compute((rows,), lambda i: te.max(A[i, k], axis=k), name="maxelem")
    e = te.compute((rows, cols), lambda i, j: te.exp(A[i, j] - mx[i]), name="exp")
    k2 = te.reduce_axis((0, cols), "k2")
    s = te.compute((rows,), lambda i: te.sum(e[i, k2], axis=k2), name="expsum")
    out = te.compute((rows, cols), lambda i, j: e[i, j] / s[i], name="norm")
    return te.create_prim_func([A, out])


def _transpose_add(a, b):
    X = te.placeholder((a, b), name="X")
    Y = te.placeholder((b, a), name="Y")
    T = te.compute((b, a), lambda i, j: X[j, i], name="T_transpose")
    out = te.compute((b, a), lambda i, j: T[i, j] + Y[i, j] * 2.0, name="T_add")
    return te.create_prim_func([X, Y, out])


def _rand(*shape):
    return np.random.default_rng(0).standard_normal(shape).astype("float32")


@pytest.mark.parametrize("b,m,n,k", [(0, 12, 32, 16), (0, 13, 40, 24), (2, 9, 17, 8),
                                     (0, 1, 10, 32)])
def test_dense(b, m, n, k):
    func = _dense_bias_relu(b, m, n, k)
    if b:
        a, w, bias = _rand(b, m, k), _rand(b, k, n), _rand(n)
    else:
        a, w, bias = _rand(m, k), _rand(k, n), _rand(n)
    for params in [None] + _rule("dense").candidates(func, LANES)[:3]:
        sched, choice = schedule_func(func, LANES, params)
        assert choice.rule == "dense"
        out = _run(sched, [a, w, bias, np.zeros((b, m, n) if b else (m, n), "float32")])[-1]
        np.testing.assert_allclose(out, np.maximum(a @ w + bias, 0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("h,ci,co,kh,stride,groups", [(8, 4, 16, 3, 1, 1), (14, 8, 32, 3, 2, 1),
                                                        (7, 16, 16, 3, 1, 16), (6, 8, 24, 1, 1, 1)])
def test_conv2d(h, ci, co, kh, stride, groups):
    import torch

    func = _conv_nhwc(h, h, ci, co, kh, stride, groups)
    x, w, scale = _rand(1, h, h, ci), _rand(kh, kh, ci // groups, co), _rand(co)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2),
                                     torch.from_numpy(w).permute(3, 2, 0, 1), stride=stride,
                                     padding=kh // 2, groups=groups)
    ref = np.maximum(ref.permute(0, 2, 3, 1).numpy() * scale, 0)
    for params in [None] + _rule("conv2d_nhwc").candidates(func, LANES)[:3]:
        sched, choice = schedule_func(func, LANES, params)
        assert choice.rule == "conv2d_nhwc"
        out = _run(sched, [x, w, scale, np.zeros(ref.shape, "float32")])[-1]
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_softmax():
    func = _softmax(24, 40)
    a = _rand(24, 40)
    for params in ({"fuse_rows": 1}, {"fuse_rows": 0}):
        sched, choice = schedule_func(func, LANES, params)
        assert choice == Choice.of("reduction", params)
        out = _run(sched, [a, np.zeros_like(a)])[-1]
        ref = np.exp(a - a.max(1, keepdims=True))
        np.testing.assert_allclose(out, ref / ref.sum(1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_injective():
    func = _transpose_add(24, 40)
    x, y = _rand(24, 40), _rand(40, 24)
    sched, choice = schedule_func(func, LANES)
    assert choice.rule == "injective"
    out = _run(sched, [x, y, np.zeros_like(y)])[-1]
    np.testing.assert_allclose(out, x.T + 2 * y, rtol=1e-6)


def test_odd_func_never_raises():
    # A scan-like loop nest no rule is written for, and bogus params.
    A = te.placeholder((5, 7), name="A", dtype="int32")
    B = te.compute((7,), lambda j: A[j % 5, j] * 3, name="B")
    func = te.create_prim_func([A, B])
    sched, choice = schedule_func(func, 4, {"bogus": 3})
    assert isinstance(sched, tirx.PrimFunc)
    out = _run(sched, [np.arange(35, dtype="int32").reshape(5, 7), np.zeros(7, "int32")])[-1]
    want = np.arange(35).reshape(5, 7)[np.arange(7) % 5, np.arange(7)] * 3
    np.testing.assert_array_equal(out, want)
    # Params meant for another rule must not raise either.
    bogus = {"mr": 7, "nr": 3, "k_unroll": 1, "oc_block": 3, "reg_w": 9}
    _, choice = schedule_func(_softmax(3, 5), 16, bogus)
    assert choice.rule == "reduction"


def test_choice_json_roundtrip():
    choice = Choice.of("conv2d_nhwc", {"reg_w": 7, "oc_block": 64})
    assert choice.params == (("oc_block", 64), ("reg_w", 7))
    data = json.loads(json.dumps(asdict(choice)))
    back = Choice(data["rule"], tuple(tuple(p) for p in data["params"]))
    assert back == choice


def test_schedule_module_with_pick():
    mod = tvm.IRModule({"mm": _dense_bias_relu(0, 12, 32, 16), "sm": _softmax(8, 16)})
    seen = {}

    def pick(name, func, rule, cands):
        seen[name] = rule.name
        return cands[-1]

    out, choices = schedule_module(mod, LANES, pick)
    assert seen == {"mm": "dense", "sm": "reduction"}
    assert all(c.rule != "none" for c in choices.values())
    assert isinstance(out["mm"], tirx.PrimFunc)
