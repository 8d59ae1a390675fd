"""hwopt::sparse_conv2d / sparse_linear: PyTorch reference, and the TVM sparse kernel they lower to
(numerics for padding / stride / dilation / cropped widths, and that the sparse kernel runs)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hwopt
from hwopt.sparse import layout, masks, ops  # noqa: F401  (registers the ops)


class SparseConv(nn.Module):
    def __init__(self, w, stride=1, padding=1, dilation=1, bias=True, relu=True):
        super().__init__()
        c = layout.compact(w)
        self.register_buffer("w", c.w)
        self.register_buffer("chan", c.chan)
        self.register_buffer("tap", c.tap)
        self.register_buffer("b", torch.randn(w.shape[0]) if bias else None)
        self.k, self.s, self.p, self.d = list(w.shape[2:]), stride, padding, dilation
        self.relu = relu

    def forward(self, x):
        y = torch.ops.hwopt.sparse_conv2d(x, self.w, self.chan, self.tap, self.b, self.k,
                                          [self.s] * 2, [self.p] * 2, [self.d] * 2)
        return torch.relu(y) if self.relu else y


class SparseLinear(nn.Module):
    def __init__(self, w):
        super().__init__()
        c = layout.compact(w)
        self.register_buffer("w", c.w)
        self.register_buffer("chan", c.chan)
        self.register_buffer("b", torch.randn(w.shape[0]))

    def forward(self, x):
        return F.gelu(torch.ops.hwopt.sparse_linear(x, self.w, self.chan, self.b))


def _pattern_weight(o, c, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(o, c, k, k, generator=g)
    if k == 3:
        return w * masks.pattern_mask(w ** 2, 0.5, masks.pattern_library(w ** 2, 4))
    return w * masks.block_punched_mask(w ** 2, 0.4, 4, 8)


def test_reference_equals_the_dense_pruned_op():
    w = _pattern_weight(8, 6)
    x = torch.randn(2, 6, 7, 9)
    m = SparseConv(w, stride=2, relu=False)
    assert torch.allclose(m(x), F.conv2d(x, w, m.b, stride=2, padding=1), atol=1e-5)
    lw = torch.randn(12, 16)
    lw = lw * masks.nm_mask(lw.abs(), 2, 4)
    lm = SparseLinear(lw)
    xl = torch.randn(5, 16)
    assert torch.allclose(lm(xl), F.gelu(F.linear(xl, lw, lm.b)), atol=1e-5)


def _build(model, x):
    art = hwopt.compile(model, (x,), passes=[], executor="tvm", strict=True, cache_dir=False,
                        progress=False)
    with torch.no_grad():
        got, want = art(x), model(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    return art


@pytest.mark.parametrize("shape,k,stride,padding,dilation", [
    ((1, 8, 12, 12), 3, 1, 1, 1),    # width 12: padded to 16, cropped
    ((2, 6, 11, 9), 3, 2, 1, 1),     # stride 2, odd sizes, batch 2
    ((1, 8, 10, 10), 3, 1, 2, 2),    # dilation
    ((1, 8, 9, 16), 5, 1, 2, 1),     # 5x5 block-punched
])
def test_sparse_conv_kernel_matches_pytorch(shape, k, stride, padding, dilation):
    w = _pattern_weight(16, shape[1], k)
    _build(SparseConv(w, stride, padding, dilation), torch.randn(shape))


def test_the_sparse_kernel_is_what_runs_with_compact_weights():
    w = _pattern_weight(16, 8)
    art = _build(SparseConv(w), torch.randn(1, 8, 16, 16))
    kernels = {name: rule for r in art.compiled.regions for name, (rule, _) in r.kernels.items()}
    assert "sparse_indexed" in kernels.values()
    assert not any(rule == "conv2d_nhwc" for rule in kernels.values())  # no dense conv left
    node = next(n for n in art.compiled.graph.graph.nodes
                if n.op == "call_function" and n.target.__name__ == "sparse_conv2d.default")
    # compact weights: 4 kept kernels x 4 pattern taps per filter, not 8 x 9
    assert tuple(node.args[1].meta["val"].shape) == (16, 16)


def test_sparse_linear_kernel_matches_pytorch():
    w = torch.randn(48, 32)
    w = w * masks.nm_mask(w.abs(), 2, 4)
    art = _build(SparseLinear(w), torch.randn(20, 32))  # 20 tokens: padded to 24, cropped
    assert any(rule == "sparse_indexed" for r in art.compiled.regions
               for rule, _ in r.kernels.values())


def _rules(art) -> list[str]:
    return [rule for r in art.compiled.regions for rule, _ in r.kernels.values()]


def test_rows_sharing_entries_use_the_filter_vectorized_kernel():
    w = torch.randn(32, 64)
    w = w * masks.nm_mask(w.abs(), 2, 4, rows=8)
    c = layout.compact(w)
    assert c.group == 8 and c.chan.shape == (4, 32)
    assert torch.equal(layout.expand(c, w.shape), w)
    art = _build(SparseLinear(w), torch.randn(32, 64))
    assert "sparse_block_linear" in _rules(art) and "sparse_indexed" not in _rules(art)
    conv = _pattern_weight(16, 8, 5)  # block-punched 5x5: blocks of 4 filters share columns
    assert layout.compact(conv).group == 4
    art = _build(SparseConv(conv, padding=2), torch.randn(1, 8, 12, 12))
    assert "sparse_block_conv" in _rules(art)


def _shared_pattern_weight(o, c, share, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(o, c, 3, 3, generator=g)
    lib = masks.pattern_library(w ** 2, 8)
    return w * masks.pattern_mask(w ** 2, 0.5, lib, share=share)


@pytest.mark.parametrize("shape,stride,padding,dilation,rows", [
    ((1, 8, 12, 12), 1, 1, 1, 23),   # odd token count for the linear case
    ((2, 6, 11, 9), 2, 1, 1, 7),     # stride 2, odd sizes, batch 2
    ((1, 8, 10, 10), 1, 2, 2, 128),  # dilation
])
@pytest.mark.parametrize("share", [4, 8, 16])
def test_block_shared_kernels_match_pytorch(shape, stride, padding, dilation, rows, share):
    w = _shared_pattern_weight(32, shape[1], share)
    c = layout.compact(w)
    assert c.group == share
    art = _build(SparseConv(w, stride, padding, dilation), torch.randn(shape))
    assert "sparse_block_conv" in _rules(art)
    lw = torch.randn(32, 48)
    lw = lw * masks.block_punched_mask(lw.abs(), 0.5, share, 16)
    art = _build(SparseLinear(lw), torch.randn(rows, 48))
    assert "sparse_block_linear" in _rules(art)


def test_shared_pattern_mask_is_one_pattern_per_filter_block():
    w = torch.randn(32, 8, 3, 3)
    m = masks.pattern_mask(w ** 2, 0.5, masks.pattern_library(w ** 2, 8), share=16)
    blocks = m.reshape(2, 16, 8, 9)
    assert bool((blocks == blocks[:, :1]).all())  # every filter of a block: the same mask
    kept = m.reshape(32, 8, 9).any(2)
    assert bool((kept.sum(1) == 4).all())  # connectivity: half the kernels of every filter
    assert bool((m.reshape(32, 8, 9).sum(2)[kept] == 4).all())  # 4-entry patterns


@pytest.mark.parametrize("shape,stride", [((12, 8, 4, 4), 1), ((9, 6, 7, 5), 2)])
def test_small_maps_with_a_batch_run_batch_innermost(shape, stride):
    w = _pattern_weight(16, shape[1])
    art = _build(SparseConv(w, stride), torch.randn(shape))
    assert any(rule == "sparse_indexed" for r in art.compiled.regions
               for rule, _ in r.kernels.values())
