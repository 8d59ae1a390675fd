"""Host layout of grouped experts: group_rows / group_gather / scatter_rows."""
import torch

from hwopt.dynamic.grouped import group_gather, group_rows, scatter_rows


def _sels(rows=10, experts=3, seed=0):
    idx = torch.randint(0, experts, (rows,), generator=torch.Generator().manual_seed(seed))
    return idx, [(idx == e).nonzero().squeeze(-1) for e in range(experts)]


def test_layout_puts_each_expert_in_whole_tiles():
    idx, sels = _sels()
    src, group, flat, dst = group_rows(sels, 4, 10)
    assert src.numel() % 4 == 0 and group.dtype == torch.int32
    assert src.numel() == sum(-(-s.numel() // 4) * 4 for s in sels)
    assert all(len(set(t.tolist())) == 1 for t in group.view(-1, 4))  # one expert per tile
    real = dst < 10
    assert sorted(dst[real].tolist()) == list(range(10))  # every row once
    assert torch.equal(src[real], dst[real])
    assert torch.equal(group[real].long(), idx[dst[real]])  # each row goes to its expert
    assert torch.equal(flat, src + group.long() * 10)
    assert (src[~real] == 0).all()  # padding reads a valid row


def test_gather_and_scatter_equal_the_per_expert_index_add_chain():
    idx, sels = _sels(rows=9, experts=4, seed=1)
    x, acc = torch.randn(9, 5), torch.randn(9, 5)
    cols = [torch.randn(9) for _ in sels]
    want = acc
    for e, s in enumerate(sels):
        want = want.index_add(0, s, x.index_select(0, s) * (e + 1) * cols[e].index_select(0, s)
                              .unsqueeze(-1))
    src, group, flat, dst = group_rows(sels, 4, 9)
    y = x.index_select(0, src) * (group.float() + 1).unsqueeze(-1) * group_gather(
        cols, flat).unsqueeze(-1)
    torch.testing.assert_close(scatter_rows(acc, dst, y), want)


def test_an_expert_with_no_rows_takes_no_slots():
    sels = [torch.tensor([0, 2]), torch.tensor([], dtype=torch.int64), torch.tensor([1])]
    src, group, _, dst = group_rows(sels, 4, 3)
    assert group.tolist() == [0] * 4 + [2] * 4
    assert dst.tolist() == [0, 2, 3, 3, 1, 3, 3, 3]
