import json

import pytest
import torch

import hwopt
from hwopt.errors import OptionError
from hwopt.options import Options


def test_tune_trials_is_checked():
    assert Options.from_dict({"tune": "metaschedule", "tune_trials": 8}).tune_trials == 8
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(OptionError, match="tune_trials"):
            Options.from_dict({"tune": "metaschedule", "tune_trials": bad})


def _mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU()).eval()


@pytest.mark.slow
def test_metaschedule_kernels_are_compared_and_never_tuned_twice(tmp_path, monkeypatch):
    x = torch.randn(64, 256)
    m = _mlp(0)
    art = hwopt.compile(m, (x,), cache_dir=str(tmp_path), executor="tvm", tune="metaschedule",
                        tune_trials=8, progress=False)
    torch.testing.assert_close(art(x), m(x), rtol=1e-4, atol=1e-5)
    records = json.loads((tmp_path / "tuning.json").read_text())
    decided = {k: v for k, v in records.items() if k.startswith("metaschedule:")}
    assert decided, "the dense kernel was neither tuned nor compared"
    for rec in decided.values():
        assert rec["rule"] in ("metaschedule", "hwopt")
        assert rec["params"]["hwopt_us"] > 0  # both timed, the faster kept
        if rec["rule"] == "metaschedule":
            assert rec["params"]["metaschedule_us"] < rec["params"]["hwopt_us"]
    kernels = art.compiled.regions[0].kernels
    assert ("metaschedule" in [c[0] for c in kernels.values()]) == any(
        r["rule"] == "metaschedule" for r in decided.values())

    from tvm.s_tir import meta_schedule as ms

    def no_tuning(*a, **k):
        raise AssertionError("a kernel already decided was tuned again")

    monkeypatch.setattr(ms, "tune_tir", no_tuning)
    m2 = _mlp(1)  # other weights: a compile-cache miss, the same kernel
    art2 = hwopt.compile(m2, (x,), cache_dir=str(tmp_path), executor="tvm",
                         tune="metaschedule", tune_trials=8, progress=False)
    assert not art2.compiled.regions[0].cached
    torch.testing.assert_close(art2(x), m2(x), rtol=1e-4, atol=1e-5)
    assert art2.compiled.regions[0].kernels == kernels
