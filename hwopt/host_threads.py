"""One PyTorch thread while hwopt's host code runs between TVM calls: part of the *run* step.

The runtime containers that alternate small PyTorch ops with TVM regions (the early-exit
cascade's scores and batch compaction, a routing island's gathers and scatters) make PyTorch's
OpenMP workers wake up for each op and then spin, waiting for more work, on the cores TVM's
thread pool needs for the next kernel. On 2 cores that made a 6-stage BERT cascade 8x slower
than the same stages called back to back (10 ms vs 1.3 ms per sample). Those host ops are tiny,
so they run on the calling thread only while such a container runs; the thread count is
restored after. Containers whose compute runs in PyTorch keep PyTorch's threads.
"""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def single_torch_thread(active: bool = True):
    n = torch.get_num_threads()
    if not active or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def runs_in_tvm(module: torch.nn.Module) -> bool:
    """Whether lowering has put compiled TVM regions into `module` (before it, or when every
    region chose PyTorch, there are none and PyTorch keeps its threads)."""
    from hwopt.lowering.region import TVMRegion

    return any(isinstance(m, TVMRegion) for m in module.modules())
