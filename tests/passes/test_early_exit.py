"""early_exit pass (passes/early_exit.py, early_exit_stages.py, early_exit_calibrate.py) on small
residual stacks and multi-exit networks; runtime in hwopt/exit_runtime.py."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hwopt.passes.early_exit import EarlyExitConfig, heads_plan, stack_plan
from hwopt.passes.early_exit_calibrate import quality
from hwopt.passes.early_exit_stages import candidates, specialize

import hwopt
from hwopt.capture import from_module
from hwopt.exit_runtime import ExitCascade, exit_cascades, exit_stats
from hwopt.pass_base import PassContext, get_pass
from hwopt.target import get_target


class Block(nn.Module):
    def __init__(self, d, scale):
        super().__init__()
        self.lin, self.scale = nn.Linear(d, d), scale

    def forward(self, h):
        return h + self.scale * torch.tanh(self.lin(h))


class Stack(nn.Module):
    """Residual blocks whose updates shrink: large-norm samples converge after fewer blocks."""

    def __init__(self, n=5, d=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList(Block(d, 1.0 / (i + 1) ** 2) for i in range(n))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 3)

    def hidden(self, x):
        hs = [self.inp(x)]
        for b in self.blocks:
            hs.append(b(hs[-1]))
        return hs

    def tail(self, h):
        return self.head(self.norm(h).mean(1))

    def forward(self, x):
        return self.tail(self.hidden(x)[-1])


class ExitMLP(nn.Module):
    """Three segments with a classifier after each; returns every head's logits."""

    def __init__(self, d=12, classes=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.segs = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.ReLU()) for _ in range(3))
        self.heads = nn.ModuleList(nn.Linear(d, classes) for _ in range(3))

    def forward(self, x):
        outs = []
        for s, h in zip(self.segs, self.heads):
            x = s(x)
            outs.append(h(x))
        return tuple(outs)


def inputs(b=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 1.5, b)[:, None, None]  # from hard (small) to easy (large)
    return torch.randn(b, 4, 16, generator=g) * scale


def expected_similarity(model, x, thr, first=1):
    """Per sample alone: leave after block k >= first when cos(h_k, h_{k-1}) >= thr."""
    outs, exits = [], []
    for i in range(len(x)):
        hs = model.hidden(x[i:i + 1])
        k = len(hs) - 2
        for j in range(first, len(hs) - 2):
            if F.cosine_similarity(hs[j + 1].flatten(), hs[j].flatten(), dim=0) >= thr:
                k = j
                break
        outs.append(model.tail(hs[k + 1]))
        exits.append(k)
    return torch.cat(outs), exits


def compile_ee(model, x, **kw):
    cfg = kw.pop("pass_config", {})
    return hwopt.compile(model, (x,), passes=["early_exit"], executor="torch", progress=False,
                         cache_dir=False, pass_config={"early_exit": cfg}, **kw)


THR = 0.995


@pytest.fixture(scope="module")
def stack_art():
    model, x = Stack().eval(), inputs(b=8)
    art = compile_ee(model, x, tolerance=10.0, pass_config={"similarity_threshold": THR})
    return model, x, art


def test_similarity_exit_follows_threshold(stack_art):
    model, x, art = stack_art
    exit_stats(art)[0].reset()  # compile-time checks ran the model too
    with torch.no_grad():
        got = art(x)
        want, exits = expected_similarity(model, x, THR)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    (stats,) = exit_stats(art)
    assert stats.histogram == [exits.count(k) for k in range(5)]
    assert len(set(exits)) > 1, "the inputs should leave at different blocks"
    (cascade,) = exit_cascades(art)
    cascade.threshold = 0.9  # a lower threshold: more samples leave, and earlier
    with torch.no_grad():
        torch.testing.assert_close(art(x), expected_similarity(model, x, 0.9)[0], rtol=1e-4,
                                   atol=1e-5)
    cascade.threshold = THR


