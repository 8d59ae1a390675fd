"""Compact layouts of pruned weights, and the detection of an already-pruned layer's structure.

A pruned layer is stored as ``w [O, J]`` (the kept weights of each output row, packed, rows
padded with zeros to the longest), ``chan [O, J]`` (input channel / feature each entry reads) and,
for convolutions, ``tap [O, J]`` (kernel position ``ky * kw + kx``). This is the form
``hwopt::sparse_conv2d`` / ``hwopt::sparse_linear`` take: every output row has the same count,
skipped kernels appear nowhere, and entries are ordered by channel then tap so that consecutive
entries read nearby input.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Compact:
    w: torch.Tensor  # [O, J] float32
    chan: torch.Tensor  # [O / group, J] int32
    tap: torch.Tensor  # [O / group, J] int32 (zeros for linear layers)
    group: int = 1  # consecutive output rows that read the same entries

    @property
    def density(self) -> float:
        return float((self.w != 0).sum()) / max(self.w.shape[0], 1)


def shared_rows(keep: torch.Tensor, choices=(16, 8, 4, 2)) -> int:
    """The largest group of consecutive rows that keep the same columns (1 when none do)."""
    o = keep.shape[0]
    flat = keep.reshape(o, -1)
    for g in choices:
        if o % g == 0 and bool((flat.reshape(o // g, g, -1) == flat[::g].unsqueeze(1)).all()):
            return g
    return 1


def compact(w: torch.Tensor, mask: torch.Tensor | None = None, group: int | None = None) -> Compact:
    """``w`` ``[O, C, kh, kw]`` or ``[O, K]`` (pruned entries zero, or `mask` given) -> Compact.

    Rows that keep the same entries in groups of `group` (None: found) share their indices, which
    lets the sparse kernel reuse each input load across those rows (as a dense matmul does).
    """
    o = w.shape[0]
    taps = int(torch.tensor(w.shape[2:]).prod()) if w.dim() == 4 else 1
    flat = w.reshape(o, -1)
    keep = (flat != 0) if mask is None else mask.reshape(o, -1).bool()
    group = shared_rows(keep) if group is None else group
    j = max(int(keep.sum(1).max()), 1)
    # Stable sort puts kept columns first, in column order (channel-major, then tap).
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :j]
    valid = keep.gather(1, order)
    wc = torch.where(valid, flat.gather(1, order), torch.zeros((), dtype=w.dtype))
    cols = torch.where(valid, order, torch.zeros((), dtype=order.dtype))
    cols = cols[::group]
    return Compact(wc.contiguous().float(), (cols // taps).int().contiguous(),
                   (cols % taps).int().contiguous(), group)


def expand(c: Compact, shape: tuple) -> torch.Tensor:
    """The dense weight of shape ``shape`` that a Compact stands for."""
    o = shape[0]
    taps = int(torch.tensor(shape[2:]).prod()) if len(shape) == 4 else 1
    cols = (c.chan.long() * taps + c.tap.long()).repeat_interleave(c.group, 0)
    k = int(torch.tensor(shape[1:]).prod())
    dense = torch.zeros(o, k, dtype=c.w.dtype)
    dense.scatter_add_(1, cols, c.w)
    return dense.reshape(shape)


def detect(w: torch.Tensor, min_sparsity: float = 0.3) -> str | None:
    """The structure of an already-pruned weight, or None when it is (nearly) dense.

    Names: ``"pattern"`` (3x3, every kernel <= 4 nonzeros incl. the centre), ``"nm:N:M"``
    (N:M for M in 4, 8), ``"block_punched"`` (rows in blocks of 8 share their zero columns),
    ``"unstructured"`` (zeros with no structure; still compiled compactly).
    """
    o = w.shape[0]
    nz = (w != 0)
    if 1.0 - float(nz.float().mean()) < min_sparsity:
        return None
    if w.dim() == 4 and tuple(w.shape[2:]) == (3, 3):
        k = nz.reshape(o, -1, 9)
        used = k.any(2)
        if bool((k.sum(2) <= 4).all()) and bool((k[..., 4] | ~used).all()):
            return "pattern"
    flat = nz.reshape(o, -1)
    for n, m in ((2, 4), (1, 4), (4, 8), (2, 8)):
        if flat.shape[1] % m == 0 and bool((flat.reshape(o, -1, m).sum(2) <= n).all()):
            return f"nm:{n}:{m}"
    if o % 8 == 0 and bool((flat.reshape(o // 8, 8, -1).any(1) ==
                            flat.reshape(o // 8, 8, -1).all(1)).all()):
        return "block_punched"
    return "unstructured"
