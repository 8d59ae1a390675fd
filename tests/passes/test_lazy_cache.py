"""lazy_cache pass (passes/lazy_cache.py) and its runtime (hwopt/step_cache.py) on a tiny DiT."""
import copy
import dataclasses
import json

import pytest
import torch
from hwopt.passes.lazy_cache import LazyCacheConfig, find_blocks, quality
from hypothesis import HealthCheck, given, settings

import hwopt
from hwopt.capture import from_module
from hwopt.graph import propagate_meta
from hwopt.pass_base import PassContext, get_pass
from hwopt.step_cache import LazyBlock, StepCache, step_caches
from hwopt.target import get_target
from hwopt.testing import assert_equivalent, graphs

diffusers = pytest.importorskip("diffusers")


class DiT(torch.nn.Module):
    """DiTTransformer2DModel with positional inputs (latents, timestep, class labels)."""

    def __init__(self, layers=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.m = diffusers.DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
            norm_num_groups=1).eval()

    def forward(self, x, timestep, y):
        return self.m(x, timestep=timestep, class_labels=y, return_dict=False)[0]


def sample(fn, seed, steps=12, label=1):
    """A DDIM run; returns final latents and the model inputs of each step."""
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    sched.set_timesteps(steps)
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    y, inputs = torch.tensor([label]), []
    with torch.no_grad():
        for t in sched.timesteps:
            tt = t.reshape(1).clone()  # a fresh (aligned) tensor, not a view of the schedule
            inputs.append((lat, tt, y))
            out = fn(lat, tt, y)
            lat = sched.step(out[0] if isinstance(out, tuple) else out, t, lat).prev_sample
    return lat, inputs


@pytest.fixture(scope="module")
def dit():
    return DiT()


@pytest.fixture(scope="module")
def captured(dit):
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([999]), torch.tensor([1])
    cap = from_module(dit, (x, t, y))
    propagate_meta(cap.gm, cap.example_inputs)
    return cap


FAST = {"scales": (1.0, 2.0, 4.0), "refine": 1}  # a short threshold search keeps tests fast


def _apply(cap, calibration=None, **config):
    gm = copy.deepcopy(cap.gm)
    ctx = PassContext(target=get_target("cpu"), example_inputs=cap.example_inputs,
                      calibration=calibration)
    return get_pass("lazy_cache", config)(gm, ctx)


def _cache(gm) -> StepCache:
    return step_caches(gm)[0]


@torch.no_grad()  # hwopt compiles for inference; the cache is bypassed under autograd
def test_finds_the_transformer_blocks(captured):
    blocks = find_blocks(captured.gm)
    assert [p for p, _ in blocks] == ["m.transformer_blocks.0", "m.transformer_blocks.1"]
    res = _apply(captured)
    assert res.modified
    gm = res.graph_module
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert [type(gm.get_submodule(n.target)) for n in calls] == [LazyBlock, LazyBlock]
    assert sum(n.target is torch.ops.hwopt.step_begin.default for n in gm.graph.nodes) == 1
    # No cache reuse on the first call: exactly the original numbers.
    x, t, y = captured.example_inputs
    torch.testing.assert_close(gm(x, t, y)[0], captured.gm(x, t, y)[0])


def test_model_without_repeated_blocks_is_unchanged():
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    cap = from_module(m, (torch.randn(2, 8),))
    res = _apply(cap)
    assert not res.modified and "no repeated blocks" in res.notes[0]


@torch.no_grad()
def test_skip_decisions_follow_the_threshold(captured):
    gm = _apply(captured).graph_module
    cache = _cache(gm)
    x, y = captured.example_inputs[0], torch.tensor([1])
    x2 = x * 1.01  # relative L1 change of the first block's input: about 1% (patch embed)
    for threshold, expect_hits in ((0.0, 0), (0.5, 2), (1e-4, 0)):
        cache.thresholds = [threshold, threshold]
        hwopt.reset_cache(gm)
        cache.stats.__init__()
        gm(x, torch.tensor([900]), y)
        gm(x2, torch.tensor([880]), y)
        assert cache.stats.hits == expect_hits, threshold
    # A hit returns input + cached residual: close to, not equal to, full compute.
    full = captured.gm(x2, torch.tensor([880]), y)[0]
    cache.thresholds = [0.5, 0.5]
    hwopt.reset_cache(gm)
    gm(x, torch.tensor([900]), y)
    cached = gm(x2, torch.tensor([880]), y)[0]
    assert not torch.equal(cached, full) and quality([cached], [full], "psnr") > 20


@torch.no_grad()
def test_cache_resets_between_runs_and_on_shape_or_label_change(captured):
    gm = _apply(captured).graph_module
    cache = _cache(gm)
    cache.thresholds = [0.5, 0.5]
    x, y = captured.example_inputs[0], torch.tensor([1])
    gm(x, torch.tensor([900]), y)
    gm(x, torch.tensor([800]), y)
    assert cache.stats.hits == 2
    gm(x, torch.tensor([900]), y)  # timestep went up: a new sampling run
    assert cache.stats.hits == 2 and cache.stats.resets >= 1
    gm(x, torch.tensor([800]), torch.tensor([3]))  # another class: no reuse
    assert cache.stats.hits == 2 and cache.stats.invalidations == 2
    assert hwopt.reset_cache(gm) == 1 and not cache.entries
    gm(x, torch.tensor([900]), y)
    # The captured graph is specialised to its shapes, so a batch or resolution change reaches
    # the cache as a new key: the entry is dropped, never mixed.
    assert cache.lookup(0, (((2, 4, 8, 8), torch.float32),), [], torch.randn(2, 4, 8, 8)) is None
    assert cache.stats.invalidations == 3 and 0 not in cache.entries


