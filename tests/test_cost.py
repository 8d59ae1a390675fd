import torch

from hwopt import zoo
from hwopt.capture import from_module
from hwopt.cost import Cost, RooflineModel, node_flops, op_class
from hwopt.graph import propagate_meta
from hwopt.target import get_target


def test_conv_flops_match_hand_count():
    m = torch.nn.Conv2d(16, 32, 3, padding=1, bias=False).eval()
    cap = from_module(m, (torch.randn(1, 16, 8, 8),))
    propagate_meta(cap.gm, cap.example_inputs)
    conv = next(n for n in cap.gm.graph.nodes if op_class(n) == "conv")
    assert node_flops(conv) == 2 * 32 * 8 * 8 * 16 * 3 * 3


def test_roofline_is_compute_or_memory_bound():
    model = RooflineModel(peak_flops=1e11, mem_bw=1e10, overhead_s=0.0)
    c = model.cost_of(1e9, 1e3, "conv")
    assert abs(c.latency_s - 1e9 / (1e11 * model.efficiency["conv"])) < 1e-12
    m = model.cost_of(1e3, 1e9, "elementwise")
    assert abs(m.latency_s - 0.1) < 1e-9 and m.energy_j > 0
    assert (c + m).flops == c.flops + m.flops and isinstance(c + m, Cost)


def test_cpu_target_costs_a_whole_model():
    m, args = zoo.cnn(small=True)
    cap = from_module(m, args)
    propagate_meta(cap.gm, cap.example_inputs)
    t = get_target("cpu")
    total = t.cost_model.graph_cost(cap.gm)
    assert total.flops > 1e7 and total.latency_s > 0 and total.bytes_moved > 0
    assert t.spec.vector_lanes in (4, 8, 16) and t.tvm_target()["kind"] == "llvm"
