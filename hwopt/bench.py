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


def interleaved(fns: dict[str, Callable[[], object]], rounds: int = 12, warmup: int = 3,
                budget_s: float = 30.0, block: int = 5) -> dict[str, float]:
    """Median seconds per call of each function, measured round-robin in blocks (A×5 B×5 ...).

    Each block's first call is not counted: it pays for switching runtimes (PyTorch's OpenMP
    workers spin after a PyTorch call and slow a TVM call that follows, and the reverse), which a
    model running on its own does not pay. ``block=1`` gives strict per-call alternation.
    """
    with torch.no_grad():
        for _ in range(warmup):
            for f in fns.values():
                f()
        times = {k: [] for k in fns}
        t_start = time.perf_counter()
        for _ in range(rounds):
            for k, f in fns.items():
                if block > 1:
                    f()
                for _ in range(max(block - 1, 1)):
                    t = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t)
            if time.perf_counter() - t_start > budget_s and len(times[k]) >= 5:
                break
    return {k: statistics.median(v) for k, v in times.items()}


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
