"""int8 attention (hwopt.lowering.qattention): both matmuls as integer kernels, numerics."""
import pytest
import torch
import torch.nn as nn
from int8_dots import LANES, RULE, dots, target

import hwopt
from hwopt.lowering.qattention import reference
from hwopt.quant import sqnr

DENSE = {dot: rules[1] for dot, rules in RULE.items()}


class SelfAttention(nn.Module):
    """q/k/v/o projections around eager attention with an additive mask (BERT style)."""

    def __init__(self, d=64, heads=2):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.h, self.dh = heads, d // heads

    def forward(self, x, mask):
        b, s, _ = x.shape

        def split(t):
            return t.view(b, s, self.h, self.dh).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.dh ** -0.5 + mask, -1)
        return self.o(torch.matmul(p, v).transpose(1, 2).reshape(b, s, -1))


def _inputs(s, d, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 1, 1, s)
    mask[..., -3:] = -1e4  # three padding tokens
    return torch.randn(1, s, d, generator=g), mask


def _compile(model, s, d, dot, attention=True):
    return hwopt.compile(model, _inputs(s, d, 0), target=target(dot), passes=["fuse", "quantize"],
                         pass_config={"quantize": {"use_cost_model": False,
                                                   "attention": attention}},
                         calibration=[_inputs(s, d, i) for i in range(1, 5)], executor="tvm",
                         strict=True, cache_dir=False, progress=False)


def _int_matmuls(art, dot):
    (region,) = art.compiled.regions
    assert region.executor == "tvm"
    return sorted(k for k, c in region.kernels.items() if c[0] == DENSE[dot])


# 13 tokens: keys padded to 16; head dim 32 (VNNI and vpmaddwd tiles), 6 (VNNI pads it to 8;
# narrower than a vector: the fp32 rule runs the integer block)
@pytest.mark.parametrize("dot", dots())
@pytest.mark.parametrize("s,d,heads", [(13, 64, 2), (20, 12, 2)])
def test_int8_attention_runs_integer_kernels_and_matches(dot, s, d, heads):
    torch.manual_seed(0)
    model = SelfAttention(d, heads).eval()
    art = _compile(model, s, d, dot)
    ops = [n.target for n in art.compiled.graph.graph.nodes if n.op == "call_function"]
    assert torch.ops.hwopt.qattention.default in ops
    assert torch.ops.hwopt.attention.default not in ops
    if d // heads % LANES == 0:  # QK^T and PV are integer dot-product kernels too
        plain = _int_matmuls(_compile(model, s, d, dot, attention=False), dot)
        assert len(_int_matmuls(art, dot)) == len(plain) + 2
    fake = art.compiled.graph  # the pass's graph: qattention's PyTorch reference
    for i in (0, 7):
        x, mask = _inputs(s, d, i)
        with torch.no_grad():
            got, want, full = art(x, mask), fake(x, mask)[0], model(x, mask)
        # the output projection requantizes: a tie rounded the other way moves one step
        lsb = float(max(n.args[1] for n in fake.graph.nodes
                        if n.target is torch.ops.quantized_decomposed.quantize_per_tensor.default))
        assert float((got - want).abs().max()) <= 2 * lsb + 1e-6
        assert sqnr(full, got) >= 20.0


def test_reference_is_attention_with_8_bit_weights():
    """`reference` = attention of the dequantized inputs, up to the uint8 exponentials; keys
    masked with -inf add exactly nothing."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randint(-128, 128, (1, 3, 40, 16), generator=g, dtype=torch.int8)
               for _ in range(3))
    qp = (0.02, 3, 0.03, -5, 0.05, 7)  # scale, zero point of q, k, v
    mask = torch.zeros(1, 1, 40, 40)
    got = reference(q, k, v, mask, 0.25, *qp)
    deq = [(t.float() - z) * s for t, s, z in zip((q, k, v), qp[::2], qp[1::2])]
    want = torch.softmax(deq[0] @ deq[1].transpose(-1, -2) * 0.25, -1) @ deq[2]
    assert sqnr(want, got) >= 35.0
    mask[..., 30:] = float("-inf")
    cut = reference(q, k[..., :30, :], v[..., :30, :], None, 0.25, *qp)
    assert torch.allclose(reference(q, k, v, mask, 0.25, *qp), cut, rtol=1e-6, atol=1e-7)
