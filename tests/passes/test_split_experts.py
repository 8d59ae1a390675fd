"""split pass, grouped experts: a chain of per-expert islands -> one grouped network."""
import torch
import torch.nn as nn
from hwopt.passes.split import SplitConfig, split_graph

import hwopt
from hwopt import dynamic_zoo as dz
from hwopt.capture import from_module
from hwopt.dynamic import IslandOp, load
from hwopt.target import get_target

OPTS = {"cache_dir": False, "executor": "tvm", "progress": False, "strict": True}


def _islands(gm):
    return {name: m for name, m in gm.named_modules() if isinstance(m, IslandOp)}


def _split(model, inputs, **config):
    gm = from_module(model, inputs).gm
    notes = split_graph(gm, SplitConfig(**config), get_target("cpu"))
    return gm, notes


def _close(a, b, tol=1e-5):
    return float((a - b).abs().max()) <= tol * max(float(b.abs().max()), 1e-6)


def test_moe_compiles_to_one_grouped_network(tmp_path):
    case = dz.cases("moe_top1")[0]
    model, inputs = case.make(True)
    art = hwopt.compile(model, inputs, **OPTS, pass_config={"split": {"max_buckets": 2}})
    assert list(_islands(art.compiled.module)) == ["_hwopt_experts_0"]
    notes = " ".join(n for r in art.compiled.pass_records if r.name == "split" for n in r.notes)
    assert "one network for 4 experts (2 grouped matmuls)" in notes and "rows <= 28" in notes
    nets = [r for r in art.compiled.regions if ".net.b" in r.name]
    assert nets and all(r.executor == "tvm" for r in nets)
    rules = [rule for r in nets for rule, _ in r.kernels.values()]
    assert rules.count("grouped_dense") == 2 * len(nets)
    for args in case.variants(inputs).values():
        assert _close(art(*args), model(*args))
    art.save(tmp_path)
    assert '"op": "host"' in (tmp_path / "host_plan.json").read_text()
    loaded = load(tmp_path)
    for args in case.variants(inputs).values():
        assert _close(loaded(*args), model(*args))


def test_group_experts_off_keeps_one_island_per_expert():
    model, inputs = dz.cases("moe_top1")[0].make(True)
    gm, notes = _split(model, inputs, group_experts=False)
    assert len(_islands(gm)) == 4 and not any("grouped" in n for n in notes)
    gm, notes = _split(model, inputs)
    assert list(_islands(gm)) == ["_hwopt_experts_0"]
    with torch.no_grad():
        assert _close(gm(*inputs)[0], model(*inputs))


class _OddExpert(dz.TopOneMoE):
    """Expert 1 has another activation: not the same code, so no grouped network."""

    def __init__(self):
        super().__init__(16, 3, 32)
        self.experts[1][1] = nn.ReLU()


class _Scaled(nn.Module):
    def __init__(self, d, hidden, scale):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.scale = nn.Parameter(scale)

    def forward(self, x):
        return self.mlp(x) * self.scale


class _ScaledExperts(dz.TopOneMoE):
    """Each expert ends in a per-channel scale: its own (not a linear layer's) or shared."""

    def __init__(self, shared: bool):
        super().__init__(16, 3, 32)
        g = torch.Generator().manual_seed(0)
        scales = [torch.rand(16, generator=g) for _ in range(3)]
        self.experts = nn.ModuleList(_Scaled(16, 32, scales[0] if shared else s)
                                     for s in scales)


def test_experts_that_differ_stay_apart_and_stay_correct():
    x = torch.randn(12, 16)
    for model, why in ((_OddExpert(), "differ in structure"),
                       (_ScaledExperts(False), "not a linear layer's")):
        model.eval()
        gm, notes = _split(model, (x,))
        assert any("kept apart" in n and why in n for n in notes), notes
        assert len(_islands(gm)) == 3
        with torch.no_grad():
            assert _close(gm(x)[0], model(x))


def test_experts_sharing_a_constant_keep_it_plain():
    model = _ScaledExperts(True).eval()  # the same scale: only the linear layers are grouped
    x = torch.randn(12, 16)
    gm, notes = _split(model, (x,))
    assert any("one network for 3 experts (2 grouped matmuls)" in n for n in notes), notes
    net = gm.get_submodule("_hwopt_experts_0").graph.net.sub
    assert net.code.count("aten.mul") == 2  # the scale and the routing weight
    with torch.no_grad():
        assert _close(gm(x)[0], model(x))
