import operator

import pytest
import torch
from hypothesis import HealthCheck, find, given, settings

import hwopt
from hwopt.pass_base import PassResult
from hwopt.testing import Case, assert_equivalent, graphs, models

ADD = (torch.ops.aten.add.Tensor, operator.add)
FAST = settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))


def add_to_sub(gm, ctx):
    """A deliberately wrong rewrite: every tensor add becomes a subtract."""
    changed = False
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in ADD:
            n.target, changed = torch.ops.aten.sub.Tensor, True
    gm.recompile()
    return PassResult(gm, changed)


def identity(gm, ctx):
    return PassResult(gm, False)


def _has_add(case: Case) -> bool:
    return any(n.op == "call_function" and n.target in ADD for n in case.module.graph.nodes)


@FAST
@given(graphs())
def test_drawn_graphs_are_core_aten_and_run(case):
    assert isinstance(case.module, torch.fx.GraphModule)
    out = case.module(*case.inputs)
    assert all(torch.isfinite(t).all() for t in (out if isinstance(out, tuple) else (out,)))


@FAST
@given(models())
def test_identity_pass_is_equivalent(case):
    assert_equivalent(case, identity)


def test_wrong_pass_is_caught():
    case = Case(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()), (torch.randn(2, 8),))
    assert_equivalent(case, add_to_sub)  # no add (linear lowers to addmm): nothing to break
    from hwopt.testing import _Residual

    case = Case(_Residual(torch.nn.Linear(8, 8)).eval(), (torch.randn(2, 8),))
    with pytest.raises(AssertionError, match="changed the result"):
        assert_equivalent(case, add_to_sub)


@pytest.mark.slow
def test_wrong_pass_is_caught_and_shrunk_to_a_minimal_model():
    def breaks(case):
        if not _has_add(case):
            return False
        try:
            assert_equivalent(case, add_to_sub, trials=1)
        except AssertionError:
            return True
        return False

    minimal = find(graphs(max_layers=4), breaks,
                   settings=settings(max_examples=60, deadline=None, database=None,
                                     suppress_health_check=list(HealthCheck)))
    assert len(minimal.layers) <= 2, minimal  # shrunk: one layer with an add (e.g. a residual)
    with pytest.raises(AssertionError, match="changed the result"):
        assert_equivalent(minimal, add_to_sub)


def test_assert_equivalent_accepts_modules_and_registered_names():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4).eval()).eval()
    res = assert_equivalent(m, "fuse", (torch.randn(1, 3, 8, 8),))
    assert res.modified


def test_lossy_pass_is_held_to_its_declared_tolerance():
    @hwopt.register_pass("test_round_weights", lossless=False, tolerance=0.05)
    def round_weights(gm, ctx):
        for _name, buf in list(gm.named_buffers()) + list(gm.named_parameters()):
            buf.data = (buf.data * 256).round() / 256  # coarse, but bounded
        return PassResult(gm, True)

    m = torch.nn.Sequential(torch.nn.Linear(16, 16)).eval()
    x = (torch.randn(4, 16),)
    assert_equivalent(m, round_weights, x)  # within 5 %
    with pytest.raises(AssertionError, match="tolerance"):
        assert_equivalent(m, round_weights, x, tol=1e-6)
