import math

import pytest
import torch
import torch.fx as fx

from hwopt import zoo
from hwopt.capture import from_module
from hwopt.cost import Cost, RooflineModel, node_bytes, node_flops, op_class
from hwopt.cost_fusion import graph_kernels, kernel_signature
from hwopt.cost_ops import base_name, node_work
from hwopt.graph import propagate_meta
from hwopt.pass_base import PassContext, PassResult, get_pass, register_pass
from hwopt.target import get_target

E_MAC, E_L1, E_DRAM = 2e-12, 0.5e-12, 60e-12


def _model(**kw) -> RooflineModel:
    """Two memory levels (a 32 KiB L1 and DRAM), cold caches, a 6x16 register tile."""
    levels = (("L1", 32 * 2**10, 400e9, E_L1), ("DRAM", 0, 20e9, E_DRAM))
    args = dict(peak_flops={"float32": 100e9, "int8": 400e9}, mem_bw=20e9, mem_levels=levels,
                energy_per_mac={"float32": E_MAC, "int8": 0.3e-12}, reg_tile=(6, 16),
                warm=False, overhead_s=0.0)
    return RooflineModel(**{**args, **kw})


def _captured(module, *args):
    cap = from_module(module.eval(), args)
    propagate_meta(cap.gm, cap.example_inputs)
    return cap.gm


def _node(gm, cls):
    return next(n for n in gm.graph.nodes if op_class(n) == cls)


def test_conv_flops_bytes_energy_match_hand_count():
    gm = _captured(torch.nn.Conv2d(16, 32, 3, padding=1, bias=False), torch.randn(1, 16, 8, 8))
    conv = _node(gm, "conv")
    macs = 32 * 8 * 8 * (16 * 3 * 3)
    assert node_flops(conv) == 2 * macs and node_work(conv).macs == macs
    x, w, y = 16 * 8 * 8 * 4, 32 * 16 * 9 * 4, 32 * 8 * 8 * 4
    assert node_bytes(conv) == x + w + y
    c = _model().node_cost(conv)
    # Reuse: the input is swept ceil(32/16) column tiles x 9 window taps = 18 times, the weight
    # ceil(64/6) = 11 row tiles; the first touch is DRAM (cold), re-reads hit L1 (the panels,
    # 6x144 and 144x16 floats, fit it); the output is written once to DRAM.
    dram, l1 = x + w + y, x * 17 + w * 10
    assert c.bytes_moved == x + w + y
    assert c.energy_j == pytest.approx(macs * E_MAC + dram * E_DRAM + l1 * E_L1, rel=1e-12)
    assert c.latency_s == pytest.approx(max(2 * macs / (100e9 * 0.6), dram / 20e9,
                                            l1 / 400e9), rel=1e-12)


def test_linear_flops_bytes_energy_match_hand_count():
    gm = _captured(torch.nn.Linear(64, 32), torch.randn(8, 64))
    mm = _node(gm, "matmul")
    macs = 8 * 64 * 32
    assert node_flops(mm) == 2 * macs + 8 * 32  # + the bias add
    x, w, b, y = 8 * 64 * 4, 64 * 32 * 4, 32 * 4, 8 * 32 * 4
    assert node_bytes(mm) == x + w + b + y
    c = _model().node_cost(mm)
    # x swept ceil(32/16) = 2 times, W ceil(8/6) = 2 times: one L1 re-read each.
    dram, l1 = x + w + b + y, x + w
    e = macs * E_MAC + (8 * 32) * E_MAC / 2 + dram * E_DRAM + l1 * E_L1
    assert c.energy_j == pytest.approx(e, rel=1e-12)


def test_fused_intermediates_move_no_bytes():
    gm = _captured(torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU()),
                   torch.randn(8, 64))
    ks = graph_kernels(gm)
    assert kernel_signature(ks) == ["matmul[addmm+relu]"]
    model = _model()
    whole = model.graph_cost(gm)
    parts = [model.node_cost(n) for n in gm.graph.nodes if n.op == "call_function"]
    inter = 8 * 32 * 4  # addmm's output: written and read again when not fused
    assert sum(p.bytes_moved for p in parts) - whole.bytes_moved == 2 * inter
    assert whole.flops == sum(p.flops for p in parts)
    # The same nodes given as a set (a subgraph of a bigger graph) cost the same.
    nodes = {n for n in gm.graph.nodes if n.op == "call_function"}
    assert model.subgraph_cost(nodes) == whole


def test_warm_inputs_come_from_the_level_that_holds_them():
    gm = _captured(torch.nn.Linear(64, 32), torch.randn(8, 64))
    cold, warm = _model().graph_cost(gm), _model(warm=True).graph_cost(gm)
    assert warm.energy_j < cold.energy_j and warm.bytes_moved == cold.bytes_moved