def test_per_sample_batch_matches_alone(stack_art):
    model, x, art = stack_art
    one = compile_ee(model, x[:1], tolerance=10.0, pass_config={"similarity_threshold": THR})
    (cascade,) = exit_cascades(art)
    cascade.stats.reset()
    with torch.no_grad():
        batched = art(x)
        alone = torch.cat([one(x[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
    # compacted, not padded: the cost model kept smaller sizes where rows had left on the
    # example run (an unreached last stage gets powers of two)
    sizes = [s.sizes for s in cascade.stages]
    assert all(s[-1] == 8 for s in sizes) and any(len(s) > 1 for s in sizes[1:])
    assert cascade.stats.rows_run < 8 * 5


def test_confidence_exit_follows_threshold():
    model = ExitMLP().eval()
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():  # about half the samples are sure enough at the first head
        thr = float(F.softmax(model(x)[0], -1).amax(-1).median())
    art = compile_ee(model, x, tolerance=100.0, pass_config={"confidence_threshold": thr})
    exit_stats(art)[0].reset()
    with torch.no_grad():
        got, full = art(x), model(x)
    exits = []
    for i in range(len(x)):
        k = next((k for k in range(2) if F.softmax(full[k][i], -1).max() >= thr), 2)
        exits.append(k)
        for j in range(3):
            torch.testing.assert_close(got[j][i], full[min(j, k)][i], rtol=1e-5, atol=1e-6)
    assert exit_stats(art)[0].histogram == [exits.count(k) for k in range(3)]
    assert 0 < exits.count(2) < len(x)


def test_calibration_keeps_quality_floor():
    model = Stack().eval()
    calib = [(inputs(b=6, seed=s),) for s in range(2, 6)]
    art = compile_ee(model, calib[0][0], calibration=calib,
                     pass_config={"metric": "cosine", "target": 0.99})
    (cascade,) = exit_cascades(art)
    assert cascade.threshold < 0.9999  # calibrated below the conservative default
    with torch.no_grad():
        got = [(art(*b),) for b in calib]
        want = [(model(*b),) for b in calib]
    assert quality(got, want, "cosine") >= 0.99
    assert exit_stats(art)[0].skipped_share > 0
    rec = next(r for r in art.compiled.pass_records if r.name == "early_exit")
    assert any("stages run per sample" in n for n in rec.notes)


def test_agreement_floor_exit_heads():
    model = ExitMLP().eval()
    g = torch.Generator().manual_seed(3)
    calib = [(torch.randn(16, 12, generator=g) * 3,) for _ in range(4)]
    art = compile_ee(model, calib[0][0], calibration=calib, tolerance=100.0,
                     pass_config={"metric": "agreement", "target": 0.99})
    with torch.no_grad():
        got = [art(*b)[-1:] for b in calib]
        want = [model(*b)[-1:] for b in calib]
    assert quality(got, want, "agreement") >= 0.99


def test_torch_compile_backend():
    torch._dynamo.reset()
    model, x = Stack().eval(), inputs()
    fast = torch.compile(model, backend="hwopt", options={
        "passes": ["early_exit"], "executor": "torch", "cache_dir": False, "tolerance": 10.0,
        "pass_config": {"early_exit": {"similarity_threshold": 0.99}}})
    with torch.no_grad():
        fast(x)  # compiles
        for s in exit_stats():
            s.reset()
        got = fast(x)
    want, exits = expected_similarity(model, x, 0.99)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert any(s.histogram == [exits.count(k) for k in range(5)] for s in exit_stats())
    torch._dynamo.reset()


def _run_pass(model, x, **config):
    cap = from_module(model, (x,))
    ctx = PassContext(target=get_target("cpu"), example_inputs=(x,))
    return get_pass("early_exit", config)(cap.gm, ctx)


def test_no_blocks_or_exits_unchanged():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    res = _run_pass(model, torch.randn(2, 8))
    assert not res.modified
    assert any("no repeated blocks" in n for n in res.notes)


class TwoOutputs(nn.Module):
    """Start/end logits from one linear (question answering): same shapes, not exit heads."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 2)

    def forward(self, x):
        s, e = self.lin(x).unbind(-1)
        return s, e


def test_same_shape_outputs_are_not_taken_for_exit_heads():
    res = _run_pass(TwoOutputs().eval(), torch.randn(3, 5, 8))
    assert not res.modified
    assert not any(isinstance(m, ExitCascade) for m in res.graph_module.modules())


def test_plans_and_bad_options():
    model, x = Stack(n=3).eval(), inputs(b=2)
    gm = from_module(model, (x,)).gm
    plan, _ = stack_plan(gm, EarlyExitConfig())
    assert len(plan.stages) == 3 and plan.exits[0] is None and plan.exits[-1] is None
    assert heads_plan(gm, None)[0] is None
    gm2 = from_module(ExitMLP().eval(), (torch.randn(2, 12),)).gm
    plan2, _ = heads_plan(gm2, None)
    assert len(plan2.stages) == 3 and plan2.exits[0][0] == "confidence"
    with pytest.raises(hwopt.OptionError):
        heads_plan(gm2, (0, 7))
    with pytest.raises(hwopt.OptionError):
        get_pass("early_exit", {"mode": "sometimes"})
    with pytest.raises(hwopt.OptionError, match="max_variants"):
        get_pass("early_exit", {"max_variants": 0})


def test_batch_sizes_follow_the_observed_row_counts():
    assert candidates(16) == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14] and candidates(1) == []
    model = ExitMLP().eval()
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():  # about half the samples are sure enough at the first head
        conf = F.softmax(model(x)[0], -1).amax(-1)
    thr = float(conf.median())

    def compiled(**cfg):
        art = compile_ee(model, x, tolerance=100.0,
                         pass_config={"confidence_threshold": thr, **cfg})
        (cascade,) = exit_cascades(art)
        return art, cascade

    art, cascade = compiled()
    sizes = [s.sizes for s in cascade.stages]
    assert sizes[0] == [16]  # the first stage always sees the whole batch: no other build
    assert all(s[-1] == 16 and len(s) <= 6 and set(s[:-1]) <= set(candidates(16))
               for s in sizes)
    left = int((conf >= thr).sum())
    assert 16 - left in sizes[1]  # the rows the second stage ran on: a variant, no padding
    cascade.stats.reset()
    with torch.no_grad():
        got, full = art(x), model(x)
    torch.testing.assert_close(got[0], full[0], rtol=1e-5, atol=1e-6)
    n2 = next(iter(cascade.stats.active[2]), 0)  # rows at the last stage (0: none left)
    assert n2 == 0 or n2 in sizes[2]
    assert cascade.stats.rows_run == 16 + (16 - left) + n2  # no padded row anywhere
    rec = next(r for r in art.compiled.pass_records if r.name == "early_exit")
    assert any("kept by the cost model" in n for n in rec.notes)
    _, one = compiled(max_variants=1)
    assert [s.sizes for s in one.stages] == [[16]] * 3


def test_specialize_rescales_batch_shapes():
    class Flat(nn.Module):
        def forward(self, x):
            return x.reshape(x.shape[0], -1).reshape(x.shape[0] * 3, 2) * 2

    x = torch.randn(4, 6)
    gm = from_module(Flat(), (x,)).gm
    small = specialize(gm, 4, 2)
    torch.testing.assert_close(small(x[:2])[0], Flat()(x[:2]))


@pytest.mark.slow
def test_tvm_lowering_of_stages():
    model, x = Stack(n=3).eval(), inputs(b=2)
    art = hwopt.compile(model, (x,), passes=["early_exit"], executor="tvm", progress=False,
                        tolerance=10.0, pass_config={"early_exit": {"similarity_threshold": 0.99}})
    names = [r.name for r in art.compiled.regions if r.executor == "tvm"]
    assert any("_hwopt_exit_cascade.stages" in n for n in names)
    with torch.no_grad():
        want, _ = expected_similarity(model, x, 0.99)
        torch.testing.assert_close(art(x), want, rtol=1e-4, atol=1e-4)


def test_specialize_slices_constant_with_equal_batch_rows():
    """A folded constant with a batch dimension (an attention mask built from ones) is sliced
    to the smaller batch; one whose rows differ is not, so that variant is rejected."""
    import torch.fx as fx

    for mask, ok in ((torch.zeros(4, 1, 6), True), (torch.arange(4.).reshape(4, 1, 1), False)):
        g = fx.Graph()
        x = g.placeholder("x")
        m = g.get_attr("mask")
        g.output((g.call_function(torch.ops.aten.add.Tensor, (x, m)),))
        root = nn.Module()
        root.register_buffer("mask", mask)
        gm = fx.GraphModule(root, g)
        x4 = torch.randn(4, 3, 6)
        from hwopt.graph import propagate_meta

        propagate_meta(gm, (x4,))
        small = specialize(gm, 4, 2, [x4])
        if ok:
            torch.testing.assert_close(small(x4[:2])[0], x4[:2] + mask[:2])
        else:
            with pytest.raises(RuntimeError):
                small(x4[:2])
