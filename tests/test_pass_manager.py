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