def _int_mm_graph(dtype):
    g = fx.Graph()
    a, b = g.placeholder("a"), g.placeholder("b")
    mm = g.call_function(torch.ops.aten.mm.default, (a, b))
    g.output((mm,))
    a.meta["val"] = torch.empty(64, 128, dtype=dtype, device="meta")
    b.meta["val"] = torch.empty(128, 256, dtype=dtype, device="meta")
    out = torch.int32 if dtype == torch.int8 else dtype
    mm.meta["val"] = torch.empty(64, 256, dtype=out, device="meta")
    return mm


def test_dtypes_set_peak_and_element_size():
    q, f = _int_mm_graph(torch.int8), _int_mm_graph(torch.float32)
    assert node_work(q).dtype == "int8" and node_work(f).dtype == "float32"
    assert node_bytes(q) == 64 * 128 + 128 * 256 + 64 * 256 * 4
    model = _model()
    cq, cf = model.node_cost(q), model.node_cost(f)
    assert cq.flops == cf.flops and cq.latency_s < cf.latency_s and cq.energy_j < cf.energy_j


def test_roofline_is_compute_or_memory_bound():
    model = RooflineModel(peak_flops=1e11, mem_bw=1e10, overhead_s=0.0)
    c = model.cost_of(1e9, 1e3, "conv")
    assert abs(c.latency_s - 1e9 / (1e11 * model.efficiency["conv"])) < 1e-12
    m = model.cost_of(1e3, 1e9, "elementwise")
    assert abs(m.latency_s - 0.1) < 1e-9 and m.energy_j > 0
    assert (c + m).flops == c.flops + m.flops and isinstance(c + m, Cost)


def test_from_spec_reads_the_target_spec():
    spec = get_target("cpu").spec
    model = RooflineModel.from_spec(spec)
    assert model.peak("int8") == spec.peak_flops["int8"] > model.peak("float32")
    assert model.levels() == tuple(spec.mem_levels) and model.mem_bw == spec.mem_bw
    assert model.reg_tile[1] == 2 * spec.vector_lanes


def test_cpu_target_costs_a_whole_model():
    m, args = zoo.cnn(small=True)
    gm = _captured(m, *args)
    t = get_target("cpu")
    total = t.cost(gm)
    assert total.flops > 1e7 and total.latency_s > 0 and total.bytes_moved > 0
    assert t.spec.vector_lanes in (4, 8, 16) and t.tvm_target()["kind"] == "llvm"
    assert math.isfinite(total.energy_j) and total.energy_j > 0


@register_pass("test_cost_probe", lossless=True)
def _probe(gm, ctx):
    ctx.log.append({n.name: ctx.cost_model.node_cost(n) for n in gm.graph.nodes
                    if op_class(n) == "matmul"})
    return PassResult(gm, False)


def test_a_pass_reads_the_cost_model_and_a_4x_matmul_is_slower():
    class Two(torch.nn.Module):
        def forward(self, a, b, c):
            return a @ b, c @ b

    gm = _captured(Two(), torch.randn(64, 256), torch.randn(256, 256), torch.randn(256, 256))
    ctx = PassContext(target=get_target("cpu"))
    get_pass("test_cost_probe")(gm, ctx)
    (small, large), = [list(d.values()) for d in ctx.log]
    assert large.flops == 4 * small.flops
    assert large.latency_s > small.latency_s and large.energy_j > small.energy_j


def test_a_row_reduction_runs_scalar_sums_when_lanes_do_not_divide_its_rows():
    roof = RooflineModel.from_spec(get_target("cpu").spec)
    lanes = roof.lanes

    def norm_util(last):
        gm = _captured(torch.nn.LayerNorm(last), torch.randn(32, last))
        return next(t["util"] for t in roof.kernel_terms(graph_kernels(gm))
                    if t["cls"] == "norm")

    assert lanes > 1 and norm_util(12 * lanes) == 1
    # mean/var pass scalar (lanes times the work), the normalizing pass vectorized
    assert norm_util(12 * lanes + 5) == pytest.approx(2 / (lanes + 1))
    assert norm_util(lanes) < 1  # one vector per row: the schedule does not rfactor it
    odd = _captured(torch.nn.LayerNorm(197), torch.randn(32, 197))
    even = _captured(torch.nn.LayerNorm(192), torch.randn(32, 192))
    t_odd, t_even = (float(roof.kernels_cost(graph_kernels(g)).latency_s) for g in (odd, even))
    assert t_odd > 2 * t_even


def test_inner_reduced_axis_of_row_and_column_reductions():
    class M(torch.nn.Module):
        def forward(self, x):
            return x.softmax(-1), x.softmax(1), x.sum(1), x.mean([1, 2]), x.amax(-1)

    gm = _captured(M(), torch.randn(2, 8, 40))
    inner = [(base_name(n), node_work(n).inner) for n in gm.graph.nodes
             if op_class(n) in ("softmax", "reduction")]
    # the last axis is reduced (40) or kept (0: its lanes stay vector lanes)
    assert inner == [("_softmax", 40), ("_softmax", 0), ("sum", 0), ("mean", 40),
                     ("amax", 40)]
