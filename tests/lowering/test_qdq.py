"""Quantized graphs lowered to integer TVM kernels (hwopt.lowering.qdq, hwopt.schedules.int8)."""
import copy
import re

import pytest
import torch
import torch.nn as nn
import tvm
from hwopt.targets.cpu import TARGET as CPU
from int8_dots import LANES, RULE, dots, target

import hwopt
from hwopt.capture import from_module
from hwopt.errors import LoweringError
from hwopt.lowering.canonicalize import canonicalize
from hwopt.lowering.qdq import fold_requantize, fuse_int8_layers, max_output_lsb
from hwopt.lowering.region import check_close
from hwopt.lowering.relax_import import to_relax
from hwopt.pass_base import PassContext, get_pass
from hwopt.quant import sqnr
from hwopt.schedules import schedule_module

qd = torch.ops.quantized_decomposed
aten = torch.ops.aten
INTRIN = {"i16": "pmadd", "vnni": "vpdpbusd"}


class Net(nn.Module):
    """conv (3 input channels: odd, padded to 4) -> conv -> flatten -> linear (M=16 rows)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(64, 16)

    def forward(self, x):
        y = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(y.reshape(16, 64))


def _quantized(model, x, observer="minmax"):
    cap = from_module(model, (x,))
    g = torch.Generator().manual_seed(1)
    ctx = PassContext(target=CPU, example_inputs=(x,),
                      calibration=[(torch.randn(x.shape, generator=g),) for _ in range(3)])
    gm = get_pass("fuse")(cap.gm, ctx).graph_module
    return get_pass("quantize", {"use_cost_model": False, "observer": observer})(
        gm, ctx).graph_module


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    return Net().eval(), x, _quantized(Net().eval().requires_grad_(False), x)


def _ops(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_fuse_int8_layers_is_exact_in_eager(net):
    _, x, gm = net
    fused = copy.deepcopy(gm)
    assert fuse_int8_layers(fused) >= 3
    ops = _ops(fused)
    assert ops.count(torch.ops.hwopt.qconv2d.default) == 2
    assert ops.count(torch.ops.hwopt.qlinear.default) == 1
    assert aten.convolution.default not in ops and aten.addmm.default not in ops
    with torch.no_grad():
        torch.testing.assert_close(fused(x), gm(x), rtol=0, atol=0)


def test_fold_requantize_moves_int8_values():
    def f(q):
        y = qd.dequantize_per_tensor.default(q, 0.1, 3, -128, 127, torch.int8)
        y = y.reshape(2, 8).permute(1, 0)
        return qd.quantize_per_tensor.default(y, 0.1, 3, -128, 127, torch.int8)

    from torch.fx.experimental.proxy_tensor import make_fx

    q = torch.randint(-128, 128, (4, 4), dtype=torch.int8)
    gm = make_fx(f)(q)  # ATen ops, as the passes see them
    want = f(q)
    assert fold_requantize(gm) == 1
    gm.recompile()
    assert not any("quantize" in str(t) for t in _ops(gm))
    assert torch.equal(gm(q), want)


class PoolNet(nn.Module):
    """conv -> ReLU -> max pool -> conv: the pool between two int8 layers."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.c2(nn.functional.max_pool2d(torch.relu(self.c1(x)), 2))


@pytest.mark.parametrize("observer", ["minmax", "percentile"])  # percentile: own qparams
def test_max_pool_between_int8_layers_pools_int8_values(observer):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    gm = _quantized(PoolNet().eval().requires_grad_(False), x, observer)
    fused = copy.deepcopy(gm)
    assert fuse_int8_layers(fused) >= 2
    pools = [n for n in fused.graph.nodes if "max_pool2d" in str(n.target)]
    assert pools and all(n.args[0].target is torch.ops.hwopt.qconv2d.default for n in pools)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), gm(x), rtol=0, atol=0)  # exact: same qparams


def _scheduled(gm, x, dot: str = "i16"):
    t = CPU.tvm()
    mod = CPU.lowering.prepare(to_relax(canonicalize(gm), (x,), dot), t)
    return schedule_module(mod, lanes=LANES)


