"""Refit the kept weights of a pruned layer by least squares on calibration activations.

For a layer ``y = X w`` (X: calibration inputs as rows; conv inputs unfolded to im2col rows) and a
mask, each output row's kept weights ``S`` solve ``min ||X_S w_S - X w||^2``, i.e.
``H_SS w_S = (H w)_S`` with the Gram matrix ``H = X^T X`` (energy-aware pruning's closed-form
local fine-tune; OBS). Small layers are solved exactly, row by row; large ones with SparseGPT's
column-sequential OBS update (one Cholesky factor of ``H^-1`` shared by all rows).
"""
from __future__ import annotations

import torch

EXACT_FLOPS = 4e9  # above this many flops the per-row exact solve gives way to SparseGPT
_DAMP = 0.01  # ridge term, relative to the mean diagonal of H (keeps H_SS invertible)


def gram(x: torch.Tensor) -> torch.Tensor:
    """``X^T X`` in float64 for rows ``x`` ``[n, K]``."""
    x = x.double()
    return x.t() @ x


def _damped(h: torch.Tensor) -> torch.Tensor:
    d = torch.diagonal(h).mean().clamp_min(1e-12) * _DAMP
    return h + d * torch.eye(h.shape[0], dtype=h.dtype)


def reconstruct(w: torch.Tensor, mask: torch.Tensor, h: torch.Tensor,
                cross: torch.Tensor | None = None) -> torch.Tensor:
    """Weights ``[O, ...]`` with pruned entries zero and kept entries refitted; same shape.

    ``h = X'^T X'`` of the inputs the pruned layer will see; ``cross = X'^T X`` with the inputs
    of the dense model (None: the same inputs), so the fit also undoes the error of the layers
    pruned before this one: ``min ||X'_S v_S - X w||``.
    """
    o = w.shape[0]
    w2, m2 = w.reshape(o, -1).double(), mask.reshape(o, -1)
    hd = _damped(h.double())
    if cross is not None:  # the dense refit for the new inputs; then prune around it
        w2 = torch.linalg.solve(hd, cross.double() @ w2.t()).t()
    j = int(m2.sum(1).max())
    if o * j ** 3 / 3 <= EXACT_FLOPS:
        out = _exact(w2, m2, hd)
    else:
        out = _sparsegpt(w2, m2, hd)
    return (out * m2).to(w.dtype).reshape(w.shape)


def _exact(w: torch.Tensor, mask: torch.Tensor, h: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Per-row exact least squares, rows with the same kept count solved as one batch."""
    out = torch.zeros_like(w)
    target = w @ h  # row o: (H w_o)^T
    counts = mask.sum(1)
    for cnt in counts.unique().tolist():
        if cnt == 0:
            continue
        rows = (counts == cnt).nonzero().flatten()
        for r0 in range(0, len(rows), chunk):
            r = rows[r0:r0 + chunk]
            idx = mask[r].nonzero()[:, 1].reshape(len(r), cnt)  # kept columns per row
            hss = h[idx.unsqueeze(2), idx.unsqueeze(1)]  # [R, cnt, cnt]
            rhs = target[r].gather(1, idx).unsqueeze(2)
            chol, info = torch.linalg.cholesky_ex(hss)  # H_SS is SPD (damped Gram)
            if bool(info.any()):
                sol = torch.linalg.lstsq(hss, rhs).solution.squeeze(2)
            else:
                sol = torch.cholesky_solve(rhs, chol).squeeze(2)
            out[r] = out[r].scatter(1, idx, sol)
    return out


def _sparsegpt(w: torch.Tensor, mask: torch.Tensor, h: torch.Tensor,
               block: int = 128) -> torch.Tensor:
    """SparseGPT's OBS update with a fixed mask: prune column by column, spread each error over
    the columns not yet visited (through the upper Cholesky factor of ``H^-1``)."""
    w = w.clone()
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    k = w.shape[1]
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2]), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            err = (col - col * mask[:, i1 + i]) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w
