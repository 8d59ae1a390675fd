import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hwopt.capture import from_module
from hwopt.graph import is_constant
from hwopt.pass_base import PassContext, get_pass
from hwopt.testing import assert_equivalent, graphs

BN = torch.ops.aten._native_batch_norm_legit_no_training.default


def _run_fuse(model, *x):
    cap = from_module(model, x)
    res = get_pass("fuse")(cap.gm, PassContext(target=None))
    return cap, res


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _randomize_bn(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    for bn in m.modules():
        if isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)):
            with torch.no_grad():
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
                bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.2)
                bn.weight.copy_(torch.randn(bn.num_features, generator=g))
                bn.bias.copy_(torch.randn(bn.num_features, generator=g))
    return m.eval()


def test_conv_bn_before_after():
    m = _randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()))
    x = torch.randn(2, 3, 16, 16)
    cap, res = _run_fuse(m, x)
    assert BN in _targets(cap.gm) or res.modified  # before: a BatchNorm node
    after = _targets(res.graph_module)
    assert BN not in after
    assert after.count(torch.ops.aten.convolution.default) == 1
    assert after.count(torch.ops.aten.relu.default) == 1
    torch.testing.assert_close(res.graph_module(x)[0], m(x), rtol=1e-4, atol=1e-5)


def test_linear_bn_folds_and_constants_fold():
    m = _randomize_bn(nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU()))
    x = torch.randn(4, 8)
    _, res = _run_fuse(m, x)
    after = _targets(res.graph_module)
    assert BN not in after and torch.ops.aten.permute.default not in after
    torch.testing.assert_close(res.graph_module(x)[0], m(x), rtol=1e-4, atol=1e-5)


def test_bn_fed_by_a_shared_conv_is_left_alone():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # conv output used twice: folding would change `y`

    m = _randomize_bn(Two())
    x = torch.randn(1, 3, 8, 8)
    _, res = _run_fuse(m, x)
    assert BN in _targets(res.graph_module)
    torch.testing.assert_close(res.graph_module(x)[0], m(x), rtol=1e-4, atol=1e-5)


@st.composite
def conv_bn_nets(draw):
    layers, c = [], draw(st.integers(1, 4))
    cin = c
    for _ in range(draw(st.integers(1, 3))):
        cout = draw(st.integers(1, 8))
        k = draw(st.sampled_from([1, 3]))
        groups = draw(st.sampled_from([1, cin])) if cout % cin == 0 else 1
        layers += [nn.Conv2d(cin, cout, k, draw(st.integers(1, 2)), k // 2, groups=groups,
                             bias=draw(st.booleans())), nn.BatchNorm2d(cout)]
        if draw(st.booleans()):
            layers.append(nn.ReLU())
        cin = cout
    m = _randomize_bn(nn.Sequential(*layers), draw(st.integers(0, 1000)))
    return m, torch.randn(1, c, draw(st.integers(4, 12)), draw(st.integers(4, 12)))


@settings(max_examples=25, deadline=None)
@given(conv_bn_nets())
def test_fuse_is_lossless_on_random_conv_bn_nets(case):
    m, x = case
    _, res = _run_fuse(m, x)
    assert BN not in _targets(res.graph_module)
    with torch.no_grad():
        want = m(x)
        got = res.graph_module(x)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(want.abs().max())))


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(graphs())
def test_fuse_is_lossless_on_random_graphs(case):
    """Any drawn model (conv, norms, attention, residuals ...): fuse keeps its meaning."""
    assert_equivalent(case, "fuse")


# -- attention and linear / conv epilogues ---------------------------------------------------

SOFTMAX = torch.ops.aten._softmax.default


def _fused(gm):
    from hwopt.lowering import attention  # noqa: F401  (registers hwopt::attention)

    return [n for n in gm.graph.nodes if n.target is torch.ops.hwopt.attention.default]


def _rel(got, want) -> float:
    got, want = (got[0] if isinstance(got, (tuple, list)) else got), want
    return float((got - want).norm() / want.norm())


