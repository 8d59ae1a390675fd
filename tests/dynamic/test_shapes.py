"""Dynamic input shapes: padding safety, bucket choice, AOT variants + saved plan, torch.compile.

Covers hwopt/dynamic/padsafe.py, shapes.py, variants.py and shape_backend.py.
"""
import warnings

import pytest
import torch

import hwopt
from hwopt.dynamic.padsafe import ZERO, pad_safety
from hwopt.dynamic.shapes import ShapePlan, choose_buckets, size_of, symbolic_capture
from hwopt.dynamic_zoo import MaskedAttention, MeanPooled
from hwopt.errors import OptionError

OPTS = {"cache_dir": False, "executor": "tvm", "progress": False, "strict": True}
RANGE = (8, 64)
LENGTHS = (8, 13, 24, 40, 57, 64)


def _inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed + n)
    return torch.randint(1, 100, (1, n), generator=g), torch.ones(1, n, dtype=torch.int64)


def _rel(got, want) -> float:
    return float((got - want).abs().max()) / max(float(want.abs().max()), 1e-6)


def _graph(model, inputs, spec):
    gm, ranges = symbolic_capture(model, inputs, None, spec)
    (sym, _), = ranges.items()
    return gm, sym


def test_masked_attention_pads_safely_unmasked_does_not():
    torch.manual_seed(0)
    gm, sym = _graph(MaskedAttention().eval(), _inputs(16), ({1: RANGE}, {1: RANGE}))
    phs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert pad_safety(gm, sym, {p: ZERO for p in phs}, 8) is None
    # the same graph when the mask is padded with ones (kind "any"): softmax sees the pads
    reason = pad_safety(gm, sym, {phs[0]: ZERO}, 8)
    assert reason and "softmax" in reason and "masked" in reason


def test_mean_over_padded_axis_is_unsafe():
    gm, sym = _graph(MeanPooled().eval(), (_inputs(16)[0],), ({1: RANGE},))
    reason = pad_safety(gm, sym, {}, 8)
    assert reason and "mean" in reason and "padded axis" in reason


def test_unpad_sizes_from_expressions_of_the_symbol():
    plan = ShapePlan("s0", 1, 64, [(0, 1)], [(0, 1, "s0"), (1, 0, "2*s0 - 1")])
    a, b = plan.unpad((torch.zeros(2, 40), torch.zeros(79, 3)), 17)
    assert a.shape == (2, 17) and b.shape == (33, 3)
    assert size_of("s0", "Max(1, s0 - 20)", 5) == 1


def test_buckets_bounded_cover_range_and_follow_cost():
    lo, hi = RANGE
    buckets, pred = choose_buckets(lambda n: 1e-6 * n + 1e-6, lo, hi, 3)
    assert 1 < len(buckets) <= 3 and buckets[-1] == hi and all(lo <= b <= hi for b in buckets)
    assert set(pred) == set(buckets)
    flat, _ = choose_buckets(lambda n: 1e-3, lo, hi, 3)  # padding costs nothing: one bucket
    assert flat == [hi]
    quad, _ = choose_buckets(lambda n: 1e-8 * n * n, lo, hi, 4)  # cost grows: more buckets
    assert len(quad) == 4


@pytest.fixture(scope="module")
def bucketed():
    torch.manual_seed(0)
    model = MaskedAttention().eval()
    art = hwopt.compile(model, _inputs(24), dynamic_shapes=({1: RANGE}, {1: RANGE}),
                        max_buckets=2, **OPTS)
    return model, art


def test_aot_buckets_chosen_and_padding_is_exact(bucketed):
    model, art = bucketed
    plan = art.plan
    assert plan.padded, plan.reason
    assert 1 <= len(plan.buckets) <= 2 and plan.buckets[-1] == RANGE[1]
    assert sorted(art.variants) == plan.buckets and art.compiles == len(plan.buckets)
    assert "cost" in plan.how
    with torch.no_grad():
        for n in LENGTHS:
            ids, mask = _inputs(n, seed=1)
            got = art(ids, mask)
            assert got.shape == (1, n, 32)
            assert _rel(got, model(ids, mask)) <= 1e-5, n
    assert set(art.calls) == set(plan.buckets)  # every bucket ran


def test_aot_saved_artifact_runs_every_bucket(bucketed, tmp_path):
    model, art = bucketed
    art.save(tmp_path)
    assert (tmp_path / "host_plan.json").exists()
    loaded = hwopt.load(tmp_path)
    with torch.no_grad():
        for n in LENGTHS:
            ids, mask = _inputs(n, seed=2)
            assert _rel(loaded(ids, mask), model(ids, mask)) <= 1e-5, n
    assert set(loaded.calls) == set(art.plan.buckets)
    with pytest.raises(hwopt.HwoptError, match="no compiled variant"):
        loaded(*_inputs(RANGE[0] - 1))


def test_unsafe_padding_compiles_exact_shapes_bounded():
    torch.manual_seed(0)
    model = MeanPooled().eval()
    art = hwopt.compile(model, (_inputs(16)[0],), dynamic_shapes=({1: RANGE},), max_buckets=2,
                        **OPTS)
    assert not art.plan.padded and "mean" in art.plan.reason
    with torch.no_grad():
        for n in (16, 20):  # the example's length, then one compiled on first use
            ids = _inputs(n)[0]
            assert _rel(art(ids), model(ids)) <= 1e-5
        assert art.compiles == 2
        with pytest.warns(UserWarning, match="PyTorch"):
            ids = _inputs(30)[0]
            assert _rel(art(ids), model(ids)) == 0.0  # beyond max_buckets: eager
    assert art.compiles == 2


def test_torch_compile_varying_lengths_compiles_at_most_max_buckets(monkeypatch, cache_dir):
    import hwopt.backend as backend

    compiles = []
    real = backend._compile_static
    monkeypatch.setattr(backend, "_compile_static",
                        lambda gm, args, opts: compiles.append(1) or real(gm, args, opts))
    torch.manual_seed(0)
    model = MaskedAttention().eval()
    torch._dynamo.reset()
    fast = torch.compile(model, backend="hwopt", options={**OPTS, "cache_dir": str(cache_dir),
                                                          "max_buckets": 2})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to PyTorch
        for n in LENGTHS:
            ids, mask = _inputs(n)
            torch._dynamo.mark_dynamic(ids, 1, min=RANGE[0], max=RANGE[1])
            torch._dynamo.mark_dynamic(mask, 1, min=RANGE[0], max=RANGE[1])
            assert _rel(fast(ids, mask), model(ids, mask)) <= 1e-5, n
    assert 1 <= len(compiles) <= 2


def test_options_validated():
    model = MeanPooled().eval()
    ids = _inputs(16)[0]
    with pytest.raises(OptionError, match="max_buckets"):
        hwopt.compile(model, (ids,), dynamic_shapes=({1: RANGE},), max_buckets=0, **OPTS)
    with pytest.raises(OptionError, match="dynamic_shapes"):
        hwopt.compile(model, (ids,), dynamic_shapes="seq", **OPTS)
    with pytest.raises(OptionError, match="lo <= hi"):
        hwopt.compile(model, (ids,), dynamic_shapes=({1: (9, 3)},), **OPTS)
    torch._dynamo.reset()
    fast = torch.compile(model, backend="hwopt", options={"dynamic_shapes": ({1: RANGE},)})
    with pytest.raises(Exception, match="dynamic_shapes"):
        fast(ids)
