"""Host side of grouped experts: lay routed rows out by expert, gather them, scatter results.

Sits in the *run* step, inside the `IslandOp` that the ``split`` pass builds for a chain of
mixture-of-experts dispatches (passes/split_experts.py). Plain functions, not custom ops (a
PyTorch custom op costs tens of microseconds per call on the host); the host plan calls them by
name (`HOST_FUNCTIONS`, step ``host`` in hwopt.dynamic.plan).

Layout: expert e's rows ``sels[e]`` come one after the other, each expert's block padded to a
multiple of ``tile`` rows, so every tile of rows belongs to one expert (what the grouped matmul
of hwopt.lowering.grouped needs). Padding rows read row 0 and are written to a dummy row past the
end of the output, which is dropped.
"""
from __future__ import annotations

import torch


def group_rows(sels: list, tile: int, rows: int) -> tuple:
    """(src, group, flat, dst) for the row indices `sels` (one int64 tensor per expert) of a
    batch of `rows` rows: ``src`` the row each slot reads (0 for padding), ``group`` the
    expert of each slot (int32), ``flat`` the slot's row in the experts' stacked sources
    (``src + e * rows``, for a per-expert source) and ``dst`` the row it adds to (`rows` for
    padding)."""
    counts = [int(s.numel()) for s in sels]
    sizes = [-(-c // tile) * tile for c in counts]
    total = sum(sizes)
    src = torch.zeros(total, dtype=torch.int64)
    dst = torch.full((total,), rows, dtype=torch.int64)
    group = torch.repeat_interleave(torch.arange(len(sels), dtype=torch.int32),
                                    torch.tensor(sizes))
    off = 0
    for s, c, size in zip(sels, counts, sizes):
        src[off:off + c] = s
        dst[off:off + c] = s
        off += size
    flat = src + group.long() * rows
    return src, group, flat, dst


def group_gather(srcs: list, flat: torch.Tensor) -> torch.Tensor:
    """The slots' rows from per-expert sources (``srcs[e]`` feeds expert e's rows)."""
    return torch.cat(srcs).index_select(0, flat)


def scatter_rows(acc: torch.Tensor, dst: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``acc`` with each slot's result added to its row (``index_add``; padding slots go to a
    dummy row that is dropped)."""
    out = torch.cat((acc, acc.new_zeros((1, *acc.shape[1:]))))
    out.index_add_(0, dst, y.to(acc.dtype))
    return out[:acc.shape[0]]


HOST_FUNCTIONS = {f.__name__: f for f in (group_rows, group_gather, scatter_rows)}
