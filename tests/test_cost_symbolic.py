import copy
import warnings

import pytest
import sympy
import torch
import torch.nn as nn
from torch.export import Dim

from hwopt.capture import from_module
from hwopt.cost import RooflineModel
from hwopt.cost_symbolic import bind_shapes, evaluate_buckets, symbolic_cost, symbols
from hwopt.graph import propagate_meta
from hwopt.target import get_target


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc, self.ln = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 32), \
            nn.LayerNorm(32)

    def forward(self, x):
        y = torch.relu(self.conv(x)).mean((2, 3))
        return torch.softmax(self.ln(self.fc(y)), -1)


@pytest.fixture(scope="module")
def exported():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Net().eval()
        ep = torch.export.export(model, (torch.randn(4, 3, 16, 16),),
                                 dynamic_shapes=({0: Dim("batch", min=1, max=512)},))
        return model, ep.run_decompositions().module()


@pytest.fixture(scope="module")
def roof():
    return RooflineModel.from_spec(get_target("cpu").spec)


def test_symbolic_cost_is_an_expression_in_the_batch(exported, roof):
    _, gm = exported
    cost = symbolic_cost(gm, roof)
    (batch,) = symbols(gm).values()
    assert cost.is_symbolic and cost.symbols == {batch}
    assert cost.latency_s.has(sympy.Max)  # max(compute, memory) per kernel
    assert sympy.simplify(cost.flops.diff(batch, 2)) == 0  # FLOPs are linear in the batch


@pytest.mark.parametrize("batch", [2, 37])
def test_symbolic_equals_concrete_at_two_shapes(exported, roof, batch):
    model, gm = exported
    x = torch.randn(batch, 3, 16, 16)
    sym = symbolic_cost(gm, roof).evaluate(bind_shapes(gm, (x,)))
    same_graph = copy.deepcopy(gm)  # the same graph, re-propagated with concrete shapes
    propagate_meta(same_graph, (x,))
    static = from_module(model, (x,))  # a separate static-shape capture
    propagate_meta(static.gm, static.example_inputs)
    for concrete in (roof.graph_cost(same_graph), roof.graph_cost(static.gm)):
        for f in ("latency_s", "energy_j", "bytes_moved", "flops"):
            assert getattr(sym, f) == pytest.approx(float(getattr(concrete, f)), rel=1e-9)


def test_buckets_and_names(exported, roof):
    _, gm = exported
    cost = symbolic_cost(gm, roof)
    name = next(iter(cost.symbols)).name
    buckets = evaluate_buckets(cost, {name: [1, 8, 64]})
    assert list(buckets) == [1, 8, 64]
    one = cost.evaluate({name: 8})
    assert buckets[8].latency_s == pytest.approx(one.latency_s, rel=1e-12)
    assert buckets[8].energy_j == pytest.approx(one.energy_j, rel=1e-12)
    assert buckets[1].latency_s < buckets[8].latency_s < buckets[64].latency_s
    with pytest.raises(ValueError, match="no value for symbol"):
        cost.evaluate({})