def test_quality_floor_over_ddim_with_calibration(dit, captured):
    calibration = sample(dit, 1, steps=8)[1] + sample(dit, 2, steps=8)[1]
    res = _apply(captured, calibration, **FAST)
    gm, cache = res.graph_module, _cache(res.graph_module)
    assert "closed-loop" in res.notes[-1], res.notes
    ref, _ = sample(dit, 7, steps=8)
    got, _ = sample(gm, 7, steps=8)
    assert quality([got], [ref], "psnr") >= 30
    assert cache.stats.hits > 0, res.notes  # it did skip work
    assert all(0 < t <= LazyCacheConfig().max_threshold for t in cache.thresholds)


def test_config_is_frozen_and_checked():
    cfg = LazyCacheConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.target = 1.0
    with pytest.raises(hwopt.OptionError, match="metric"):
        get_pass("lazy_cache", {"metric": "ssim"})
    p = get_pass("lazy_cache")
    assert not p.lossless and 0 < p.tolerance < 1 and p.after == ("fuse",)


def test_torch_compile_backend(dit):
    calibration = sample(dit, 1, steps=8)[1]
    fast = torch.compile(dit, backend="hwopt", options={
        "passes": ["fuse", "lazy_cache"], "calibration": calibration, "executor": "torch",
        "cache_dir": False, "pass_config": {"lazy_cache": FAST}})
    ref, _ = sample(dit, 4, steps=8)
    got, _ = sample(fast, 4, steps=8)
    assert quality([got], [ref], "psnr") >= 30
    assert any(c.stats.misses for c in hwopt.step_cache.live_caches())
    assert hwopt.reset_cache(fast) >= 1  # Dynamo's graphs are not reachable: resets all
    torch._dynamo.reset()


@pytest.mark.slow
def test_hwopt_compile_blocks_in_tvm_cache_in_torch(dit, tmp_path):
    calibration = sample(dit, 1, steps=8)[1]
    x, t, y = calibration[0]
    art = hwopt.compile(dit, (x, t, y), passes=["fuse", "lazy_cache"], calibration=calibration,
                        cache_dir=False)
    rec = next(r for r in art.compiled.pass_records if r.name == "lazy_cache")
    assert rec.modified and rec.reverted is None and rec.error <= rec.bound
    tvm = {r.name for r in art.compiled.regions if r.executor == "tvm"}
    # The blocks themselves compile through TVM (nested regions); the cache stays in PyTorch.
    assert {"_hwopt_lazy_block_0.block", "_hwopt_lazy_block_1.block"} <= tvm, tvm
    code = art.compiled.graph.code
    assert "step_begin" in code and "_hwopt_lazy_block_0" in code
    ref, _ = sample(dit, 4, steps=8)
    got, _ = sample(art, 4, steps=8)
    assert quality([got], [ref], "psnr") >= 30
    assert hwopt.reset_cache(art) == 1
    saved = {r["name"]: r for r in json.loads(
        (art.save(tmp_path / "art") / "manifest.json").read_text())["regions"]}
    assert saved["_hwopt_lazy_block_0.block"].get("files"), saved


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(graphs(max_layers=3))
def test_property_random_graphs_keep_their_meaning(case):
    """Any drawn model (no timestep, usually no repeated blocks): lazy_cache keeps its outputs
    within its declared bound (usually by leaving the graph as it is)."""
    assert_equivalent(case, "lazy_cache")


def test_auto_executor_keeps_step_caches(dit):
    """executor="auto" times the whole graph against eager on one repeated input, which for a
    step cache only measures resets: the backend must keep the compiled graph (and its caches)."""
    calibration = sample(dit, 1, steps=8)[1]
    hwopt.step_cache.reset_cache()
    fast = torch.compile(dit, backend="hwopt", options={
        "passes": ["fuse", "lazy_cache"], "calibration": calibration, "executor": "auto",
        "cache_dir": False, "pass_config": {"lazy_cache": FAST}})
    sample(fast, 4, steps=8)
    assert any(c.stats.hits for c in hwopt.step_cache.live_caches())
    torch._dynamo.reset()


class _TwoLists(torch.nn.Module):
    """Two ModuleLists: `same` keeps the width (residual caches), `wide` changes it (no input
    has the output's shape: output caches), as the resnets of a UNet's down and up blocks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.same = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))
        self.wide = torch.nn.ModuleList(torch.nn.Linear(8 * (i + 1), 8 * (i + 2))
                                        for i in range(2))

    def forward(self, x, timestep):
        for m in self.same:
            x = x + torch.tanh(m(x))
        for m in self.wide:
            x = torch.tanh(m(x))
        return x * timestep


@torch.no_grad()
def test_every_repeated_list_is_cached_residual_or_output():
    model = _TwoLists().eval()
    x, t = torch.randn(2, 8), torch.tensor([3.0])
    cap = from_module(model, (x, t))
    propagate_meta(cap.gm, cap.example_inputs)
    res = _apply(cap, default_threshold=0.05)
    blocks = [m for m in res.graph_module.modules() if isinstance(m, LazyBlock)]
    assert [b.residual for b in blocks] == [True, True, False, False]
    def gm(*a):
        return res.graph_module(*a)[0]

    first = gm(x, t)
    torch.testing.assert_close(first, model(x, t))  # nothing cached yet: full compute
    near = x + 1e-3 * torch.randn(2, 8)
    got = gm(near, torch.tensor([2.0]))
    assert _cache(res.graph_module).stats.hits == 4  # every block reused
    torch.testing.assert_close(got, first / 3.0 * 2.0)  # the last block's cached output
    far = x + torch.randn(2, 8)
    torch.testing.assert_close(gm(far, torch.tensor([1.0])), model(far, torch.tensor([1.0])))