class _Attn(nn.Module):
    """Eager attention as transformers writes it; `twice` also returns the probabilities."""

    def __init__(self, dim=-1, twice=False, scale=0.25):
        super().__init__()
        self.dim, self.twice, self.scale = dim, twice, scale

    def forward(self, q, k, v, mask):
        s = torch.matmul(q, k.transpose(-1, -2)) * self.scale + mask
        p = torch.softmax(s, self.dim)
        out = torch.matmul(p, v)
        return (out, p) if self.twice else out


def _qkv(s=17, d=16, heads=2, mask_shape=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, s, d, generator=g) for _ in range(3))
    mask = torch.randn(*(mask_shape or (1, 1, s, s)), generator=g)
    return q, k, v, mask


@pytest.mark.parametrize("name", ["vit", "gpt2"])  # gpt2: causal mask (a folded constant)
def test_attention_is_fused_in_the_zoo_transformers(name):
    from hwopt import zoo

    model, args = zoo.MODELS[name](small=True)
    cap, res = _run_fuse(model, *args)
    gm = res.graph_module
    assert len(_fused(gm)) == 2, name  # one per layer
    assert SOFTMAX not in _targets(gm) and torch.ops.aten.bmm.default not in _targets(gm)
    assert any("fused 2 attention" in n for n in res.notes), res.notes
    with torch.no_grad():
        assert _rel(gm(*args), model(*args)[0]) <= 1e-5, name


def test_scaled_dot_product_attention_is_fused():
    """SDPA (diffusers) decomposes with its scale split over q and k and a safe-softmax guard."""

    class Sdpa(nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)

    q, k, v, _ = _qkv()
    model = Sdpa().eval()
    cap, res = _run_fuse(model, q, k, v)
    gm = res.graph_module
    nodes = _fused(gm)
    assert len(nodes) == 1 and abs(nodes[0].args[4] - 0.3) < 1e-6
    assert SOFTMAX not in _targets(gm) and torch.ops.aten.where.self not in _targets(gm)
    with torch.no_grad():
        assert _rel(gm(q, k, v), model(q, k, v)) <= 1e-5


def test_attention_with_a_data_dependent_mask():
    from hwopt import zoo

    model, (ids,) = zoo.bert(small=True)
    mask = torch.ones_like(ids)
    mask[:, 20:] = 0
    cap = from_module(model, (ids, mask))
    gm = get_pass("fuse")(cap.gm, PassContext(target=None)).graph_module
    nodes = _fused(gm)
    assert len(nodes) == 2 and not is_constant(nodes[0].args[3])  # the mask stays an input
    other = torch.ones_like(ids)
    other[:, 5:] = 0
    with torch.no_grad():
        assert _rel(gm(ids, other), model(ids, attention_mask=other)[0]) <= 1e-5


def test_attention_not_fused_where_it_must_not_be():
    q, k, v, mask = _qkv()
    for model in (_Attn(dim=-2), _Attn(twice=True)):  # softmax over rows; probs used twice
        cap = from_module(model.eval(), (q, k, v, mask))
        gm = get_pass("fuse")(cap.gm, PassContext(target=None)).graph_module
        assert not _fused(gm) and SOFTMAX in _targets(gm)
        torch.testing.assert_close(gm(q, k, v, mask)[0], _first(model(q, k, v, mask)))

    class ScoresTwice(nn.Module):
        def forward(self, q, k, v):
            s = torch.matmul(q, k.transpose(-1, -2))
            return torch.matmul(torch.softmax(s, -1), v) + s.sum()

    cap = from_module(ScoresTwice().eval(), (q, k, v))
    assert not _fused(get_pass("fuse")(cap.gm, PassContext(target=None)).graph_module)


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _lowered(model, args, **fuse_config):
    """(fused graph, prepared Relax module, built VM outputs) of `model` on the cpu target."""
    import tvm
    from tvm import relax

    from hwopt.lowering.canonicalize import canonicalize
    from hwopt.lowering.relax_import import to_relax
    from hwopt.target import get_target

    target = get_target("cpu")
    cap = from_module(model, args)
    gm = get_pass("fuse", fuse_config or None)(cap.gm, PassContext(target=target)).graph_module
    low, tt = target.lowering, target.tvm()
    mod = low.prepare(to_relax(canonicalize(gm), tuple(cap.example_inputs)), tt)
    scheduled, _ = low.schedule(mod, tt)
    vm = relax.VirtualMachine(low.build(scheduled, tt), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a.numpy()) for a in cap.example_inputs])
    return gm, mod, torch.from_numpy(out[0].numpy())


