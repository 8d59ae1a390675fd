"""Quantization numerics: observers, quantization parameters, (de)quantize helpers, SQNR, fp8.

Used by the ``quantize`` pass (passes/quantize.py) while it calibrates and decides per layer, and
by tests and benchmarks to measure accuracy. Everything here is plain PyTorch on real tensors; the
graph form that the pass emits (``torch.ops.quantized_decomposed``) is described in the
quantized-graph contract and computes exactly what `fake_quant_per_tensor` and
`fake_quant_weight` compute here.

- observers: `MinMaxObserver`, `PercentileObserver`, `MSEObserver` (``make_observer(name)``);
- `choose_qparams`: (scale, zero_point) of an int8 range, affine or symmetric;
- `quantize_weight_per_channel`: symmetric per-output-channel int8 weights;
- `sqnr`: signal-to-quantization-noise ratio in dB;
- `fp8_round_trip`: weights quantized to float8 (e4m3 / e5m2) with a per-channel scale and back.
"""
from __future__ import annotations

import math

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)

QMIN, QMAX = -128, 127  # int8 activations (per-tensor affine)
WMAX = 127  # int8 weights are symmetric in [-127, 127]
_SAMPLE = 1 << 18  # values an observer keeps to estimate percentiles / MSE
qd = torch.ops.quantized_decomposed

FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def sqnr(ref: torch.Tensor, test: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |ref - test|^2) in dB; inf when they are equal."""
    ref, test = ref.detach().double(), test.detach().double()
    noise = float((ref - test).pow(2).sum())
    signal = float(ref.pow(2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def choose_qparams(lo: float, hi: float, qmin: int = QMIN, qmax: int = QMAX,
                   symmetric: bool = False) -> tuple[float, int]:
    """(scale, zero_point) mapping [lo, hi] (widened to contain 0) onto [qmin, qmax]."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    eps = torch.finfo(torch.float32).eps
    if symmetric:
        amax = max(-lo, hi)
        scale = max(amax / ((qmax - qmin) / 2), eps)
        return scale, 0
    scale = max((hi - lo) / (qmax - qmin), eps)
    zero_point = int(min(max(qmin - round(lo / scale), qmin), qmax))
    return scale, zero_point


def fake_quant_per_tensor(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """quantize -> dequantize with the same ops the quantized graph uses (its exact values)."""
    q = qd.quantize_per_tensor.default(x, scale, zero_point, QMIN, QMAX, torch.int8)
    return qd.dequantize_per_tensor.default(q, scale, zero_point, QMIN, QMAX, torch.int8)


def quantize_weight_per_channel(w: torch.Tensor, axis: int = 0,
                                wmax: int = WMAX) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel int8: (w_q int8, scales fp32 [w.shape[axis]]), w ~ w_q * scale."""
    dims = [d for d in range(w.dim()) if d != axis]
    amax = w.detach().abs().amax(dim=dims) if dims else w.detach().abs()
    scales = (amax / wmax).clamp_min(torch.finfo(torch.float32).eps).float()
    shape = [1] * w.dim()
    shape[axis] = -1
    w_q = torch.clamp(torch.round(w.detach() / scales.view(shape)), -wmax, wmax).to(torch.int8)
    return w_q, scales


def dequantize_weight(w_q: torch.Tensor, scales: torch.Tensor, axis: int = 0) -> torch.Tensor:
    zeros = torch.zeros(scales.numel(), dtype=torch.int64)
    return qd.dequantize_per_channel.default(w_q, scales, zeros, axis, -WMAX, WMAX, torch.int8)


def fake_quant_weight(w: torch.Tensor, axis: int = 0) -> torch.Tensor:
    return dequantize_weight(*quantize_weight_per_channel(w, axis), axis=axis)


def fp8_round_trip(w: torch.Tensor, dtype: str, axis: int = 0) -> torch.Tensor:
    """Weights stored as float8 (`dtype` "fp8_e4m3" or "fp8_e5m2") with a per-channel fp32 scale
    that maps each channel's max onto the format's max, then read back as fp32."""
    if dtype not in FP8_DTYPES:
        raise ValueError(f"unknown fp8 format {dtype!r}; valid: {', '.join(FP8_DTYPES)}")
    f8 = FP8_DTYPES[dtype]
    dims = [d for d in range(w.dim()) if d != axis]
    amax = w.detach().abs().amax(dim=dims, keepdim=True) if dims else w.detach().abs()
    scale = (amax / torch.finfo(f8).max).clamp_min(torch.finfo(torch.float32).tiny)
    return (w.detach() / scale).to(f8).to(torch.float32) * scale


class Observer:
    """Collects activation statistics over calibration batches; `qparams()` picks the range."""

    def __init__(self):
        self.lo, self.hi = math.inf, -math.inf
        self.samples: list[torch.Tensor] = []
        self.seen = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten()
        if x.numel() == 0:
            return
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        self.seen += x.numel()
        if self.keeps_samples:
            step = max(1, x.numel() // _SAMPLE)
            self.samples.append(x[::step].clone())

    keeps_samples = False

    def data(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.zeros(1)

    def range(self) -> tuple[float, float]:
        return self.lo, self.hi

    def qparams(self, qmin: int = QMIN, qmax: int = QMAX) -> tuple[float, int]:
        if self.seen == 0:
            raise ValueError("observer saw no data: run calibration batches first")
        return choose_qparams(*self.range(), qmin, qmax)


class MinMaxObserver(Observer):
    """The range is the smallest and largest value seen."""


class PercentileObserver(Observer):
    """The range is the [100 - p, p] percentiles of the values seen (clips rare outliers)."""

    keeps_samples = True

    def __init__(self, percentile: float = 99.99):
        super().__init__()
        self.percentile = percentile

    def range(self) -> tuple[float, float]:
        d = self.data()
        q = torch.tensor([1 - self.percentile / 100, self.percentile / 100], dtype=torch.float64)
        lo, hi = torch.quantile(d.double(), q).tolist() if d.numel() <= 1 << 24 else (
            self.lo, self.hi)
        return max(lo, self.lo), min(hi, self.hi)


class MSEObserver(Observer):
    """The range (a shrunk min-max range) whose quantize-dequantize error is smallest."""

    keeps_samples = True
    steps = 40

    def range(self) -> tuple[float, float]:
        d = self.data()
        best, best_err = (self.lo, self.hi), math.inf
        for i in range(self.steps):
            f = 1.0 - i / (self.steps + 10)  # shrink factors 1.0 down to 0.2
            lo, hi = self.lo * f, self.hi * f
            scale, zp = choose_qparams(lo, hi)
            err = float((fake_quant_per_tensor(d, scale, zp) - d).pow(2).mean())
            if err < best_err:
                best, best_err = (lo, hi), err
        return best


OBSERVERS = {"minmax": MinMaxObserver, "percentile": PercentileObserver, "mse": MSEObserver}


def make_observer(name: str, percentile: float = 99.99) -> Observer:
    if name not in OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; valid: {', '.join(OBSERVERS)}")
    return PercentileObserver(percentile) if name == "percentile" else OBSERVERS[name]()
