import torch

from hwopt.capture import from_module
from hwopt.lowering.canonicalize import canonicalize


def test_relu6_becomes_relu_minimum_and_matches():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU6(),
                            torch.nn.Hardtanh(-1.0, 1.0)).eval()
    x = torch.randn(1, 3, 8, 8) * 10
    cap = from_module(m, (x,))
    out = canonicalize(cap.gm)
    targets = [n.target for n in out.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.minimum.default in targets
    assert targets.count(torch.ops.aten.hardtanh.default) == 1  # (-1, 1) is not ReLU6-like
    assert torch.ops.aten.hardtanh.default in [n.target for n in cap.gm.graph.nodes]  # copy
    torch.testing.assert_close(out(x)[0], m(x))