INT_LOADS = {"i16": {"int16", "int32", "int16x2", "int16x16", "int16x32", "int32x8", "int32x16"},
             "vnni": {"uint8x4", "int8x64", "int32", "int32x16"}}
LL_OPERANDS = {"i16": ("<16 x i16>", "<32 x i16>"), "vnni": ("<64 x i8>",)}


@pytest.mark.parametrize("dot", dots())
def test_int8_kernels_are_integer_arithmetic(net, dot):
    """The conv and matmul main loops are integer dot products (int16 pairs on vpmaddwd, or
    uint8 x int8 quads on vpdpbusd), with no float multiply."""
    _, x, gm = net
    mod, choices = _scheduled(gm, x, dot)
    int_funcs = {k for k, c in choices.items() if c.rule in RULE[dot]}
    assert sum("conv2d" in k for k in int_funcs) == 2 and sum("matmul" in k for k in int_funcs) == 1
    for name in int_funcs:
        loop = _reduction_loop(mod[name], INTRIN[dot])
        muls, calls = _arith(loop)
        assert INTRIN[dot] in " ".join(calls), name
        assert not [m for m in muls if m.startswith("float")], (name, muls)
        loads = _load_dtypes(loop)
        assert loads and loads <= INT_LOADS[dot], (name, loads)
    lib = tvm.compile(tvm.IRModule({"main": mod[next(iter(int_funcs))].with_attr(
        "global_symbol", "main")}), target=CPU.tvm())
    ll = lib.mod.inspect_source("ll")
    assert "llvm.x86.avx" in ll and INTRIN[dot] in ll
    assert any(t in ll for t in LL_OPERANDS[dot])  # integer vector operands


def _walk(obj, fn):
    """Visit every TVM IR object reachable through its reflected fields (pre-order)."""
    if isinstance(obj, (list, tuple)) or type(obj).__name__ in ("Array", "List"):
        for x in obj:
            _walk(x, fn)
        return
    info = getattr(type(obj), "__tvm_ffi_type_info__", None)
    if info is None:
        return
    fn(obj, info.type_key)
    while info is not None:
        for f in info.fields:
            if f.name not in ("span", "ty", "buffer"):
                _walk(getattr(obj, f.name), fn)
        info = info.parent_type_info


def _reduction_loop(func, intrin: str):
    """The main loop: the outermost loop around the dot product without the init/write-back."""
    found = []

    def visit(node, key):
        text = str(node.body) if key == "tirx.For" else ""
        blocks = set(re.findall(r'sblock\("([^"]+)"', text))
        if intrin in text and blocks and all("update" in b for b in blocks):
            found.append(node)

    _walk(func.body, visit)
    assert found, f"no loop around a {intrin} call"
    return found[0]


def _arith(stmt):
    """dtypes of the multiplies, and the names of the intrinsics called, inside `stmt`."""
    muls, calls = [], []

    def visit(node, key):
        if key == "prim.Mul":
            muls.append(str(node.ty.dtype))
        elif key == "ir.Call":
            op = str(getattr(node.op, "name", node.op))
            calls.append(str(node) if "llvm" in op else op)  # the printer names the intrinsic
            if "fma" in op:
                muls.append(str(node.ty.dtype))

    _walk(stmt, visit)
    return muls, calls


def _load_dtypes(stmt):
    out = set()

    def visit(node, key):
        if key == "ir.TensorLoad":
            out.add(str(node.ty.dtype))

    _walk(stmt, visit)
    return out


@pytest.mark.parametrize("dot", dots())
def test_compiled_int8_matches_fake_quant_within_one_lsb(net, dot):
    model, x, gm = net
    art = hwopt.compile(model, (x,), target=target(dot), passes=["fuse", "quantize"],
                        pass_config={"quantize": {"use_cost_model": False}},
                        calibration=[(torch.randn(x.shape),) for _ in range(3)],
                        executor="tvm", strict=True, cache_dir=False, progress=False)
    (region,) = art.compiled.regions
    assert region.executor == "tvm"
    assert any(c[0] == RULE[dot][0] for c in region.kernels.values())
    if dot == "vnni":  # c2's input (after a ReLU) has zero point 0: padded inside the conv
        assert not any(re.search(r"transpose\d*_pad\d*_transpose", k) for k in region.kernels)
    fake = art.compiled.graph  # the eager fake-quant graph the pass produced
    lsb = max_output_lsb(fake)
    for batch in (x, torch.randn(x.shape)):
        with torch.no_grad():
            got, want = art(batch), fake(batch)[0]
        got = got if isinstance(got, torch.Tensor) else got[0]
        assert float((got - want).abs().max()) <= lsb + 1e-6
        assert sqnr(model(batch), got) >= 20.0


