"""hwopt::grouped_mm: the reference, and the TVM kernel (grouped_dense rule) matching it."""
import pytest
import torch

import hwopt
from hwopt.lowering.grouped import reference

OPTS = {"cache_dir": False, "executor": "tvm", "progress": False, "strict": True}


def _weights(groups=3, k=16, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(groups, k, n, generator=g) * 0.2, torch.randn(groups, n, generator=g)


def test_reference_is_a_matmul_per_row_group():
    w, b = _weights()
    group = torch.tensor([2] * 4 + [0] * 8 + [1] * 4, dtype=torch.int32)
    x = torch.randn(16, 16)
    y = reference(x, w, b, group, 4)
    for p in range(16):
        e = int(group[p])
        torch.testing.assert_close(y[p], x[p] @ w[e] + b[e])
    torch.testing.assert_close(reference(x, w, None, group, 4)[0], x[0] @ w[2])


def test_reference_uses_the_group_of_each_tiles_first_row():
    w, b = _weights()
    group = torch.tensor([1, 2, 2, 2], dtype=torch.int32)  # a tile is one group: its first
    x = torch.randn(4, 16)
    torch.testing.assert_close(reference(x, w, b, group, 4), x @ w[1] + b[1])


def test_rows_must_fill_whole_tiles():
    w, b = _weights()
    with pytest.raises(ValueError, match="multiple of tile"):
        reference(torch.randn(6, 16), w, b, torch.zeros(6, dtype=torch.int32), 4)


class TwoLayers(torch.nn.Module):
    """The grouped network the split pass builds for a two-layer MLP expert."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = _weights(3, 16, 64, 1)
        self.w2, self.b2 = _weights(3, 64, 16, 2)

    def forward(self, x, scale, group):
        h = torch.nn.functional.gelu(torch.ops.hwopt.grouped_mm(x, self.w1, self.b1, group, 4))
        return torch.ops.hwopt.grouped_mm(h, self.w2, self.b2, group, 4) * scale.unsqueeze(-1)


def test_tvm_kernels_match_reference_with_fused_epilogues():
    m = TwoLayers()
    group = torch.tensor([0] * 8 + [2] * 12 + [1] * 4, dtype=torch.int32)
    x, scale = torch.randn(24, 16), torch.rand(24)
    art = hwopt.compile(m, (x, scale, group), **OPTS)
    kernels = {k: rule for r in art.compiled.regions for k, (rule, _) in r.kernels.items()}
    assert sorted(kernels.values()) == ["grouped_dense", "grouped_dense"], kernels  # 2 kernels
    assert any("gelu" in k for k in kernels)  # the activation is in the first one's epilogue
    other = torch.tensor([1] * 4 + [0] * 20, dtype=torch.int32)
    for g in (group, other):
        torch.testing.assert_close(art(x, scale, g), m(x, scale, g), rtol=1e-4, atol=1e-5)
