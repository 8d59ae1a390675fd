"""The sparse schedule rule: matches only the sparse kernel; tile choice; schedules it."""
import numpy as np
import tvm
from tvm import te

from hwopt.lowering.sparse import sparse_kernel
from hwopt.schedules import RULES
from hwopt.schedules.sparse import SparseIndexed, _tile


def _func(o=16, j=12, ho=4, wo=16, bias=True):
    xf = te.placeholder((1, 8 * 6 * (wo + 2)), name="x")
    w = te.placeholder((o, j), name="w")
    off = te.placeholder((o, j), "int32", name="off")
    b = te.placeholder((o,), name="b") if bias else None
    y = sparse_kernel(xf, w, off, b, (ho, wo), (1, 1), wo + 2)
    args = [xf, w, off] + ([b] if bias else []) + [y]
    return te.create_prim_func(args)


def test_rule_matches_only_the_sparse_kernel_and_comes_first():
    names = [r.name for r in RULES]
    first_dense = min(i for i, n in enumerate(names) if not n.startswith("sparse_"))
    assert "sparse_indexed" in names[:first_dense]
    assert SparseIndexed().match(_func())
    a = te.placeholder((8, 8), name="a")
    k = te.reduce_axis((0, 8), name="k")
    mm = te.compute((8, 8), lambda i, j: te.sum(a[i, k] * a[k, j], axis=k), name="mm")
    assert not SparseIndexed().match(te.create_prim_func([a, mm]))


def test_tile_fits_the_accumulators():
    assert _tile(56, 7) == (1, 7)
    assert _tile(8, 1) == (8, 1)
    assert _tile(1, 16) == (1, 8)
    rows, vecs = _tile(6, 3)
    assert rows * vecs <= 8 and 6 % rows == 0


def test_scheduled_kernel_computes_the_sparse_conv():
    func = _func()
    rule = SparseIndexed()
    sched = rule.apply(func, rule.candidates(func, 8)[0], 8)
    lib = tvm.compile(tvm.IRModule({"main": sched.with_attr("global_symbol", "main")}),
                      target={"kind": "llvm"})
    rng = np.random.default_rng(0)
    xf = rng.standard_normal((1, 8 * 6 * 18)).astype("float32")
    w = rng.standard_normal((16, 12)).astype("float32")
    off = rng.integers(0, 8 * 6 * 18 - 3 * 18 - 16, (16, 12)).astype("int32")
    b = rng.standard_normal(16).astype("float32")
    out = tvm.runtime.tensor(np.zeros((1, 16, 4, 16), "float32"))
    lib["main"](*[tvm.runtime.tensor(v) for v in (xf, w, off, b)], out)
    h, x = np.meshgrid(np.arange(4), np.arange(16), indexing="ij")
    want = np.einsum("oj,ojhx->ohx", w, xf[0][off[:, :, None, None] + h * 18 + x]) + \
        b[:, None, None]
    np.testing.assert_allclose(out.numpy()[0], want, rtol=1e-4, atol=1e-4)