def test_check_close_allows_requantization_rounding_only():
    want = torch.linspace(-1, 1, 1000)
    lsb = 2 / 255
    one = want.clone()
    one[7] += lsb  # a value one step off: a requantization tie
    one[9] -= 1.5 * lsb  # ... and a neighbour it moved a bit further
    check_close(one, want, "r", lsb=lsb)
    far = want.clone()
    far[7] += 2.5 * lsb
    with pytest.raises(LoweringError, match="LSB"):
        check_close(far, want, "r", lsb=lsb)
    shifted = want + lsb  # every value one step off: a wrong zero point
    with pytest.raises(LoweringError, match="systematic"):
        check_close(shifted, want, "r", lsb=lsb)
    flips = want.clone()  # many values a step off, both ways: rounding, not a wrong constant
    flips[::10] += lsb
    flips[5::10] -= lsb
    check_close(flips, want, "r", lsb=lsb)
    # An output much smaller than the region's largest scale, every value a step off either way
    small = want / 10
    noisy = small + lsb * torch.sign(torch.randn(1000, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(LoweringError, match="RMS"):
        check_close(noisy, small, "r", lsb=lsb)
    q = torch.randint(-128, 127, (200,), dtype=torch.int8)
    check_close(q + (torch.arange(200) == 3).to(torch.int8), q, "r", lsb=lsb)
    with pytest.raises(LoweringError, match="steps"):
        check_close(q, q + 2 * (torch.arange(200) == 3).to(torch.int8), "r", lsb=lsb)
    with pytest.raises(LoweringError):  # without lsb: the fp32 rule (1e-4)
        check_close(one, want, "r")


def test_torch_compile_backend_end_to_end():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 4, 8, 8)
    fast = torch.compile(model, backend="hwopt", options={
        "target": CPU, "passes": ["fuse", "quantize"], "executor": "tvm", "strict": True,
        "calibration": [(torch.randn(1, 4, 8, 8),) for _ in range(3)], "progress": False,
        "pass_config": {"quantize": {"use_cost_model": False}}, "cache_dir": False})
    with torch.no_grad():
        got, want = fast(x), model(x)
    assert 20.0 <= sqnr(want, got) < 100.0  # quantized (not fp32), and accurate
    torch._dynamo.reset()


@pytest.mark.parametrize("dot", dots())
@pytest.mark.parametrize("rows", [1, 13])  # a GEMV, and rows the register tile must pad
def test_linear_int8_kernel_rows(rows, dot):
    torch.manual_seed(0)
    # K = 34: not a multiple of 4 (VNNI pads it); N = 48 and 16: multiples of the lanes
    model = nn.Sequential(nn.Linear(34, 48), nn.ReLU(), nn.Linear(48, 16)).eval()
    x = torch.randn(rows, 34)
    art = hwopt.compile(model, (x,), target=target(dot), passes=["fuse", "quantize"],
                        pass_config={"quantize": {"use_cost_model": False}},
                        calibration=[(torch.randn(rows, 34),) for _ in range(8)],
                        executor="tvm", strict=True, cache_dir=False, progress=False)
    (region,) = art.compiled.regions
    assert [c[0] for c in region.kernels.values()].count(RULE[dot][1]) == 2
    fake = art.compiled.graph
    with torch.no_grad():
        got, want = art(x), fake(x)[0]
    got = got if isinstance(got, torch.Tensor) else got[0]
    assert float((got - want).abs().max()) <= max_output_lsb(fake) + 1e-6
