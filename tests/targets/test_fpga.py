"""The fpga target: cycle model, fixed-point requantization, layer extraction, generated C
(compiled by gcc, bit-exact against the simulator), the simulator against the fake-quantized graph,
and the end-to-end compile / run / save path. Q/DQ graphs come from qdq_util, not the quantize
pass."""
from __future__ import annotations

import json
import shutil
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import hwopt
from hwopt.capture import from_module
from hwopt.fpga.cost import FPGACostModel
from hwopt.fpga.int8layer import build_layer
from hwopt.fpga.layers import find_layers
from hwopt.fpga.requant import quantize_multiplier, requantize
from hwopt.fpga.sim import run_layer
from hwopt.fpga.systolic import DATAFLOWS, FPGAConfig, GemmShape, conv_gemm, simulate
from hwopt.graph import propagate_meta
from hwopt.pass_base import Pass, PassContext, PassResult, get_pass
from hwopt.target import get_target

try:
    from .qdq_util import quantize_graph
except ImportError:  # tests/targets is not a package: imported by basename
    from qdq_util import quantize_graph


# -- cycle model -------------------------------------------------------------------------------

def test_os_conv_cycles_by_hand():
    # conv 3x3, 16 -> 32 channels, 8x8 input, pad 1: GEMM m = 8*8 = 64 pixels, n = 32 filters,
    # k = 16*3*3 = 144; 16x16 array, output stationary.
    shape = conv_gemm(1, 16, 8, 8, 32, 3, 3, 8, 8)
    assert (shape.m, shape.n, shape.k, shape.ifmap_bytes) == (64, 32, 144, 1024)
    r = simulate(shape, FPGAConfig(rows=16, cols=16))
    # folds: ceil(64/16) * ceil(32/16) = 4 * 2 = 8; per fold 2*16 + 16 + 144 - 2 = 190 cycles
    assert (r.folds, r.fold_cycles, r.compute_cycles) == (8, 190, 1520)
    # DRAM at 64 B/cycle. ifmap: 1024 unique bytes for 64*144 im2col elements (1/9 byte each),
    # a 16-pixel row tile = 16*144/9 = 256 B fetched once per outer (pixel) fold. filters: 32*144 =
    # 4608 B fit the buffer, so each 16-filter tile (2304 B) is fetched on the first pass only.
    # fold (0,0): 256 + 2304 = 2560 B cold = 40 stall; (0,1): 2304 + 256 written = 40 < 190;
    # later folds move <= 512 B; the last 256 B output drains in 4: stall = 44.
    assert r.stall_cycles == 44 and r.cycles == 1564
    assert r.utilization == pytest.approx(64 * 32 * 144 / (1564 * 256))


def test_ws_linear_cycles_by_hand():
    # linear m=8 rows, n=40 outputs, k=20; weight stationary: rows hold k (tiles 16, 4), columns
    # hold n (16, 16, 8), the 8 rows stream: 2*16 + 16 + 8 - 2 = 54 cycles per fold, 6 folds.
    r = simulate(GemmShape(8, 40, 20), FPGAConfig(rows=16, cols=16, dataflow="ws"))
    assert (r.folds, r.fold_cycles, r.compute_cycles) == (6, 54, 324)
    # cold fold: weights 16*16 + inputs 8*16 = 384 B -> 6 stall; every later fold moves < 54*64 B;
    # last output tile 8*8 = 64 B drains in 1 -> 7 stall cycles.
    assert r.stall_cycles == 7 and r.cycles == 331


def test_small_buffers_stall_by_hand():
    # linear 32x32x64 on 16x16 OS at 8 B/cycle: 4 folds of 32 + 16 + 64 - 2 = 110 = 440 compute.
    shape = GemmShape(32, 32, 64)
    big = simulate(shape, FPGAConfig(rows=16, cols=16, dram_bytes_per_cycle=8))
    # double-buffered: cold 2048 B = 256; (0,1) 1024 + 256 B = 160 - 110 = 50; (1,0) the same 50;
    # (1,1) 256 B = 32 hidden; drain 32 -> 388.
    assert big.double_buffered and big.stall_cycles == 388 and big.cycles == 828
    small = simulate(shape, FPGAConfig(rows=16, cols=16, dram_bytes_per_cycle=8, ifmap_buf=1024,
                                       filter_buf=1024, ofmap_buf=1024))
    # 1 KiB buffers: a 1024 B operand tile cannot be double-buffered, and the 2048 B of filters
    # are fetched again every fold: 256 + (1024+256)/8 + (2048+256)/8 + (1024+256)/8 + 32 = 896.
    assert not small.double_buffered and small.stall_cycles == 896 and small.cycles == 1336


