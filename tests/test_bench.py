import pytest

from hwopt.bench import Timings, interleaved


def test_ratio_pairs_rounds():
    # The machine slows 2x in the second round: both sides slow alike, the ratio stays 0.5.
    t = Timings({"a": [1.0, 2.0, 1.0], "b": [2.0, 4.0, 2.0]})
    assert t["a"] == 1.0 and t["b"] == 2.0
    assert t.ratio("a", "b") == pytest.approx(0.5)


def test_interleaved_keeps_rounds():
    calls = {"x": 0}

    def f():
        calls["x"] += 1

    t = interleaved({"f": f, "g": lambda: None}, rounds=3, warmup=1, block=3, settle_s=0)
    assert len(t.rounds["f"]) == 3 and calls["x"] == 1 + 3 * 3
    assert t.ratio("f", "f") == 1.0


def test_interleaved_settles_before_timing_a_block():
    import time

    starts = []

    def f():
        starts.append(time.perf_counter())
        time.sleep(0.002)

    interleaved({"f": f}, rounds=2, warmup=0, block=2, settle_s=0.01)
    # per round: untimed calls for >= 10 ms (about 5 of 2 ms), then one timed call
    assert len(starts) >= 2 * (1 + 4)
