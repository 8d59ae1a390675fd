"""split pass: control flow -> static sub-networks + host dispatcher; saved host plan."""
import warnings

import pytest
import torch
import torch.fx as fx

import hwopt
from hwopt import dynamic_zoo as dz
from hwopt.dynamic import CondOp, IslandOp, WhileOp, load
from hwopt.dynamic.buckets import candidates, choose, row_independent
from hwopt.errors import HwoptError

OPTS = {"cache_dir": False, "executor": "tvm", "progress": False, "strict": True}


def _aot(case, **split):
    model, inputs = case.make(True)
    # two buckets per expert keep the MoE builds short (4 experts x buckets TVM builds)
    return model, inputs, hwopt.compile(model, inputs, **OPTS,
                                        pass_config={"split": {"max_buckets": 2, **split}})


def _close(a, b, tol=1e-4):
    return float((a - b).abs().max()) <= tol * max(float(b.abs().max()), 1e-6)


def _tvm_regions(art, prefix):
    return [r.name for r in art.compiled.regions if r.name.startswith(prefix)
            and r.executor == "tvm"]


def test_cond_both_branches_compiled_and_taken():
    model, inputs, art = _aot(dz.cases("gated_mlp")[0])
    op = art.compiled.module.get_submodule("_hwopt_cond_0")
    assert isinstance(op, CondOp)
    assert {"_hwopt_cond_0.true_branch", "_hwopt_cond_0.false_branch"} <= set(
        _tvm_regions(art, "_hwopt_cond_0"))
    op.calls.clear()
    for args in dz.cases("gated_mlp")[0].variants(inputs).values():
        assert _close(art(*args), model(*args))
    assert op.calls == {"true": 1, "false": 1}


def test_while_loop_runs_compiled_body():
    case = dz.cases("refine_loop")[0]
    model, inputs, art = _aot(case)
    assert isinstance(art.compiled.module.get_submodule("_hwopt_while_loop_0"), WhileOp)
    assert "_hwopt_while_loop_0.body_fn" in _tvm_regions(art, "_hwopt_while_loop_0")
    for args in case.variants(inputs).values():
        assert _close(art(*args), model(*args))


@pytest.mark.slow  # 4 experts x 2 buckets of TVM builds: ~50 s
def test_moe_routing_islands_use_buckets():
    case = dz.cases("moe_top1")[0]
    # experts kept apart (grouped experts: tests/passes/test_split_experts.py)
    model, inputs, art = _aot(case, group_experts=False)
    islands = [m for m in art.compiled.module.modules() if isinstance(m, IslandOp)]
    assert len(islands) == 4  # one per expert
    notes = " ".join(n for r in art.compiled.pass_records if r.name == "split" for n in r.notes)
    assert "buckets [" in notes and "rows <= 16" in notes
    assert any(".b" in r.name and r.executor == "tvm" for r in art.compiled.regions)
    for args in case.variants(inputs).values():
        assert _close(art(*args), model(*args))


def test_exit_head_cond():
    case = dz.cases("exit_cnn")[0]
    model, inputs, art = _aot(case)
    for args in case.variants(inputs).values():
        assert _close(art(*args), model(*args))


@pytest.mark.parametrize("name", ["gated_mlp", "refine_loop",
                                  pytest.param("moe_top1", marks=pytest.mark.slow)])
def test_saved_host_plan_runs_every_path(tmp_path, name):
    case = dz.cases(name)[0]
    model, inputs, art = _aot(case)
    art.save(tmp_path)
    assert (tmp_path / "host_plan.json").exists()
    text = (tmp_path / "host_plan.json").read_text()
    assert "def forward" not in text  # data, not Python code
    loaded = load(tmp_path)
    for args in case.variants(inputs).values():
        assert _close(loaded(*args), model(*args))
    if name == "gated_mlp":
        assert loaded.runner.calls == {"_hwopt_cond_0:true": 1, "_hwopt_cond_0:false": 1}
    if name == "refine_loop":
        assert loaded.runner.calls == {"_hwopt_while_loop_0:iterations": 3}


