import json
import math
import random

import pytest

from hwopt.cost import RooflineModel
from hwopt.cost_learned import LearnedModel, train
from hwopt.cost_learned_kernels import KERNEL_FEATURES, KernelModel, kernel_rows, train_kernels
from hwopt.target import get_target
from tests.test_cost_learned import kernel

pytest.importorskip("sklearn")


@pytest.fixture
def roof():
    return RooflineModel.from_spec(get_target("cpu").spec)


def mixed_set(roof, n=120, seed=0):
    """Subgraphs of a matmul and an element-wise kernel whose true latencies are the roofline's
    x 3 and x 0.5 (one factor per kernel, which a subgraph-level fit cannot separate)."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        mm = kernel("matmul", 10 ** r.uniform(5, 9), 10 ** r.uniform(4, 7), 2 * i)
        ew = kernel("elementwise", 10 ** r.uniform(4, 7), 10 ** r.uniform(4, 7), 2 * i + 1)
        ks = [mm, ew]
        lat = (3.0 * float(roof.kernels_cost([mm], call=False).latency_s)
               + 0.5 * float(roof.kernels_cost([ew], call=False).latency_s))
        out.append((ks, lat))
    return out


def test_learns_per_kernel_factors_and_round_trips(roof):
    data = mixed_set(roof, n=300)
    model = train_kernels(roof, data[:200], n_trees=150)
    errs = sorted(abs(math.log(model.latency(roof, ks) / lat)) for ks, lat in data[200:])
    before = sorted(abs(math.log(float(roof.kernels_cost(ks).latency_s) / lat))
                    for ks, lat in data[200:])
    assert before[50] > 0.5  # the roofline alone is off by the factors
    assert errs[50] < 0.05 and errs[90] < 0.35, (errs[50], errs[90])  # median, p90 held out
    again = KernelModel.from_json(json.loads(json.dumps(model.to_json())))
    ks, _ = data[250]
    assert again.latency(roof, ks) == model.latency(roof, ks)


def test_blended_model_round_trips_with_its_kernel_trees(roof):
    data = mixed_set(roof, n=60)
    model = train(roof, data, n_estimators=30)
    assert model.kernel_model is not None
    again = LearnedModel.from_json(json.loads(json.dumps(model.to_json())))
    for ks, _ in data[:5]:
        cost = roof.kernels_cost(ks)
        assert again.refine(roof, ks, cost) == pytest.approx(model.refine(roof, ks, cost))
        sub = train(roof, data, n_estimators=30, per_kernel=False).refine(roof, ks, cost)
        assert sub > 0


def test_rows_have_every_feature_and_the_read_shape(roof):
    import torch
    import torch.fx as fx

    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(1, 96, 14, 14)
    k = kernel("to_nhwc", 0, 2 * 96 * 14 * 14 * 4, 0)
    k.reads[0].key = x
    rows, base = kernel_rows(roof, [k])
    assert len(rows[0]) == len(KERNEL_FEATURES) and base[0] > 0
    feat = dict(zip(KERNEL_FEATURES, rows[0]))
    assert feat["log_in_channels"] == pytest.approx(math.log(97))
    assert feat["log_in_spatial"] == pytest.approx(math.log(197))
    assert feat["in_rank"] == 4


def test_a_layer_norm_kernel_has_its_output_shape_rows_and_ops(roof):
    import torch

    from hwopt.capture import from_module
    from hwopt.cost_fusion import graph_kernels
    from hwopt.graph import propagate_meta

    m = torch.nn.Sequential(torch.nn.LayerNorm(197), torch.nn.GELU())
    cap = from_module(m.eval(), (torch.randn(1, 32, 197),))
    propagate_meta(cap.gm, cap.example_inputs)
    rows, _ = kernel_rows(roof, graph_kernels(cap.gm))
    feat = dict(zip(KERNEL_FEATURES, rows[0]))
    # native_layer_norm returns (out, mean, rstd): the write shape is the normalized tensor's
    assert feat["log_out_last_dim"] == pytest.approx(math.log(198))
    assert feat["out_last_mod_16"] == 197 % 16
    assert feat["log_rows"] == pytest.approx(math.log(33))
    assert feat["log_out_elems"] == pytest.approx(math.log(32 * 197 + 1))
    assert feat["heavy_ops"] >= 1  # the GELU fused after it


def test_wrong_feature_set_is_refused(roof):
    model = train_kernels(roof, mixed_set(roof, n=20), n_trees=3)
    data = model.to_json()
    data["features"] = data["features"][:-1]
    with pytest.raises(ValueError, match="retrain"):
        KernelModel.from_json(data)
