"""The prune pass: masks per scheme, reconstruction, decisions, graph form, error paths."""
import dataclasses
import json

import pytest
import torch
import torch.nn as nn
from hwopt.passes.prune import PruneConfig, export_masks, sparse_weights
from hwopt.targets.cpu import TARGET as CPU

from hwopt.capture import from_module
from hwopt.errors import OptionError
from hwopt.pass_base import PassContext, get_pass
from hwopt.sparse import layout, masks
from hwopt.sparse.reconstruct import EXACT_FLOPS, gram, reconstruct

SPARSE = ("sparse_conv2d", "sparse_linear")


def _sparse_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and getattr(n.target, "namespace", "") == "hwopt"
            and n.target.__name__.split(".")[0] in SPARSE]


def _prune(model, x, calib, **config):
    cap = from_module(model, (x,))
    ctx = PassContext(target=CPU, example_inputs=cap.example_inputs, calibration=calib)
    gm = get_pass("fuse")(cap.gm, ctx).graph_module
    return get_pass("prune", config)(gm, ctx)


def _calib(shape, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g),) for _ in range(n)]


# -- masks -------------------------------------------------------------------------------------

def test_pattern_mask_kernels_use_library_patterns_and_connectivity():
    torch.manual_seed(0)
    imp = torch.rand(16, 8, 3, 3)
    lib = masks.pattern_library(imp, k=6)
    assert lib.shape == (6, 9) and bool((lib.sum(1) == 4).all()) and bool(lib[:, 4].all())
    m = masks.pattern_mask(imp, 0.5, lib).reshape(16, 8, 9)
    kept = m.any(2)
    assert bool((kept.sum(1) == 4).all())  # connectivity: 4 of 8 kernels per filter
    pats = {tuple(p.tolist()) for p in lib}
    assert all(tuple(k.tolist()) in pats for k in m[kept])  # every kept kernel: a library pattern


def test_nm_mask_keeps_n_of_every_m():
    imp = torch.rand(12, 32)
    for n, m in ((2, 4), (4, 8), (1, 4)):
        mask = masks.nm_mask(imp, n, m)
        assert bool((mask.reshape(12, -1, m).sum(2) == n).all())
        # the kept ones are the largest of each group
        g = imp.reshape(12, -1, m)
        assert bool((g[mask.reshape(12, -1, m)].reshape(12, -1, n).min(2).values >=
                     g[~mask.reshape(12, -1, m)].reshape(12, -1, m - n).max(2).values).all())


def test_block_punched_rows_of_a_block_share_their_columns():
    imp = torch.rand(16, 4, 3, 3)
    mask = masks.block_punched_mask(imp, 0.5, block_rows=8, block_cols=12).reshape(16, -1)
    for r0 in (0, 8):
        blk = mask[r0:r0 + 8]
        assert bool((blk == blk[0]).all())
    assert bool((mask.sum(1) == mask.sum(1)[0]).all())  # same count per row: no ragged rows
    assert abs(float(mask.float().mean()) - 0.5) < 0.05


def test_block_mask_prunes_whole_blocks():
    mask = masks.block_mask(torch.rand(32, 64), 0.25, 16, 16)
    blocks = mask.reshape(2, 16, 4, 16)
    per_block = blocks.float().mean((1, 3))
    assert bool(((per_block == 0) | (per_block == 1)).all())
    assert bool((per_block.sum(1) == 1).all())


def test_schemes_that_do_not_apply_say_why():
    assert "3x3" in masks.applies("pattern", "conv", (8, 8, 1, 1))
    assert masks.applies("pattern", "conv", (8, 8, 3, 3)) is None
    assert "linear" in masks.applies("nm", "conv", (8, 8, 3, 3))
    assert "multiple" in masks.applies("nm", "linear", (8, 10))
    assert masks.applies("block_punched", "conv", (8, 8, 5, 5)) is None


# -- layout and reconstruction -----------------------------------------------------------------

def test_compact_round_trip_and_detect():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    lib = masks.pattern_library(w ** 2, 4)
    wp = w * masks.pattern_mask(w ** 2, 0.5, lib)
    c = layout.compact(wp)
    assert c.w.shape == (8, 2 * 4) and c.chan.dtype == torch.int32
    assert torch.equal(layout.expand(c, w.shape), wp)
    assert layout.detect(wp) == "pattern"
    lin = torch.randn(6, 16)
    assert layout.detect(lin * masks.nm_mask(lin.abs(), 2, 4)) == "nm:2:4"
    assert layout.detect(lin) is None


@pytest.mark.parametrize("exact", [True, False])
def test_reconstruction_beats_masking_and_matches_least_squares(monkeypatch, exact):
    torch.manual_seed(0)
    x = torch.randn(512, 24) @ torch.randn(24, 24)  # correlated inputs
    w = torch.randn(10, 24)
    mask = masks.nm_mask(w.abs(), 2, 4)
    if not exact:
        monkeypatch.setattr("hwopt.sparse.reconstruct.EXACT_FLOPS", 0)
    h = gram(x)
    r = reconstruct(w, mask, h)
    assert bool((r[~mask] == 0).all())
    err_masked = float((x @ (w * mask).t() - x @ w.t()).norm())
    err_rec = float((x @ r.t() - x @ w.t()).norm())
    # exact: optimal per row; SparseGPT: sequential OBS, kept columns left of an error cannot help
    assert err_rec < (0.8 if exact else 0.98) * err_masked
    if exact:  # row 0 against an independent least-squares solve
        s = mask[0]
        sol = torch.linalg.lstsq(x[:, s].double(), (x @ w[0]).double().unsqueeze(1)).solution
        assert torch.allclose(r[0, s].double(), sol.squeeze(1), rtol=0.05, atol=0.05)
    assert EXACT_FLOPS > 0