def test_bigger_array_fewer_cycles_until_underused():
    shape = GemmShape(128, 128, 256)
    cycles = [simulate(shape, FPGAConfig(rows=s, cols=s)).cycles for s in (4, 8, 16, 32, 64, 128)]
    assert cycles == sorted(cycles, reverse=True) and len(set(cycles)) == len(cycles)
    huge = simulate(shape, FPGAConfig(rows=256, cols=256))
    assert huge.cycles > cycles[-1] and huge.utilization < 0.05  # 3/4 of the PEs idle


@pytest.mark.parametrize("dataflow", DATAFLOWS)
def test_smaller_buffers_more_stalls(dataflow):
    shape = conv_gemm(1, 64, 32, 32, 128, 3, 3, 32, 32)
    stalls = []
    for kib in (2048, 256, 64, 16, 4, 1):
        b = kib << 10
        cfg = FPGAConfig(dataflow=dataflow, ifmap_buf=b, filter_buf=b, ofmap_buf=b)
        stalls.append(simulate(shape, cfg).stall_cycles)
    assert stalls == sorted(stalls) and stalls[-1] > stalls[0]


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 300), n=st.integers(1, 300), k=st.integers(1, 600),
       rows=st.sampled_from([4, 8, 32]), cols=st.sampled_from([4, 16, 32]),
       df=st.sampled_from(DATAFLOWS))
def test_cycle_model_invariants(m, n, k, rows, cols, df):
    r = simulate(GemmShape(m, n, k), FPGAConfig(rows=rows, cols=cols, dataflow=df))
    assert r.cycles == r.compute_cycles + r.stall_cycles and r.stall_cycles >= 0
    assert r.compute_cycles == r.folds * r.fold_cycles
    assert 0 < r.utilization <= 1 and r.macs == m * n * k


# -- requantization ----------------------------------------------------------------------------

@pytest.mark.parametrize("real", [0.5, 0.75, 1e-3, 0.999999, 3.0, 2.0**-40])
def test_quantize_multiplier(real):
    mult, shift = quantize_multiplier(real)
    assert 1 <= shift <= 62 and 0 < mult < 2**31
    assert abs(mult / 2**shift - real) <= real * 2**-30 or shift == 62


def test_quantize_multiplier_rejects_bad_values():
    for bad in (0.0, -1.0, float("nan"), 2.0**31):
        with pytest.raises(ValueError):
            quantize_multiplier(bad)


@settings(max_examples=200, deadline=None)
@given(acc=st.integers(-(2**31), 2**31 - 1), real=st.floats(1e-6, 10.0),
       zp=st.integers(-128, 127))
def test_requantize_rounds_half_up_exactly(acc, real, zp):
    mult, shift = quantize_multiplier(real)
    got = int(requantize(torch.tensor([acc]), torch.tensor([mult]), torch.tensor([shift]), zp,
                         -128, 127)[0])
    exact = Fraction(acc * mult, 2**shift) + Fraction(1, 2)  # floor(x + 1/2): ties go up
    assert got == max(-128, min(127, int(exact.__floor__()) + zp))


# -- layers, simulator, generated C ------------------------------------------------------------

