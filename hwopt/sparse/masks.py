"""Masks per pruning scheme, from an importance score per weight (larger = keep).

Weights are conv ``[O, C, kh, kw]`` or linear ``[O, K]`` (out-features first). Every scheme keeps
the same number of entries in every output row, so a layer packs into one compact ``[O, J]``
matrix (`hwopt.sparse.layout`) and the sparse kernel has no ragged rows. Importance is usually
``w**2 * diag(X^T X)`` (Wanda / OBS diagonal): the squared output change removing the weight causes
on the calibration data, ignoring correlations (which `hwopt.sparse.reconstruct` then repairs).
"""
from __future__ import annotations

import itertools

import torch

SCHEMES = ("pattern", "block_punched", "nm", "block")
CENTRE = 4  # index of the centre tap of a 3x3 kernel (row-major)


def candidate_patterns(kept: int = 4) -> torch.Tensor:
    """All 3x3 patterns keeping the centre plus ``kept - 1`` other taps: bool ``[P, 9]``."""
    others = [t for t in range(9) if t != CENTRE]
    pats = []
    for combo in itertools.combinations(others, kept - 1):
        p = torch.zeros(9, dtype=torch.bool)
        p[list(combo) + [CENTRE]] = True
        pats.append(p)
    return torch.stack(pats)


def pattern_library(imp: torch.Tensor, k: int = 8, kept: int = 4) -> torch.Tensor:
    """The ``k`` patterns kernels prefer most (PatDNN): bool ``[k, 9]``.

    Each kernel votes for the candidate that keeps the most of its importance; the most voted win.
    """
    cands = candidate_patterns(kept).float()  # [P, 9]
    flat = imp.reshape(-1, 9).float()
    votes = torch.bincount((flat @ cands.t()).argmax(1), minlength=cands.shape[0])
    return cands[votes.argsort(descending=True)[:k]].bool()


def pattern_mask(imp: torch.Tensor, keep_kernels: float, library: torch.Tensor,
                 share: int = 1) -> torch.Tensor:
    """Kernel patterns + connectivity pruning for a 3x3 conv.

    Each kernel takes the library pattern that keeps most of its importance; then each filter
    keeps its ``round(keep_kernels * C)`` kernels with the most kept importance (whole kernels,
    i.e. input->output connections, removed). ``share > 1``: blocks of that many consecutive
    filters choose together (by their summed importance), so every filter of a block keeps the
    same input channels with the same pattern: the kernel then vectorizes over the block's
    filters and reuses each input value for all of them (filter-kernel reorder made static).
    """
    o, c = imp.shape[:2]
    if share > 1 and o % share == 0:
        shared = imp.reshape(o // share, share, *imp.shape[1:]).sum(1)
        block = pattern_mask(shared, keep_kernels, library)
        return block.repeat_interleave(share, 0)
    flat = imp.reshape(o, c, 9).float()
    score = flat @ library.float().t()  # [O, C, k]
    best = score.argmax(2)
    mask = library[best]  # [O, C, 9]
    n_keep = max(1, round(keep_kernels * c))
    if n_keep < c:
        kept = score.gather(2, best.unsqueeze(2)).squeeze(2)  # [O, C]
        top = kept.topk(n_keep, dim=1).indices
        conn = torch.zeros(o, c, dtype=torch.bool).scatter_(1, top, True)
        mask = mask & conn.unsqueeze(2)
    return mask.reshape(imp.shape)


def nm_mask(imp: torch.Tensor, n: int, m: int, rows: int = 1) -> torch.Tensor:
    """N:M: in every group of ``m`` consecutive inputs of a row, the ``n`` most important kept.

    ``rows > 1``: blocks of that many consecutive rows share one N:M choice (by their summed
    importance); still N:M in every row, and the sparse kernel then reuses input loads.
    """
    o = imp.shape[0]
    flat = imp.reshape(o, -1).float()
    k = flat.shape[1]
    if k % m:
        raise ValueError(f"N:M needs the input size ({k}) divisible by M={m}")
    if rows > 1 and o % rows == 0:
        shared = flat.reshape(o // rows, rows, k).sum(1)
        return nm_mask(shared, n, m).repeat_interleave(rows, 0).reshape(imp.shape)
    groups = flat.reshape(o, k // m, m)
    top = groups.topk(n, dim=2).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, top, True)
    return mask.reshape(imp.shape)


def block_punched_mask(imp: torch.Tensor, density: float, block_rows: int = 8,
                       block_cols: int = 16) -> torch.Tensor:
    """Block-punched: in each block of ``block_rows`` filters x ``block_cols`` weight columns
    (a column is one ``(c, kh, kw)`` entry, or one input of a linear layer), the same columns are
    pruned for every filter of the block; every block keeps the same number of columns."""
    o = imp.shape[0]
    flat = imp.reshape(o, -1).float()
    k = flat.shape[1]
    mask = torch.zeros(o, k, dtype=torch.bool)
    for r0 in range(0, o, block_rows):
        rows = flat[r0:r0 + block_rows].sum(0)  # column importance over the block's filters
        for c0 in range(0, k, block_cols):
            cols = rows[c0:c0 + block_cols]
            keep = max(1, round(density * cols.numel()))
            idx = cols.topk(keep).indices + c0
            mask[r0:r0 + block_rows, idx] = True
    return mask.reshape(imp.shape)


def block_mask(imp: torch.Tensor, density: float, block_rows: int = 16,
               block_cols: int = 16) -> torch.Tensor:
    """Block-structured: whole ``block_rows x block_cols`` blocks pruned; every block row keeps
    the same number of blocks (the most important by summed importance)."""
    o = imp.shape[0]
    flat = imp.reshape(o, -1).float()
    k = flat.shape[1]
    mask = torch.zeros(o, k, dtype=torch.bool)
    n_cb = -(-k // block_cols)
    keep = max(1, round(density * n_cb))
    for r0 in range(0, o, block_rows):
        rows = flat[r0:r0 + block_rows].sum(0)
        sums = torch.stack([rows[c * block_cols:(c + 1) * block_cols].sum() for c in range(n_cb)])
        for cb in sums.topk(keep).indices.tolist():
            mask[r0:r0 + block_rows, cb * block_cols:(cb + 1) * block_cols] = True
    return mask.reshape(imp.shape)


def applies(scheme: str, kind: str, shape: tuple, nm: tuple[int, int] = (2, 4)) -> str | None:
    """None when ``scheme`` can prune a layer of this kind and weight shape, else why not."""
    if scheme == "pattern":
        if kind != "conv" or tuple(shape[2:]) != (3, 3):
            return "kernel patterns apply to 3x3 convolutions only"
    elif scheme == "nm":
        k = int(torch.tensor(shape[1:]).prod())
        if kind != "linear":
            return "N:M applies to linear layers (use block_punched for convolutions)"
        if k % nm[1]:
            return f"input size {k} is not a multiple of M={nm[1]}"
    elif scheme == "block" and kind != "linear":
        return "block-structured sparsity applies to linear layers (use block_punched)"
    return None