def test_loaded_artifact_rejects_bad_input(tmp_path):
    case = dz.cases("gated_mlp")[0]
    model, inputs, art = _aot(case)
    art.save(tmp_path)
    loaded = load(tmp_path)
    with pytest.raises(HwoptError, match="compiled for"):
        loaded(torch.randn(3, 5))
    with pytest.raises(HwoptError, match="host_plan.json"):
        load(tmp_path / "nowhere")


def test_python_if_aot_error_says_use_cond():
    model, inputs = dz.cases("python_if")[0].make(True)
    with pytest.raises(HwoptError, match="torch.cond"):
        hwopt.compile(model, inputs, **OPTS)


@pytest.mark.parametrize("name", ["gated_mlp", "python_if"])
def test_torch_compile_both_branches(name, cache_dir):
    case = dz.cases(name)[0]
    model, inputs = case.make(True)
    torch._dynamo.reset()
    fast = torch.compile(model, backend="hwopt", options={**OPTS, "cache_dir": str(cache_dir)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to PyTorch
        for args in case.variants(inputs).values():
            with torch.no_grad():
                assert _close(fast(*args), model(*args))


def test_split_pass_is_noop_on_static_graph():
    from hwopt.passes.split import needs_split

    gm = fx.symbolic_trace(torch.nn.Linear(4, 4))
    assert not needs_split(gm)


def _graph(fn, *shapes):
    ep = torch.export.export(_Wrap(fn), tuple(torch.randn(*s) for s in shapes))
    return ep.run_decompositions().module()


class _Wrap(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *x):
        return self.fn(*x)


def test_row_independence_rejects_mixing_rows():
    def routed(x, fn):
        sel = (x[:, 0] > 0).nonzero().squeeze(-1)
        return fn(x.index_select(0, sel))

    ok = _graph(lambda x: routed(x, lambda r: (r * 2).relu()).sum(0), (6, 4))
    bad = _graph(lambda x: routed(x, lambda r: r.softmax(0)).sum(0), (6, 4))

    def dyn_nodes(gm):
        from hwopt.passes.split_islands import _Compute

        return [n for n in gm.graph.nodes if _Compute().is_node_supported({}, n)]

    assert row_independent([n for n in dyn_nodes(ok) if "mul" in n.name or "relu" in n.name]) \
        is None
    assert "dynamic dimension" in (row_independent(dyn_nodes(bad)) or "dynamic dimension")


def test_bucket_choice_keeps_the_largest_and_bounds_count():
    sizes = candidates(16)
    assert sizes == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16]
    assert candidates(40)[-4:] == [24, 28, 32, 40] and candidates(1) == [1]
    lat = {s: 1e-6 + s * 1e-6 for s in sizes}  # cost grows with rows: smaller buckets pay
    chosen = choose(lat, 16, 3)
    assert chosen[-1] == 16 and len(chosen) <= 3 and len(chosen) > 1
    flat = {s: 1e-3 for s in sizes}  # fixed cost: one bucket is enough
    assert choose(flat, 16, 3) == [16]
    seen = {n: 1.0 for n in range(1, 17)}
    seen[5] += 16  # a row count seen on the example run gets a bucket of its own
    assert 5 in choose(lat, 16, 3, seen)


def test_bucketed_rechooses_on_the_rows_seen():
    from hwopt.dynamic.buckets import Bucketed

    lat = {s: 1e-6 + s * 1e-6 for s in candidates(64)}
    b = Bucketed(torch.fx.symbolic_trace(torch.nn.ReLU()), (0,), (0,), [16, 32, 48, 64],
                 "cost", lat, 4)
    b.rechoose(37)
    assert 40 in b.buckets and b.buckets[-1] == 64 and len(b.buckets) <= 4
    assert "rows seen 37" in b.how
    fixed = Bucketed(torch.fx.symbolic_trace(torch.nn.ReLU()), (0,), (0,), [64])
    fixed.rechoose(37)  # no latencies: the buckets stay
    assert fixed.buckets == [64]
