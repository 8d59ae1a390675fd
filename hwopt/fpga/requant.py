"""Fixed-point requantization: the int32 accumulator of an int8 layer back to int8.

Used by `hwopt.fpga.layers` (to turn the float scales of a Q/DQ graph into integers), by the
bit-exact simulator (`hwopt.fpga.sim`) and, as the same expression, by the generated C kernels
(`hwopt.fpga.codegen`). gemmlowp / TFLite style: the real multiplier ``s_in * s_w / s_out`` becomes
an int32 ``mult`` in [2^30, 2^31) and a right shift ``shift`` (31 + the binary exponent), so that

    y = clamp(zp_out + ((acc * mult + 2^(shift-1)) >> shift), lo, hi)

computed in int64 with an arithmetic shift. Rounding rule: round half up (towards +inf), with a
single rounding (TFLite rounds twice, in the doubling high multiply and in the shift). PyTorch's
fake quantization rounds half to even, so the two differ by at most 1 LSB, only on exact ties.
"""
from __future__ import annotations

import math

import torch

MAX_SHIFT = 62  # acc (< 2^31) * mult (< 2^31) + 2^61 stays below 2^63


def quantize_multiplier(real: float) -> tuple[int, int]:
    """(mult, shift) with real ~= mult * 2^-shift, mult in [2^30, 2^31), 1 <= shift <= 62.

    Multipliers too small for a 62-bit shift lose low bits of `mult` (the output is then
    ``zp_out`` for every accumulator that fits int32, as in float); multipliers >= 2^30 cannot be
    represented and raise.
    """
    if not math.isfinite(real) or real <= 0:
        raise ValueError(f"requantization multiplier must be a positive finite number, got {real}")
    mant, exp = math.frexp(real)  # real = mant * 2^exp, mant in [0.5, 1)
    mult = round(mant * (1 << 31))
    if mult == 1 << 31:
        mult //= 2
        exp += 1
    shift = 31 - exp
    if shift < 1:
        raise ValueError(f"requantization multiplier {real} is too large for a 31-bit shift")
    if shift > MAX_SHIFT:
        mult >>= shift - MAX_SHIFT
        shift = MAX_SHIFT
    return mult, shift


def requantize(acc: torch.Tensor, mult: torch.Tensor, shift: torch.Tensor, zp_out: int,
               lo: int, hi: int) -> torch.Tensor:
    """int8 outputs from int64 accumulators (bias and zero-point correction already added).

    `mult` and `shift` broadcast against `acc` (per output channel). The exact integer expression
    of the generated kernels.
    """
    acc = acc.to(torch.int64)
    shift = shift.to(torch.int64)
    prod = acc * mult.to(torch.int64) + (torch.ones_like(shift) << (shift - 1))
    y = (prod >> shift) + zp_out
    return y.clamp(lo, hi).to(torch.int8)


def quantize_value(value: float, scale: float, zero_point: int, qmin: int, qmax: int) -> int:
    """The int8 code PyTorch's quantize_per_tensor gives `value` (the bound of a fused clamp)."""
    from torch.ao.quantization.fx import _decomposed  # noqa: F401  registers the ops

    q = torch.ops.quantized_decomposed.quantize_per_tensor.default(
        torch.tensor([float(value)]), scale, zero_point, qmin, qmax, torch.int8)
    return int(q[0])
