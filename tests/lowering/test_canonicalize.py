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


class _Powers(torch.nn.Module):
    def forward(self, x):
        return x ** 3 + 0.5 * x ** 2.0 - x ** 4, x ** 2.5


def test_small_integral_powers_become_products_exact_for_negative_inputs():
    x = torch.linspace(-3, 3, 64).reshape(4, 16)
    cap = from_module(_Powers(), (x,))
    out = canonicalize(cap.gm)
    pows = [n for n in out.graph.nodes if n.target is torch.ops.aten.pow.Tensor_Scalar]
    assert [n.args[1] for n in pows] == [2.5]  # 2, 3, 4 rewritten; 2.5 kept
    got, ref = out(x), _Powers()(x)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], equal_nan=True)


def test_compiled_gelu_tanh_with_cube_matches_eager_without_pow_warning(capfd):
    import hwopt

    class Gelu(torch.nn.Module):
        def forward(self, x):
            return 0.5 * x * (1 + torch.tanh(0.79788456 * (x + 0.044715 * torch.pow(x, 3.0))))

    x = torch.randn(8, 32) * 3
    c = hwopt.compile(Gelu(), (x,), progress=False)
    torch.testing.assert_close(c(x), Gelu()(x), rtol=1e-5, atol=1e-5)
    assert "pow(x, y)" not in capfd.readouterr().err
