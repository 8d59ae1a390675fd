import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hwopt.capture import from_module
from hwopt.pass_base import PassContext, get_pass
from hwopt.testing import assert_equivalent, graphs

BN = torch.ops.aten._native_batch_norm_legit_no_training.default


def _run_fuse(model, x):
    cap = from_module(model, (x,))
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
