import pytest

import hwopt
from hwopt.options import Options


def test_defaults():
    o = Options.from_dict(None)
    assert o.target.name == "cpu" and o.passes is None and o.strict is False


@pytest.mark.parametrize("opts, match", [
    ({"targett": "cpu"}, "Valid options: target"),
    ({"target": "tpu"}, "Valid targets: .*cpu"),
    ({"tune": "fast"}, "'none', 'measure'"),
    ({"executor": "gpu"}, "'auto', 'tvm', 'torch'"),
    ({"passes": "fuse"}, "list of pass names"),
    ({"passes": ["fuze"]}, "Did you mean 'fuse'"),
    ({"strict": "yes"}, "True or False"),
    ({"tolerance": -1}, "positive"),
])
def test_bad_options_list_valid_ones(opts, match):
    with pytest.raises(hwopt.OptionError, match=match):
        Options.from_dict(opts)


def test_get_pipeline():
    assert hwopt.get_pipeline("cpu")["passes"] == ["fuse"]
    with pytest.raises(hwopt.OptionError, match="Valid pipelines"):
        hwopt.get_pipeline("nope")


def test_missing_calibration_is_a_clear_error():
    ctx = hwopt.PassContext(target=None)
    with pytest.raises(hwopt.OptionError, match="calibration"):
        ctx.require_calibration("quantize")


def test_calibration_data_is_part_of_the_fingerprint():
    import torch

    a = Options.from_dict({"calibration": [torch.zeros(2)]}).fingerprint()
    b = Options.from_dict({"calibration": [torch.ones(2)]}).fingerprint()
    c = Options.from_dict({"calibration": [(torch.zeros(2),)]}).fingerprint()
    assert a["calibration"] != b["calibration"] and a["calibration"] == c["calibration"]
    assert Options.from_dict(None).fingerprint()["calibration"] is None
