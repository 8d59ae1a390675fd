import json

import torch

import hwopt


def _mlp():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
    return m.eval(), (torch.randn(8, 64),)


def test_measured_choices_are_recorded_and_reused(cache_dir, tmp_path):
    m, args = _mlp()
    art = hwopt.compile(m, args, cache_dir=str(cache_dir), executor="tvm", tune="measure",
                        progress=False)
    torch.testing.assert_close(art(*args), m(*args), rtol=1e-4, atol=1e-5)
    db = json.loads((cache_dir / "tuning.json").read_text())
    assert db and all(r["seconds"] > 0 and r["params"] for r in db.values())
    chosen = {tuple(sorted(r["params"].items())) for r in db.values()}
    # A later untuned compile of the same kernels (no compile-cache entry, only the tuning
    # database) picks the measured parameters.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "tuning.json").write_text(json.dumps(db))
    again = hwopt.compile(m, args, cache_dir=str(fresh), executor="tvm")
    assert not again.compiled.regions[0].cached
    used = {tuple(sorted(p.items())) for _, p in again.compiled.regions[0].kernels.values()}
    assert chosen <= used
