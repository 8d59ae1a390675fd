import json
import math
import random

import pytest

from hwopt.cost import RooflineModel
from hwopt.cost_fusion import Kernel, Read
from hwopt.cost_learned import FEATURES, LearnedModel, features, save_learned, train
from hwopt.cost_machine import MachineCostModel, cost_file
from hwopt.cost_ops import Work
from hwopt.target import get_target

pytest.importorskip("sklearn")


def kernel(cls: str, flops: float, nbytes: float, i: int) -> Kernel:
    macs = flops / 2 if cls == "matmul" else 0
    work = Work(cls, flops, macs, "float32", (), nbytes / 2)
    return Kernel(cls, work, [], flops, macs, reads=[Read(("in", i), nbytes / 2, "input", 2)],
                  writes=[[("out", i), nbytes / 2, True]])


def tiny_set(roof, n=80, seed=0):
    """Kernels whose true latency is the roofline's x 3 for matmuls and x 0.5 otherwise."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        cls = r.choice(("matmul", "elementwise"))
        ks = [kernel(cls, 10 ** r.uniform(5, 9), 10 ** r.uniform(4, 7), i)]
        factor = 3.0 if cls == "matmul" else 0.5
        out.append((ks, factor * float(roof.kernels_cost(ks).latency_s)))
    return out


@pytest.fixture
def roof():
    return RooflineModel.from_spec(get_target("cpu").spec)


def test_learns_a_tiny_synthetic_set(roof):
    data = tiny_set(roof)
    model = train(roof, data[:60], n_estimators=150)
    assert len(features(roof, data[0][0])) == len(FEATURES)
    for ks, lat in data[60:]:  # held out
        pred = model.refine(roof, ks, roof.kernels_cost(ks))
        assert abs(math.log(pred / lat)) < 0.1


def test_json_trees_match_sklearn_and_round_trip(roof, tmp_path, monkeypatch):
    import numpy as np
    from sklearn.ensemble import GradientBoostingRegressor

    data = tiny_set(roof, n=40, seed=1)
    model = train(roof, data, n_estimators=50, seed=3)
    xs = np.array([features(roof, ks) for ks, _ in data])
    ref = GradientBoostingRegressor(loss="huber", n_estimators=50, max_depth=3,
                                    learning_rate=0.05, subsample=0.8, min_samples_leaf=3,
                                    random_state=3).fit(xs, np.log([lat for _, lat in data])
                                                        - xs[:, 0])
    ours = [model.log_ratio(list(x)) for x in xs]
    assert np.allclose(ours, ref.predict(xs), atol=1e-9)

    monkeypatch.setenv("HWOPT_CACHE_DIR", str(tmp_path))
    path = save_learned(model, "cpu")
    again = LearnedModel.from_json(json.loads(open(path).read()))
    assert [again.log_ratio(list(x)) for x in xs] == ours

    machine = MachineCostModel(roof, "cpu")
    assert machine.source == "analytical+learned"
    ks, lat = data[0]
    assert machine.kernels_cost(ks).latency_s == pytest.approx(
        model.refine(roof, ks, roof.kernels_cost(ks)))
    assert cost_file("learned", "cpu").exists()
