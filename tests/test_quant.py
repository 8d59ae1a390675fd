"""Numerics of hwopt.quant: qparams, observers on hand-made data, SQNR, weights, fp8."""
import math

import pytest
import torch

from hwopt.quant import (
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    choose_qparams,
    fake_quant_per_tensor,
    fake_quant_weight,
    fp8_round_trip,
    make_observer,
    quantize_weight_per_channel,
    sqnr,
)


def test_choose_qparams_affine_maps_range_ends_and_zero():
    scale, zp = choose_qparams(-1.0, 3.0)
    assert scale == pytest.approx(4.0 / 255)
    assert -128 <= zp <= 127
    # 0.0 is exactly representable; the ends land on the ends of the int8 range.
    q = torch.round(torch.tensor([-1.0, 0.0, 3.0]) / scale) + zp
    assert q.tolist() == [-128.0, float(zp), 127.0]


def test_choose_qparams_widens_to_zero_and_symmetric():
    scale, zp = choose_qparams(2.0, 4.0)  # all positive: the range still starts at 0
    assert zp == -128 and scale == pytest.approx(4.0 / 255)
    scale, zp = choose_qparams(-2.0, 1.0, symmetric=True)
    assert zp == 0 and scale == pytest.approx(2.0 / 127.5)


def test_choose_qparams_constant_zero_tensor_has_positive_scale():
    scale, _ = choose_qparams(0.0, 0.0)
    assert scale > 0


def test_sqnr_values():
    x = torch.ones(100)
    assert sqnr(x, x) == math.inf
    assert sqnr(x, x * 1.1) == pytest.approx(20.0, abs=1e-4)  # noise 10% of signal -> 20 dB
    assert sqnr(x, x + 0.01) == pytest.approx(40.0, abs=1e-4)


def test_minmax_observer_sees_all_batches():
    obs = MinMaxObserver()
    obs.update(torch.tensor([0.0, 1.0]))
    obs.update(torch.tensor([-2.0, 0.5]))
    assert obs.range() == (-2.0, 1.0)
    assert obs.qparams() == choose_qparams(-2.0, 1.0)


def test_percentile_observer_ignores_rare_outliers():
    x = torch.linspace(-1, 1, 100_000)
    x[0], x[-1] = -1000.0, 1000.0  # two outliers
    pct = PercentileObserver(99.9)
    mm = MinMaxObserver()
    for o in (pct, mm):
        o.update(x)
    lo, hi = pct.range()
    assert -1.01 < lo < -0.9 and 0.9 < hi < 1.01
    assert mm.range() == (-1000.0, 1000.0)


def test_mse_observer_clips_a_heavy_tail_and_beats_minmax():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g)
    x[:20] *= 40  # heavy tail: min-max wastes most of the 256 levels on it
    mse, mm = MSEObserver(), MinMaxObserver()
    for o in (mse, mm):
        o.update(x)
    lo, hi = mse.range()
    assert hi < mm.range()[1] and lo > mm.range()[0]

    def err(obs):
        return float((fake_quant_per_tensor(x, *obs.qparams()) - x).pow(2).mean())

    assert err(mse) < err(mm)


def test_make_observer_names():
    assert isinstance(make_observer("mse"), MSEObserver)
    with pytest.raises(ValueError, match="minmax"):
        make_observer("nope")
    with pytest.raises(ValueError, match="no data"):
        MinMaxObserver().qparams()


def test_fake_quant_error_within_half_a_step():
    x = torch.linspace(-3, 5, 1001)
    scale, zp = choose_qparams(-3, 5)
    assert float((fake_quant_per_tensor(x, scale, zp) - x).abs().max()) <= scale / 2 + 1e-6


def test_weight_per_channel_symmetric():
    w = torch.randn(8, 4, 3, 3)
    w[3] *= 100  # a large channel does not cost the others precision
    w_q, scales = quantize_weight_per_channel(w)
    assert w_q.dtype == torch.int8 and scales.shape == (8,)
    assert int(w_q.abs().max()) == 127 and int(w_q.min()) >= -127
    err = (fake_quant_weight(w) - w).abs().amax(dim=(1, 2, 3))
    assert bool((err <= scales / 2 + 1e-6).all())
    assert sqnr(w[0], fake_quant_weight(w)[0]) > 35


@pytest.mark.parametrize("fmt,floor", [("fp8_e4m3", 25.0), ("fp8_e5m2", 20.0)])
def test_fp8_round_trip(fmt, floor):
    w = torch.randn(16, 32)
    r = fp8_round_trip(w, fmt)
    assert r.dtype == torch.float32 and not torch.equal(r, w)
    assert sqnr(w, r) > floor
    # e4m3 keeps more mantissa than e5m2
    if fmt == "fp8_e5m2":
        assert sqnr(w, fp8_round_trip(w, "fp8_e4m3")) > sqnr(w, r)
    with pytest.raises(ValueError, match="fp8_e4m3"):
        fp8_round_trip(w, "fp8_e3m4")
