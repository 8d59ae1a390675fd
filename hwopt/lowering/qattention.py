"""The int8 attention op ``hwopt::qattention`` and its Relax converters (lower step).

The ``quantize`` pass (passes/quantize_attention.py) replaces a fused ``hwopt::attention`` whose
q, k and v are int8 layer outputs (``moves(DQ(x_q))``) by ``hwopt::qattention`` on the int8
values themselves, so both attention matmuls run as integer dot products:

- scores: ``S = ((q - q_zp) . (k - k_zp)) * (s_q * s_k * scale) + mask``, exact int32 sums;
- probabilities: ``E = exp(S - rowmax(S))`` lies in (0, 1] with a 1 in every row, so it is
  stored as uint8 ``e = round(255 * E)`` (a fixed scale: the largest weight of each row is 255,
  weights below 1/510 of it become 0); the row sum ``r = sum(e)`` (>= 255) normalizes after
  the second matmul, so the output is the e-weighted mean of the values;
- output: ``(e . (v - v_zp)) * s_v / r``, exact int32 sums.

The only loss beyond the int8 inputs is the rounding of E to 8 bits; the pass measures the SQNR
it costs on the calibration data. `reference` is that computation in PyTorch (the op's eager
implementation); the TVM kernels equal it up to float rounding of the exponentials.

Converters (``converters(int8_dot)``), on the attention's own rank ``[B, H, S, D]``, keys padded
to a multiple of ``PAD`` as in ``hwopt.lowering.attention``:

- ``"i16"``: int16 operands (``x - zp``), the ``vpmaddwd`` kernels of ``hwopt.schedules.int8``;
- ``"vnni"``: uint8 x int8 operands for ``vpdpbusd``: ``q + 128`` against raw int8 k (the zero
  points come out through row and column sums: ``sum((q'-z'_q)(k-z_k)) = sum(q'k) - z_k sum(q')
  - z'_q sum(k) + D z'_q z_k``), and e (uint8) against raw int8 v (``- z_v r``). The head
  dimension is padded with zeros to a multiple of 4 (vpdpbusd multiplies groups of four).
"""
from __future__ import annotations

import torch

from hwopt.lowering.attention import _pad_keys
from hwopt.lowering.qdq import _Emitter

E_LEVELS = 255.0  # exp(S - max) in (0, 1] -> uint8 0..255


def reference(q, k, v, mask, scale: float, q_scale: float, q_zp: int, k_scale: float, k_zp: int,
              v_scale: float, v_zp: int) -> torch.Tensor:
    """The integer attention in PyTorch (int8 q, k, v ``[..., S, D]``; fp32 mask and output)."""
    qi, ki, vi = (t.double() - z for t, z in ((q, q_zp), (k, k_zp), (v, v_zp)))
    acc = torch.matmul(qi, ki.transpose(-2, -1)).float()  # exact integer sums
    s = acc * float(q_scale * k_scale * scale)
    if mask is not None:
        s = s + mask
    e = torch.round(torch.exp(s - s.amax(-1, keepdim=True)) * E_LEVELS)
    r = e.sum(-1, keepdim=True)
    out = torch.matmul(e.double(), vi).float()
    return out * float(v_scale) / r


@torch.library.custom_op("hwopt::qattention", mutates_args=())
def qattention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               scale: float, q_scale: float, q_zp: int, k_scale: float, k_zp: int,
               v_scale: float, v_zp: int) -> torch.Tensor:
    """int8 attention; see the module docstring and `reference`."""
    return reference(q, k, v, mask, scale, q_scale, q_zp, k_scale, k_zp, v_scale, v_zp)


@qattention.register_fake
def _(q, k, v, mask, scale, q_scale, q_zp, k_scale, k_zp, v_scale, v_zp):
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=torch.float32)


