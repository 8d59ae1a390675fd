"""Targets: what hardware a model is compiled for.

Each module in ``hwopt.targets`` exports ``TARGET`` (a `Target`): its spec, cost model, TVM target
(dict form) and the schedule rules used when lowering. Adding a target touches no other module:
the registry discovers the modules of that package.
"""
from __future__ import annotations

import importlib
import pkgutil
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import OptionError, did_you_mean


@dataclass(frozen=True)
class TargetSpec:
    """What the hardware can do; the cost model and the passes read it (never hard-coded numbers).

    `mem_levels` lists the memory hierarchy from the innermost level out, each as
    ``(name, bytes, bandwidth bytes/s, energy J per byte accessed)``; the last one is off-chip.
    `energy_per_mac` is J per multiply-accumulate per dtype (Eyeriss-style energy model).
    """

    peak_flops: dict  # dtype -> FLOP/s (or OP/s for integer types)
    mem_bw: float  # bytes/s from main memory
    on_chip_bytes: int  # last-level cache / on-chip buffer
    vector_lanes: int  # fp32 lanes of one vector register
    cores: int
    dtypes: tuple[str, ...] = ("float32",)
    sparsity_formats: tuple[str, ...] = ()
    mem_levels: tuple[tuple[str, int, float, float], ...] = ()
    energy_per_mac: dict = field(default_factory=dict)  # dtype -> J per MAC
    clock_hz: float = 0.0

    def describe(self) -> dict:
        """A JSON-friendly summary (``hwopt targets``, manifests, reports)."""
        return {
            "peak": {k: f"{v / 1e9:.0f} G{'OP' if k.startswith('int') else 'FLOP'}/s"
                     for k, v in self.peak_flops.items()},
            "dram_bw": f"{self.mem_bw / 1e9:.1f} GB/s",
            "on_chip": f"{self.on_chip_bytes / 2**20:.2f} MiB",
            "cores": self.cores, "vector_lanes_fp32": self.vector_lanes,
            "dtypes": list(self.dtypes), "sparsity": list(self.sparsity_formats),
            "memory": [f"{n} {b / 2**10:.0f} KiB {bw / 1e9:.0f} GB/s {e * 1e12:.1f} pJ/B"
                       for n, b, bw, e in self.mem_levels],
        }


@dataclass
class Target:
    name: str
    description: str
    spec: TargetSpec
    cost_model: Any  # has node_cost(node) -> Cost, graph_cost(gm) -> Cost
    tvm_target: Callable[[], dict]  # the TVM target dict, resolved lazily (may probe the host)
    runs_here: Callable[[], bool]
    default_passes: tuple[str, ...] = ("fuse",)
    schedule_lanes: int = 16
    # prepare/schedule/build/export/load for this target (hwopt.lowering.llvm.LLVMLowering is
    # the CPU one); None means LLVM with `schedule_lanes`.
    lowering: Any = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.lowering is None:
            from .lowering.llvm import LLVMLowering

            self.lowering = LLVMLowering(self.schedule_lanes)

    def cost(self, node_or_graph) -> Any:
        """`Cost` of one FX node or of a whole GraphModule on this target."""
        import torch.fx as fx

        if isinstance(node_or_graph, fx.GraphModule):
            return self.cost_model.graph_cost(node_or_graph)
        return self.cost_model.node_cost(node_or_graph)

    def tvm(self):
        import tvm

        return tvm.target.Target(self.tvm_target())

    def __repr__(self) -> str:
        return f"<Target {self.name}: {self.description}>"


def _discover() -> dict[str, Target]:
    import hwopt.targets as pkg

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        try:
            mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        except Exception as e:  # one broken target module must not take the others down
            warnings.warn(f"hwopt: target module hwopt.targets.{info.name} failed to import "
                          f"({type(e).__name__}: {e}); its target is unavailable", stacklevel=2)
            continue
        t = getattr(mod, "TARGET", None)
        if isinstance(t, Target):
            found[t.name] = t
    return found


_TARGETS: dict[str, Target] | None = None


def list_targets() -> dict[str, Target]:
    global _TARGETS
    if _TARGETS is None:
        _TARGETS = _discover()
    return dict(_TARGETS)


def get_target(spec: "str | Target") -> Target:
    """A `Target` from its name; an unknown name lists the valid ones."""
    if isinstance(spec, Target):
        return spec
    targets = list_targets()
    if not isinstance(spec, str) or spec not in targets:
        raise OptionError(f"unknown target {spec!r}.{did_you_mean(str(spec), list(targets))} "
                          f"Valid targets: {', '.join(sorted(targets))}")
    return targets[spec]
