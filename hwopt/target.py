"""Targets: what hardware a model is compiled for.

Each module in ``hwopt.targets`` exports ``TARGET`` (a `Target`): its spec, cost model, TVM target
(dict form) and the schedule rules used when lowering. Adding a target touches no other module:
the registry discovers the modules of that package.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import OptionError, did_you_mean


@dataclass(frozen=True)
class TargetSpec:
    peak_flops: dict  # dtype -> FLOP/s (or OP/s for integer types)
    mem_bw: float  # bytes/s from main memory
    on_chip_bytes: int  # last-level cache / on-chip buffer
    vector_lanes: int  # fp32 lanes of one vector register
    cores: int
    dtypes: tuple[str, ...] = ("float32",)
    sparsity_formats: tuple[str, ...] = ()


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
    extra: dict = field(default_factory=dict)

    def tvm(self):
        import tvm

        return tvm.target.Target(self.tvm_target())

    def __repr__(self) -> str:
        return f"<Target {self.name}: {self.description}>"


def _discover() -> dict[str, Target]:
    import hwopt.targets as pkg

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
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