def _kernels(mod) -> list[str]:
    from tvm import tirx

    return [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)]


def test_fused_attention_is_what_the_built_module_runs():
    # 17 keys: padded to 32 with -inf mask columns in the lowering; masks of several shapes.
    for shape in ((1, 1, 17, 17), (1, 1, 1, 17), (17,)):
        q, k, v, mask = _qkv(mask_shape=shape)
        causal = torch.full((17, 17), torch.finfo(torch.float32).min).triu(1)
        mask = mask + causal if shape == (1, 1, 17, 17) else mask
        model = _Attn().eval()
        gm, mod, got = _lowered(model, (q, k, v, mask))
        assert len(_fused(gm)) == 1
        names = _kernels(mod)
        assert any("softmax" in n for n in names)
        assert any("matmul" in n and "multiply" in n and "add" in n for n in names), names
        assert _rel(got, model(q, k, v, mask)) <= 1e-5, shape


def test_linear_gelu_and_residual_land_in_the_matmul_kernel():
    class FFN(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 64), nn.Linear(64, 16)

        def forward(self, x):
            return self.b(nn.functional.gelu(self.a(x))) + x

    torch.manual_seed(0)
    model, x = FFN().eval(), torch.randn(1, 8, 16)
    gm, mod, got = _lowered(model, (x,))
    names = _kernels(mod)
    assert any("matmul" in n and "gelu" in n for n in names), names
    assert sum("matmul" in n for n in names) == 2 and not any("gelu" in n and "matmul" not in n
                                                              for n in names)
    with torch.no_grad():
        assert _rel(got, model(x)) <= 1e-5
    _, before, _ = _lowered(model, (x,), fuse_epilogues=False)  # the reshape kept them apart
    assert any("gelu" in n and "matmul" not in n for n in _kernels(before))


def test_gpt2_tanh_gelu_chain_moves_onto_the_linear_output():
    from hwopt import zoo

    model, args = zoo.gpt2(small=True)
    _, res = _run_fuse(model, *args)
    note = next(n for n in res.notes if n.startswith("epilogues"))
    assert "linear+GELU 2" in note and "linear+residual add 4" in note, note
    with torch.no_grad():
        assert _rel(res.graph_module(*args), model(*args)[0]) <= 1e-5


def test_conv_add_relu_is_one_kernel():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)) + x)

    model, x = _randomize_bn(Res()), torch.randn(1, 8, 8, 8)
    gm, mod, got = _lowered(model, (x,))
    assert [n for n in _kernels(mod) if "conv2d" in n] == ["fused_conv2d_add_add1_relu"]
    torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-5)
    res = get_pass("fuse")(from_module(model, (x,)).gm, PassContext(target=None))
    assert any(n.startswith("conv+add+activation: 1") for n in res.notes), res.notes


def test_decompose_gives_plain_aten_ops_for_onnx_export():
    from hwopt.lowering.attention import decompose

    q, k, v, mask = _qkv()
    cap = from_module(_Attn().eval(), (q, k, v, mask))
    gm = get_pass("fuse")(cap.gm, PassContext(target=None)).graph_module
    plain = decompose(gm)
    assert _fused(gm) and not _fused(plain)
    ep = torch.export.export(plain, (q, k, v, mask))
    assert "hwopt" not in str(ep.graph)
    torch.testing.assert_close(plain(q, k, v, mask)[0], gm(q, k, v, mask)[0])


def test_attention_with_a_pre_transposed_key_input():
    class KT(nn.Module):
        def forward(self, q, kt, v):
            return torch.matmul(torch.softmax(torch.matmul(q, kt) / 4.0, -1), v)

    q, k, v, _ = _qkv(s=8)
    kt = k.transpose(-1, -2).contiguous()
    gm, _, got = _lowered(KT().eval(), (q, kt, v))
    (node,) = _fused(gm)
    assert node.args[4] == 0.25 and node.args[3] is None
    assert _rel(got, KT()(q, kt, v)) <= 1e-5
