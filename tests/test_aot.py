import json

import pytest
import torch

import hwopt
from hwopt import zoo


@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_zoo_matches_eager(name, cache_dir):
    m, args = zoo.MODELS[name](small=True)
    art = hwopt.compile(m, args, cache_dir=str(cache_dir), executor="tvm")
    assert all(r.executor == "tvm" for r in art.compiled.regions), art.compiled.regions
    out, ref = art(*args), m(*args)
    got = out if isinstance(out, torch.Tensor) else out[0]
    want = ref if isinstance(ref, torch.Tensor) else ref[0]
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel <= 1e-4, rel


def test_save_writes_library_manifest_and_plan(tmp_path, cache_dir):
    m, args = zoo.cnn(small=True)
    art = hwopt.compile(m, args, cache_dir=str(cache_dir), executor="tvm")
    out = art.save(tmp_path / "art")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "cpu" and manifest["inputs"] == [[1, 3, 64, 64]]
    lib = out / manifest["regions"][0]["files"][0]
    assert lib.stat().st_size > 0
    assert (out / "host_plan.py").read_text().startswith("\n\n\ndef forward") or \
        "def forward" in (out / "host_plan.py").read_text()
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
    y = vm["main"](tvm.runtime.from_dlpack(args[0]))
    y = torch.from_dlpack(y[0] if not hasattr(y, "shape") else y)
    torch.testing.assert_close(y, m(*args), rtol=1e-4, atol=1e-5)


def test_wrong_shape_is_a_clear_error(cache_dir):
    m, args = zoo.cnn(small=True)
    art = hwopt.compile(m, args, cache_dir=str(cache_dir), executor="tvm")
    with pytest.raises(hwopt.HwoptError, match="compiled for"):
        art(torch.randn(1, 3, 32, 32))


def test_report_lists_passes_and_costs(cache_dir, tmp_path):
    m, args = zoo.cnn(small=True)
    art = hwopt.compile(m, args, cache_dir=str(cache_dir), report=str(tmp_path / "r.html"))
    text = str(art.report())
    assert "fuse" in text and "folded 6 BatchNorm" in text
    rows = art.report().node_costs()
    conv = [r for r in rows if r["class"] == "conv"]
    assert len(conv) == 6 and all(r["flops"] > 0 and r["latency_us"] > 0 for r in conv)
    assert "<table" in (tmp_path / "r.html").read_text()


def test_unaligned_input_views_are_accepted(cache_dir):
    m = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    art = hwopt.compile(m, (torch.randn(1, 8),), cache_dir=str(cache_dir), executor="tvm")
    big = torch.randn(3, 8)
    view = big[1:2]  # 32 bytes into the storage: not 64-byte aligned
    assert view.data_ptr() % 64 != 0
    torch.testing.assert_close(art(view), m(view), rtol=1e-4, atol=1e-5)
