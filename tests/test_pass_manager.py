import pytest
import torch

import hwopt
from hwopt.errors import OptionError, PassError
from hwopt.pass_base import Pass, PassContext, PassResult, get_pass, register_pass
from hwopt.pass_manager import PassManager, order_passes


def _mk(name, after=(), before=()):
    class P(Pass):
        def call(self, gm, ctx):
            return PassResult(gm, False)

    p = P()
    p.name, p.after, p.before = name, tuple(after), tuple(before)
    return p


def _gm():
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x + 1)

    return torch.fx.symbolic_trace(M())


def test_order_from_constraints():
    ps = [_mk("c", after=["b"]), _mk("a", before=["b"]), _mk("b")]
    assert [p.name for p in order_passes(ps)] == ["a", "b", "c"]


def test_order_ignores_absent_anchors_and_detects_cycles():
    assert [p.name for p in order_passes([_mk("x", after=["nope"])])] == ["x"]
    with pytest.raises(PassError, match="cycle"):
        order_passes([_mk("a", after=["b"]), _mk("b", after=["a"])])


def test_observer_records_provenance_and_timing():
    class AddNode(Pass):
        name = "add_node"

        def call(self, gm, ctx):
            out = next(n for n in gm.graph.nodes if n.op == "output")
            with gm.graph.inserting_before(out):
                neg = gm.graph.call_function(torch.neg, (out.args[0],))
            out.args = (neg,)
            return PassResult(gm, True)

    pm = PassManager([AddNode()])
    res = pm(_gm(), PassContext(target=None))
    stamped = [n for n in res.graph_module.graph.nodes if n.meta.get("hwopt_pass") == "add_node"]
    assert len(stamped) == 1 and stamped[0].target is torch.neg
    assert pm.records[0].modified and pm.records[0].seconds >= 0
    assert torch.equal(res.graph_module(torch.ones(2)), -torch.relu(torch.ones(2) + 1))


def test_hwopt_disable_skips_pass(monkeypatch):
    calls = []

    class Count(Pass):
        name = "count"

        def call(self, gm, ctx):
            calls.append(1)
            return PassResult(gm, False)

    monkeypatch.setenv("HWOPT_DISABLE", "count, other")
    pm = PassManager([Count()])
    pm(_gm(), PassContext(target=None))
    assert calls == [] and pm.records[0].skipped == "HWOPT_DISABLE"


def test_register_function_pass_and_lookup():
    @register_pass("test_noop_fn", lossless=True, after=("fuse",))
    def noop(gm, ctx):
        return PassResult(gm, False, ["nothing"])

    p = get_pass("test_noop_fn")
    assert p.name == "test_noop_fn" and p.lossless and p.after == ("fuse",)
    assert "test_noop_fn" in hwopt.registered_passes()
    assert p(_gm(), PassContext(target=None)).notes == ["nothing"]


def test_lossy_pass_must_declare_tolerance():
    with pytest.raises(OptionError, match="tolerance"):
        register_pass("bad_lossy", lossless=False)(lambda gm, ctx: PassResult(gm, False))


def test_unknown_pass_lists_registered():
    with pytest.raises(OptionError, match="fuse"):
        get_pass("fuze")


def test_pass_returning_wrong_type_is_named():
    class Bad(Pass):
        name = "bad"

        def call(self, gm, ctx):
            return gm

    with pytest.raises(PassError, match="'bad'"):
        PassManager([Bad()])(_gm(), PassContext(target=None))


def _linear_case():
    m = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU()).eval()
    x = torch.randn(4, 16)
    from hwopt.capture import from_module

    return from_module(m, (x,)).gm, x


def _noisy(scale):
    def fn(gm, ctx):
        for node in list(gm.graph.nodes):
            if node.op == "output":
                (out,) = node.args[0]
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_function(torch.ops.aten.mul.Tensor, (out, 1.0 + scale))
                node.args = ((new,),)
        return PassResult(gm, True)
    return fn


def test_lossy_pass_within_bound_is_kept_and_its_error_recorded():
    from hwopt.pass_base import FunctionPass
    from hwopt.target import get_target

    gm, x = _linear_case()
    p = FunctionPass(_noisy(0.01), "scale_a_bit", False, 0.05, (), ())
    ctx = PassContext(target=get_target("cpu"), example_inputs=(x,))
    manager = PassManager([p])
    out = manager(gm, ctx).graph_module
    (rec,) = manager.records
    assert rec.reverted is None and abs(rec.error - 0.01) < 1e-4 and rec.bound == 0.05
    assert rec.cost_before is not None and rec.cost_after.flops >= rec.cost_before.flops
    assert torch.ops.aten.mul.Tensor in [n.target for n in out.graph.nodes]


def test_lossy_pass_over_bound_is_undone_with_a_warning():
    from hwopt.pass_base import FunctionPass
    from hwopt.target import get_target

    gm, x = _linear_case()
    want = gm(x)
    p = FunctionPass(_noisy(0.3), "scale_a_lot", False, 0.05, (), ())
    ctx = PassContext(target=get_target("cpu"), example_inputs=(x,))
    manager = PassManager([p])
    with pytest.warns(UserWarning, match="undone"):
        out = manager(gm, ctx).graph_module
    assert "0.3" in manager.records[0].reverted and not manager.records[0].modified
    torch.testing.assert_close(out(x), want)
    # the user's tolerance option overrides the pass's own bound
    gm, x = _linear_case()
    ctx = PassContext(target=get_target("cpu"), example_inputs=(x,), tolerance=0.5)
    manager = PassManager([FunctionPass(_noisy(0.3), "scale_a_lot", False, 0.05, (), ())])
    manager(gm, ctx)
    assert manager.records[0].reverted is None
