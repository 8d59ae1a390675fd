"""The compile pipeline, one straight function of named phases:

    capture (hwopt.capture) -> analyse (shapes, costs) -> rewrite (passes) -> lower (TVM) -> run

Used by the torch.compile backend (hwopt.backend) and the ahead-of-time path (hwopt.aot).
`get_pipeline(target)` tells which passes a target runs by default.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from hwopt.cache import CompileCache
from hwopt.capture import Captured
from hwopt.errors import OptionError, did_you_mean
from hwopt.graph import propagate_meta
from hwopt.host_threads import mixes_torch_and_tvm, single_torch_thread
from hwopt.lowering import lower
from hwopt.lowering.region import RegionInfo
from hwopt.options import Options
from hwopt.pass_base import PassContext, get_pass
from hwopt.pass_manager import PassManager, PassRecord
from hwopt.tuning_db import TuningDB

log = logging.getLogger("hwopt")
PHASES = ("capture", "analyse", "rewrite", "lower", "run")


def get_pipeline(target: str = "cpu") -> dict:
    """The phases and default passes of a target's pipeline; unknown names list the valid ones."""
    from hwopt.target import list_targets

    targets = list_targets()
    if target not in targets:
        raise OptionError(f"no pipeline named {target!r}.{did_you_mean(target, list(targets))} "
                          f"Valid pipelines: {', '.join(sorted(targets))}")
    return {"phases": PHASES, "passes": list(targets[target].default_passes)}


@dataclass
class Compiled:
    """A compiled graph: flat tensors in, flat tuple out."""

    module: torch.nn.Module
    graph: fx.GraphModule  # the rewritten graph (before lowering), for reports and export
    pass_records: list[PassRecord]
    regions: list[RegionInfo]
    predicted: object  # Cost of the rewritten graph on the target
    seconds: dict = field(default_factory=dict)  # per phase
    options: Options | None = None
    decision: str = ""  # the whole-graph executor decision (backend, executor="auto")

    def __call__(self, *inputs):
        mixed = self.__dict__.get("_mixed")
        if mixed is None:
            mixed = self.__dict__["_mixed"] = mixes_torch_and_tvm(self.module)
        if mixed:
            with torch.no_grad(), single_torch_thread():
                out = self.module(*inputs)
        else:  # one TVM region alone: no thread switch (its context costs ~1 us a call)
            with torch.no_grad():
                out = self.module(*inputs)
        return out if isinstance(out, tuple) else (out,)


def compile_captured(cap: Captured, opts: Options) -> Compiled:
    seconds = {}
    t = time.perf_counter()
    gm, inputs = cap.gm, tuple(cap.example_inputs)
    # Control flow and data-dependent shapes cannot be propagated on static fake tensors: the
    # split pass runs first when the graph has them (passes/split.py).
    from hwopt.passes.split import split_dynamic

    split_notes = split_dynamic(gm, opts)
    propagate_meta(gm, inputs)
    seconds["analyse"] = time.perf_counter() - t

    t = time.perf_counter()
    names = opts.passes if opts.passes is not None else opts.target.default_passes
    passes = [get_pass(p, opts.pass_config.get(p)) if isinstance(p, str) else p for p in names]
    ctx = PassContext(target=opts.target, example_inputs=inputs, calibration=opts.calibration,
                      tolerance=opts.tolerance, options={"progress": opts.progress})
    manager = PassManager(passes)
    if split_notes:
        manager.records.append(PassRecord("split", 0.0, True, notes=tuple(split_notes)))
    gm = manager(gm, ctx).graph_module
    propagate_meta(gm, inputs)
    predicted = opts.target.cost_model.graph_cost(gm)
    seconds["rewrite"] = time.perf_counter() - t

    t = time.perf_counter()
    root = opts.cache_path()
    cache = CompileCache(root)
    db = TuningDB(root / "tuning.json" if root else None)
    module, regions = lower(gm, inputs, opts, cache, db)
    seconds["lower"] = time.perf_counter() - t
    log.info("hwopt: compiled %d region(s) in %.2fs", len(regions), sum(seconds.values()))
    return Compiled(module, gm, manager.records, regions, predicted, seconds, opts)
