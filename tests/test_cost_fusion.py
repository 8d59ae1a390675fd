import pytest
import torch
import torch.nn as nn

from hwopt.cost_dataset import canonical
from hwopt.cost_fusion import graph_kernels, kernel_signature
from hwopt.cost_measure import build
from hwopt.target import get_target


class Attention(nn.Module):
    def forward(self, q, k, v, mask):
        s = torch.matmul(q, k.transpose(-1, -2)) * 0.25 + mask
        return torch.matmul(torch.softmax(s, -1), v)


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.pos = nn.Embedding(100, 32), nn.Parameter(torch.randn(16, 32))

    def forward(self, ids):
        return self.emb(ids) + self.pos


CASES = {
    "conv_bn_relu": (nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16),
                                   nn.ReLU()), (torch.randn(1, 8, 16, 16),),
                     ["conv[convolution+relu]", "to_nhwc[]", "to_nchw[]"]),
    "linear_gelu": (nn.Sequential(nn.Linear(32, 64), nn.GELU()), (torch.randn(1, 8, 32),),
                    ["matmul[addmm+gelu]"]),
    "attention": (Attention(), tuple(torch.randn(1, 2, 8, 16) for _ in range(3))
                  + (torch.randn(1, 1, 8, 8),), None),
    "embedding": (Embed(), (torch.randint(0, 100, (1, 16)),),
                  ["gather[embedding]", "elementwise[add]", "layout[]"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernels_match_what_the_lowering_builds(name):
    model, inputs, expected = CASES[name]
    gm, ins = canonical(model, inputs)
    kernels = graph_kernels(gm)
    if expected is not None:
        assert kernel_signature(kernels) == expected
    assert len(kernels) == build(gm, ins, get_target("cpu")).n_funcs
