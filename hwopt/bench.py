"""Measuring helpers shared by the demo, ``benchmarks/`` and ``hwopt bench``.

Things compared are measured in the same process, interleaved (A B C A B C ...), after warm-up;
medians are reported with ratios, and outputs are checked so a fast wrong answer cannot win.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch


def pin_threads(n: int = 2) -> None:
    os.environ.setdefault("TVM_NUM_THREADS", str(n))
    torch.set_num_threads(n)


def first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return first_tensor(next(iter(out.values())))
    if hasattr(out, "to_tuple"):
        return first_tensor(out.to_tuple())
    return first_tensor(out[0])


def rel_error(got, want) -> float:
    g, w = first_tensor(got).detach().float(), first_tensor(want).detach().float()
    return float((g - w).abs().max() / w.abs().max().clamp_min(1e-12))


class Timings(dict):
    """Median seconds per call of each function (a dict), with the per-round block medians.

    This machine's speed drifts by up to 2x over seconds (shared host); `ratio` pairs the
    functions round by round, so a slow phase slows both sides of a ratio alike.
    """

    def __init__(self, rounds: dict[str, list[float]]):
        super().__init__({k: statistics.median(v) for k, v in rounds.items()})
        self.rounds = rounds

    def ratio(self, a: str, b: str) -> float:
        """Median over rounds of (time of `a` / time of `b`) measured in the same round."""
        return statistics.median(x / y for x, y in zip(self.rounds[a], self.rounds[b]))


def interleaved(fns: dict[str, Callable[[], object]], rounds: int = 12, warmup: int = 3,
                budget_s: float = 30.0, block: int = 5, settle_s: float = 0.015) -> Timings:
    """Seconds per call of each function, measured round-robin in blocks (A×5 B×5 ...).

    Each block starts with untimed calls, for at least `settle_s` (one call at least): switching
    runtimes has a cost that a model running on its own does not pay. PyTorch's OpenMP workers
    spin for milliseconds after a PyTorch call and take a core from the TVM thread pool that
    runs next (measured here: a 0.8 ms TVM BERT timed at 1.65 ms right after eager calls with
    one untimed call per block, 0.8 ms with 15 ms), and the reverse. ``block=1`` gives strict
    per-call alternation (then a round's figure is its one call).
    """
    with torch.no_grad():
        for _ in range(warmup):
            for f in fns.values():
                f()
        per_round = {k: [] for k in fns}
        t_start = time.perf_counter()
        for _ in range(rounds):
            for k, f in fns.items():
                if block > 1:
                    t_settle = time.perf_counter()
                    f()
                    while time.perf_counter() - t_settle < settle_s:
                        f()
                times = []
                for _ in range(max(block - 1, 1)):
                    t = time.perf_counter()
                    f()
                    times.append(time.perf_counter() - t)
                per_round[k].append(statistics.median(times))
            if time.perf_counter() - t_start > budget_s and len(per_round[k]) >= 5:
                break
    return Timings(per_round)


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def environment() -> str:
    import tvm

    from hwopt import __version__
    from hwopt.targets.cpu import host_lanes, host_mcpu

    return (f"hwopt {__version__}, torch {torch.__version__}, tvm {tvm.__version__}, "
            f"python {platform.python_version()}, cpu {host_mcpu()} ({host_lanes()} fp32 lanes), "
            f"threads {torch.get_num_threads()}")


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain Markdown table a person can paste into a note."""
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(out)
