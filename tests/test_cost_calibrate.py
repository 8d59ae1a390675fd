import json
import random

import pytest
import torch

from hwopt.cost import RooflineModel
from hwopt.cost_calibrate import Measurement, apply_calibration, calibrate, fit, save_calibration
from hwopt.cost_fusion import Kernel, Read
from hwopt.cost_machine import MachineCostModel, cost_file, machine_key
from hwopt.cost_ops import Work
from hwopt.target import get_target

TRUE = {"efficiency": {"matmul": 0.45, "softmax": 0.08, "elementwise": 0.2},
        "mem_efficiency": {"matmul": 0.9, "softmax": 0.5, "elementwise": 0.7},
        "overhead_s": 3e-6, "call_overhead_s": 6e-6}


def kernel(cls: str, flops: float, nbytes: float, i: int) -> Kernel:
    """A synthetic kernel: reads nbytes/2 once from outside, writes nbytes/2."""
    macs = flops / 2 if cls == "matmul" else 0
    work = Work(cls, flops, macs, "float32", (), nbytes / 2)
    return Kernel(cls, work, [], flops, macs, reads=[Read(("in", i), nbytes / 2, "input", 2)],
                  writes=[[("out", i), nbytes / 2, True]])


def synthetic(truth: RooflineModel, n: int = 60, seed: int = 0) -> list[Measurement]:
    r = random.Random(seed)
    out = []
    for i in range(n):
        ks = []
        for j in range(r.choice((1, 2, 3))):
            cls = r.choice(("matmul", "softmax", "elementwise"))
            flops = 10 ** r.uniform(4, 9) if cls != "elementwise" else 10 ** r.uniform(3, 7)
            ks.append(kernel(cls, flops, 10 ** r.uniform(3, 7.5), 10 * i + j))
        out.append(Measurement(f"s{i}", ks, float(truth.kernels_cost(ks).latency_s)))
    return out


@pytest.fixture
def base():
    return RooflineModel.from_spec(get_target("cpu").spec)


def test_fit_recovers_known_efficiencies(base):
    truth = apply_calibration(base, TRUE)
    params = fit(base, synthetic(truth))
    for c, v in TRUE["efficiency"].items():
        assert params["efficiency"][c] == pytest.approx(v, rel=0.05), c
    assert params["overhead_s"] == pytest.approx(3e-6, rel=0.15)
    # Memory efficiency and level bandwidth are only known as a product: compare predictions.
    fitted = apply_calibration(base, params)
    for m in synthetic(truth, n=30, seed=1):
        assert fitted.kernels_cost(m.kernels).latency_s == pytest.approx(m.latency_s, rel=0.03)


def test_calibration_round_trip_and_corrupt_file(base, tmp_path, monkeypatch):
    monkeypatch.setenv("HWOPT_CACHE_DIR", str(tmp_path))
    model = MachineCostModel(base, "cpu")
    assert model.source == "analytical"
    path = save_calibration(dict(TRUE, fit={"samples": 60}), "cpu")
    assert path == str(cost_file("calibration", "cpu")) and machine_key() in path
    assert json.loads(open(path).read())["params"]["efficiency"]["matmul"] == 0.45
    assert model.source == "calibrated"  # picked up without a restart
    assert model.roofline().efficiency["matmul"] == 0.45 and model.overhead_s == 3e-6
    k = [kernel("matmul", 1e8, 1e5, 0)]
    assert model.kernels_cost(k).latency_s > base.kernels_cost(k).latency_s

    open(path, "w").write("{not json")
    with pytest.warns(UserWarning, match="ignoring unreadable cost calibration"):
        assert model.source == "analytical"
    assert model.kernels_cost(k) == base.kernels_cost(k)


def test_a_subgraph_is_built_checked_and_timed():
    from hwopt.cost_dataset import canonical
    from hwopt.cost_measure import build, time_built

    class AddRelu(torch.nn.Module):
        def forward(self, x, y):
            return torch.relu(x + y)

    gm, ins = canonical(AddRelu(), (torch.randn(64, 64), torch.randn(64, 64)))
    b = build(gm, ins, get_target("cpu"))
    times = time_built(b, repeat=3, min_repeat_ms=1)
    assert len(times) == 3 and 0 < b.latency_s < 0.1 and b.n_funcs >= 1


@pytest.mark.slow
def test_calibrate_measures_and_stores(tmp_path):
    params = calibrate("cpu", budget_s=60, progress=False, cache_dir=tmp_path, learned=False)
    assert params["fit"]["samples"] >= 8 and 0 < params["overhead_s"] < 1e-3
    assert cost_file("calibration", "cpu", tmp_path).exists()