class Small(nn.Module):
    """Padding, stride, groups, ReLU / ReLU6 / no activation, a host mean, and a linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.c3 = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = nn.functional.relu6(self.c2(x))
        return self.fc(self.c3(x).mean((2, 3)))


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, 3, 12, 12, generator=g),) for _ in range(n)]


@pytest.fixture(scope="module")
def qgraph():
    torch.manual_seed(0)
    model = Small().eval()
    cap = from_module(model, _batches(1)[0], None)
    propagate_meta(cap.gm, cap.example_inputs)
    gm = get_pass("fuse")(cap.gm, PassContext(target=get_target("cpu"))).graph_module
    return quantize_graph(gm, _batches(4))


def _values(gm, x) -> dict:
    seen = {}

    class Rec(torch.fx.Interpreter):
        def run_node(self, n):
            seen[n.name] = super().run_node(n)
            return seen[n.name]

    with torch.no_grad():
        Rec(gm).run(*x)
    return seen


def test_find_layers(qgraph):
    found, rejected = find_layers(qgraph)
    assert [m.kind for m in found] == ["conv2d"] * 3 + ["linear"] and not rejected
    layers = [build_layer(qgraph, m) for m in found]
    assert layers[1].groups == 2 and layers[1].stride == (2, 2)
    assert layers[0].lo == found[0].q_out.args[2]  # ReLU: nothing below the code of 0.0
    s_out, zp_out = layers[1].scales[1], layers[1].zp_out
    assert layers[1].hi == min(127, round(6 / s_out) + zp_out)  # ReLU6: the code of 6.0
    assert layers[3].weight.shape == (10, 16)  # linear weight back to [out, in]


def test_simulator_within_one_lsb_of_fake_quant(qgraph):
    found, _ = find_layers(qgraph)
    for x in _batches(3, seed=7):
        vals = _values(qgraph, x)
        for m in found:
            layer = build_layer(qgraph, m)
            got = run_layer(layer, vals[m.input_node.name]).int()
            want = vals[m.q_out.name].int()
            assert (got - want).abs().max() <= 1, m.name
            assert want.unique().numel() > 3  # a real signal, not one saturated code


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_generated_c_is_bit_exact_with_simulator(qgraph, tmp_path):
    from hwopt.fpga.cbuild import CKernel
    from hwopt.fpga.codegen import generate

    cfg = FPGAConfig(rows=20, cols=6)  # edge tiles in both the pixel and the channel loops
    g = torch.Generator().manual_seed(3)
    found, _ = find_layers(qgraph)
    for m in found:
        layer = build_layer(qgraph, m)
        kernel = generate(layer, cfg)
        assert "#pragma HLS" in kernel.source and kernel.symbol in kernel.source
        ck = CKernel(kernel, tmp_path / m.name)
        x = torch.randint(-128, 128, layer.in_shape, dtype=torch.int8, generator=g)
        y = ck(x.reshape(kernel.arg_shapes[0]), layer.weight, layer.bias, layer.mult,
               layer.shift)
        want = run_layer(layer, x)
        assert torch.equal(y.reshape(want.shape), want), m.name


def _linear_3d_graph() -> torch.fx.GraphModule:
    """A linear on a 3-D int8 input as the quantize pass writes it for [B, S, K] activations:
    dq -> view -> addmm(bias, ., permute(dq_per_channel(w))) -> view -> relu -> quantize."""
    aten, qd = torch.ops.aten, torch.ops.quantized_decomposed
    g = torch.Generator().manual_seed(1)
    root = nn.Module()
    w = torch.randn(10, 16, generator=g)
    scale = w.abs().amax(1) / 127
    root.register_buffer("w_q", torch.round(w / scale[:, None]).to(torch.int8))
    root.register_buffer("w_s", scale)
    root.register_buffer("w_z", torch.zeros(10, dtype=torch.int64))
    root.register_buffer("b", torch.randn(10, generator=g))
    gr = torch.fx.Graph()
    x = gr.placeholder("x")
    dq = gr.call_function(qd.dequantize_per_tensor.default, (x, 0.05, 3, -128, 127, torch.int8))
    v = gr.call_function(aten.view.default, (dq, [6, 16]))
    dqc = gr.call_function(qd.dequantize_per_channel.default,
                           (gr.get_attr("w_q"), gr.get_attr("w_s"), gr.get_attr("w_z"), 0,
                            -127, 127, torch.int8))
    wt = gr.call_function(aten.permute.default, (dqc, [1, 0]))
    mm = gr.call_function(aten.addmm.default, (gr.get_attr("b"), v, wt))
    y = gr.call_function(aten.relu.default, (gr.call_function(aten.view.default,
                                                               (mm, [2, 3, 10])),))
    q = gr.call_function(qd.quantize_per_tensor.default, (y, 0.02, -128, -128, 127, torch.int8))
    gr.output((q,))
    return torch.fx.GraphModule(root, gr)


def test_linear_with_views_and_transposed_weight():
    from hwopt.fpga.lowering import FPGALowering

    gm = _linear_3d_graph()
    x = torch.randint(-128, 128, (2, 3, 16), dtype=torch.int8,
                      generator=torch.Generator().manual_seed(2))
    propagate_meta(gm, (x,))
    (m,), rejected = find_layers(gm)
    assert not rejected and len(m.act_views) == 1 and len(m.out_chain) == 2
    layer = build_layer(gm, m)
    want = gm(x)[0]
    assert layer.gemm == GemmShape(6, 10, 16) and layer.lo == -128
    assert (run_layer(layer, x).int() - want.int()).abs().max() <= 1
    lowered, infos = FPGALowering(FPGAConfig(rows=4, cols=4)).lower_graph(gm, (x,), None)
    assert [i.executor for i in infos] == ["fpga", "host"]
    assert torch.equal(lowered(x)[0], run_layer(layer, x))


# -- the target end to end ---------------------------------------------------------------------

class QDQ(Pass):
    """The test stand-in for the quantize pass."""

    name, lossless, tolerance = "test_qdq", False, 0.5

    def call(self, gm, ctx):
        return PassResult(quantize_graph(gm, list(ctx.calibration)), True)


def test_target_spec():
    t = get_target("fpga")
    assert t.runs_here() and t.default_passes == ("fuse", "quantize")
    assert t.spec.dtypes == ("int8",) and t.tvm_target() == {"kind": "c"}
    assert t.spec.peak_flops["int8"] == 2 * 32 * 32 * 200e6
    assert hasattr(t.lowering, "lower_graph")


def test_cost_model_on_qdq_graph(qgraph):
    cfg = FPGAConfig()
    model = FPGACostModel(cfg)
    found, _ = find_layers(qgraph)
    by_name = {n.name: n for n in qgraph.graph.nodes}
    for m in found:
        c = model.node_cost(m.anchor)
        lc = simulate(m.gemm(), cfg)
        assert c.latency_s == pytest.approx(lc.cycles / cfg.clock_hz)
        assert c.flops == 2 * lc.macs and c.energy_j > lc.macs * cfg.mac_energy_j
        for n in m.absorbed():  # the dequantize / relu / quantize nodes the kernel does
            assert n is m.anchor or model.node_cost(n).latency_s == 0, n.name
    assert model.node_cost(by_name["mean"]).latency_s > 0  # fp32 on the host
    total = model.graph_cost(qgraph)
    assert total.latency_s > sum(model.node_cost(m.anchor).latency_s for m in found)


@pytest.mark.parametrize("run", ["sim", "c"])
def test_compile_run_save(tmp_path, run):
    from hwopt.targets.fpga import make_target

    if run == "c" and shutil.which("gcc") is None:
        pytest.skip("needs gcc")
    torch.manual_seed(0)
    model = Small().eval().requires_grad_(False)
    x = _batches(1, seed=5)[0]
    art = hwopt.compile(model, x, target=make_target(run=run), passes=["fuse", QDQ()],
                        calibration=_batches(4), cache_dir=False)
    graph = art.compiled.module.graph
    calls = [n.target for n in graph.nodes if n.op == "call_module"]
    assert calls == ["fpga_convolution", "fpga_convolution_1", "fpga_convolution_2",
                     "fpga_addmm"]
    want = art.compiled.graph(*x)[0]  # the fake-quantized graph, eager
    got = art(*x)
    last_dq = next(iter(n for n in art.compiled.graph.graph.nodes if n.op == "output")).args[0][0]
    # per layer within 1 LSB; a 1-LSB flip inside the net moves the output by a few LSBs at most
    assert float((got - want).abs().max()) <= 3 * last_dq.args[1]
    assert float((got - model(*x)).norm() / model(*x).norm()) < 0.1
    regions = [m for m in art.compiled.module.modules() if hasattr(m, "layer")]
    for r in regions:
        r.run = "sim"
    assert torch.equal(art(*x), got)  # the compiled C and the simulator agree bit for bit
    out = art.save(tmp_path / "out")
    manifest = json.loads((out / "manifest.json").read_text())
    fpga = [r for r in manifest["regions"] if r["executor"] == "fpga"]
    assert len(fpga) == 4
    k = fpga[0]["kernels"]["convolution"]
    assert k["cycles"] > 0 and 0 < k["utilization"] <= 1 and k["max_lsb_vs_fake_quant"] <= 1
    for f in ("fpga_convolution.c", "fpga_convolution.h", "fpga_convolution.bin",
              "hwopt_fpga.h", "hwopt_fpga_rt.c", "Makefile"):
        assert (out / f).is_file(), f
    assert "hwopt_fpga_convolution(" in (out / "fpga_convolution.h").read_text()
    assert any(r["executor"] == "host" and "mean" in r["reason"] for r in manifest["regions"])


def test_graph_without_int8_layers_is_an_error():
    model = Small().eval()
    with pytest.raises(hwopt.HwoptError, match=r"passes=\['fuse', 'quantize'\].*calibration"):
        hwopt.compile(model, _batches(1)[0], target="fpga", passes=["fuse"], cache_dir=False)
