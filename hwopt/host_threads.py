"""One PyTorch thread while hwopt's host code runs between TVM calls: part of the *run* step.

The runtime containers that alternate small PyTorch ops with TVM regions (the early-exit
cascade's scores and batch compaction, a routing island's gathers and scatters) make PyTorch's
OpenMP workers wake up for each op and then spin, waiting for more work, on the cores TVM's
thread pool needs for the next kernel. On 2 cores that made a 6-stage BERT cascade 8x slower
than the same stages called back to back (10 ms vs 1.3 ms per sample). Those host ops are tiny,
so they run on the calling thread only while such a container runs; the thread count is
restored after. Containers whose compute runs in PyTorch keep PyTorch's threads.

The same holds for a whole compiled graph that mixes PyTorch parts (regions PyTorch measured
faster on their own, ops without a lowering, host dispatchers) with TVM regions: a mixture-of-
experts graph whose gate ran in PyTorch on 2 threads before each expert's TVM kernel took 9-10 ms
per call instead of 1.4 ms. `hwopt.compiler.Compiled` and the saved host plan run such graphs
with one PyTorch thread; a graph that is one TVM region, or all PyTorch, is left alone.
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


def mixes_torch_and_tvm(module: torch.nn.Module) -> bool:
    """Whether `module` runs TVM regions and PyTorch code around them (not one region alone)."""
    from hwopt.lowering.region import TVMRegion

    return not isinstance(module, TVMRegion) and runs_in_tvm(module)