def _args(node, imp):
    q, k, v, mask, scale, qs, qz, ks, kz, vs, vz = imp.retrieve_args(node)
    rank = len(node.args[0].meta["val"].shape)
    sk = int(node.args[1].meta["val"].shape[-2])
    mask_shape = node.args[3].meta["val"].shape if mask is not None else None
    k, v, mask = _pad_keys(imp, k, v, mask, mask_shape, rank, sk)
    return q, k, v, mask, rank, (scale, qs, int(qz), ks, int(kz), vs, int(vz))


def _probabilities(e: _Emitter, acc, mask, factor: float):
    """int32 scores -> (uint8 e = round(255 exp(S - max)), int32 row sums)."""
    s = e("multiply", e("astype", acc, "float32"), e.const(factor, "float32"))
    if mask is not None:
        s = e("add", s, mask)
    ex = e("exp", e("subtract", s, e("max", s, axis=[-1], keepdims=True)))
    eu = e("astype", e("round", e("multiply", ex, e.const(E_LEVELS, "float32"))), "uint8")
    return eu, e("sum", e("astype", eu, "int32"), axis=[-1], keepdims=True)


def _output(e: _Emitter, acc, rows, v_scale: float):
    y = e("multiply", e("astype", acc, "float32"), e.const(float(v_scale), "float32"))
    return e("divide", y, e("astype", rows, "float32"))


def _perm(rank: int) -> list[int]:
    return list(range(rank - 2)) + [rank - 1, rank - 2]


def _qattention_i16(node, imp):
    e = _Emitter(imp)
    q, k, v, mask, rank, (scale, qs, qz, ks, kz, vs, vz) = _args(node, imp)

    def widen(x, zp):
        x16 = e("astype", x, "int16")
        return e("subtract", x16, e.const(zp, "int16")) if zp else x16

    kt = e("permute_dims", widen(k, kz), _perm(rank))
    acc = e("matmul", widen(q, qz), kt, out_dtype="int32")
    eu, rows = _probabilities(e, acc, mask, float(qs * ks * scale))
    out = e("matmul", e("astype", eu, "int16"), widen(v, vz), out_dtype="int32")
    return _output(e, out, rows, vs)


def _qattention_u8(node, imp):
    e = _Emitter(imp)
    q, k, v, mask, rank, (scale, qs, qz, ks, kz, vs, vz) = _args(node, imp)
    d = int(node.args[0].meta["val"].shape[-1])
    qu = e("astype", e("add", e("astype", q, "int16"), e.const(128, "int16")), "uint8")
    if d % 4:  # zeros add nothing to the products nor to the sums below
        widths = [0] * (2 * rank)
        widths[-1] = -d % 4
        qu, k = e("nn.pad", qu, widths), e("nn.pad", k, widths)
    zq = qz + 128
    acc = e("matmul", qu, e("permute_dims", k, _perm(rank)), out_dtype="int32")
    if kz:
        qsum = e("sum", e("astype", qu, "int32"), axis=[-1], keepdims=True)  # [.., S, 1]
        acc = e("subtract", acc, e("multiply", qsum, e.const(kz, "int32")))
    ksum = e("sum", e("astype", k, "int32"), axis=[-1], keepdims=True)  # [.., Sk, 1]
    ksum = e("permute_dims", e("multiply", ksum, e.const(zq, "int32")), _perm(rank))
    acc = e("subtract", acc, ksum)
    if kz:
        acc = e("add", acc, e.const(d * zq * kz, "int32"))
    eu, rows = _probabilities(e, acc, mask, float(qs * ks * scale))
    out = e("matmul", eu, v, out_dtype="int32")
    if vz:
        out = e("subtract", out, e("multiply", rows, e.const(vz, "int32")))
    return _output(e, out, rows, vs)


CONVERTERS = {"qattention.default": _qattention_i16}


def converters(int8_dot: str = "i16") -> dict:
    return {"qattention.default": _qattention_u8 if int8_dot == "vnni" else _qattention_i16}