# -- the pass ----------------------------------------------------------------------------------

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 1)  # 1x1: no kernel patterns
        self.c3 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 16)

    def forward(self, x):
        y = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.fc(y.mean((2, 3)))


def test_pattern_pass_rewrites_3x3_convs_and_explains_the_1x1():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 4, 8, 8)
    res = _prune(model, x, _calib(x.shape), scheme="pattern", sparsity=0.6)
    nodes = _sparse_nodes(res.graph_module)
    assert res.modified and len(nodes) >= 1
    notes = "\n".join(res.notes)
    assert "kernel patterns apply to 3x3 convolutions only" in notes
    for n in nodes:  # each pruned conv: <= 4 taps per kernel, centre kept
        w = sparse_weights(res.graph_module, n)
        k = (w != 0).reshape(w.shape[0], w.shape[1], 9)
        assert bool((k.sum(2) <= 4).all())
        assert bool((k[..., 4] | ~k.any(2)).all())
    masks_out = export_masks(res.graph_module)
    assert len(masks_out) == len(nodes)
    assert all(m.dim() == 4 and m.dtype == torch.bool for m in masks_out.values())


def test_nm_pass_on_linear_layers_keeps_2_of_4_and_stays_close():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).eval()
    x = torch.randn(16, 32)
    calib = _calib((64, 32), 8)
    # per-row 2:4 is not predicted to pay on this CPU (sparse_efficiency): prune anyway
    res = _prune(model, x, calib, scheme="nm", nm=(2, 4), use_cost_model=False, min_sqnr_db=0)
    nodes = _sparse_nodes(res.graph_module)
    assert len(nodes) == 2
    for n in nodes:
        w = sparse_weights(res.graph_module, n)
        assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(2) <= 2).all())
        assert n.args[1].meta["val"].shape[1] == w.shape[1] // 2  # compact [out, K/2]
    plain = _prune(model, x, calib, scheme="nm", nm=(2, 4), reconstruct=False,
                   use_cost_model=False, min_sqnr_db=0)

    def err(gm):
        with torch.no_grad():
            got, want = gm(x), model(x)
        got = got[0] if isinstance(got, (tuple, list)) else got
        return float((got - want).norm() / want.norm())

    assert err(res.graph_module) < 0.8 * err(plain.graph_module)


def test_missing_calibration_is_a_clear_error():
    model, x = Net().eval(), torch.randn(1, 4, 8, 8)
    cap = from_module(model, (x,))
    ctx = PassContext(target=CPU, example_inputs=cap.example_inputs)
    with pytest.raises(OptionError, match="calibration"):
        get_pass("prune")(cap.gm, ctx)


@pytest.mark.parametrize("bad", [{"scheme": "random"}, {"sparsity": 1.5},
                                 {"sparsity": 0.5, "latency": 0.5}, {"nm": (4, 2)}])
def test_bad_config_is_an_option_error(bad):
    with pytest.raises(OptionError, match="prune"):
        PruneConfig(**bad)


def test_config_round_trips_through_json():
    cfg = PruneConfig(scheme="nm", nm=(4, 8), latency=0.5, skip=("fc",))
    assert PruneConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["nm"] == [4, 8]
    assert dataclasses.asdict(cfg)["scheme"] == "nm"


def test_detect_compiles_an_already_pruned_model_without_changing_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 36, 16)).eval()
    with torch.no_grad():
        w = model[0].weight
        w.mul_(masks.pattern_mask(w ** 2, 0.5, masks.pattern_library(w ** 2, 4)))
        lw = model[3].weight
        lw.mul_(masks.nm_mask(lw.abs(), 2, 4))
    x = torch.randn(2, 4, 6, 6)
    cap = from_module(model, (x,))
    ctx = PassContext(target=CPU, example_inputs=cap.example_inputs)
    gm = get_pass("fuse")(cap.gm, ctx).graph_module
    res = get_pass("prune", {"scheme": "detect"})(gm, ctx)
    notes = "\n".join(res.notes)
    assert "detected pattern" in notes and "detected nm:2:4" in notes
    assert len(_sparse_nodes(res.graph_module)) == 2
    with torch.no_grad():
        got = res.graph_module(x)
    got = got[0] if isinstance(got, (tuple, list)) else got
    assert torch.allclose(got, model(x), atol=1e-5)


def _digits(epochs):
    from digits import accuracy, digits_data, digits_model, train

    (xtr, ytr), (xte, yte) = digits_data()
    model = train(digits_model(), xtr, ytr, epochs=epochs)
    calib = [(xtr[i:i + 60],) for i in range(0, 480, 60)]

    def acc(gm):
        return accuracy(lambda x: _first(gm(x)), xte, yte)

    return model, calib, xte[:60], accuracy(model, xte, yte), acc


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def test_digits_accuracy_floor_after_reconstruction():
    model, calib, x, dense, acc = _digits(epochs=4)
    res = _prune(model, x, calib, scheme="pattern", sparsity=0.5)
    assert len(_sparse_nodes(res.graph_module)) >= 1
    pruned = acc(res.graph_module)
    # measured 94-99 % (dense 98-99.7 %) without retraining; 4 training epochs vary by run
    assert pruned >= 90.0 and pruned >= dense - 8.0, (dense, pruned)


@pytest.mark.slow
def test_digits_reconstruction_beats_plain_masks():
    model, calib, x, dense, acc = _digits(epochs=10)
    refit = acc(_prune(model, x, calib, scheme="pattern", sparsity=0.7).graph_module)
    plain = acc(_prune(model, x, calib, scheme="pattern", sparsity=0.7,
                       reconstruct=False).graph_module)
    assert refit >= plain and refit >= dense - 2.0, (dense, refit, plain)
