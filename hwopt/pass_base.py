"""Pass API: `Pass`, `PassResult`, `PassContext` and the pass registry.

Every rewrite in hwopt (built-in in ``hwopt.passes`` or a user's own) is a `Pass`: it is called as
``pass_(gm, ctx) -> PassResult``, declares whether it is lossless (or its tolerance), and may check
what it needs (`requires`) and what it guarantees (`ensures`). Ordering constraints are data
(`after`, `before`), resolved by `hwopt.pass_manager`.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from .errors import OptionError, PassError, did_you_mean


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) graph module, whether it changed, and notes."""

    graph_module: torch.fx.GraphModule
    modified: bool
    notes: list[str] = field(default_factory=list)


@dataclass
class PassContext:
    """What a pass may read: target, its cost model, calibration data, tolerance, options."""

    target: Any  # hwopt.target.Target
    example_inputs: tuple = ()
    calibration: list | None = None
    tolerance: float | None = None
    options: dict = field(default_factory=dict)
    log: list[dict] = field(default_factory=list)

    @property
    def cost_model(self):
        return self.target.cost_model

    def require_calibration(self, pass_name: str) -> list:
        """Calibration batches, or a clear error naming the option."""
        if not self.calibration:
            raise OptionError(
                f"pass {pass_name!r} needs calibration data: pass options={{'calibration': "
                f"[example_inputs, ...]}} to torch.compile, or calibration=... to hwopt.compile")
        return self.calibration


def relative_error(got, want) -> float:
    """The error measure lossy passes are bounded by: max over outputs of ||got - want|| / ||want||.

    A relative RMS error `e` is an SQNR of -20*log10(e) dB (0.1 = 20 dB, 0.01 = 40 dB). Shape or
    dtype changes, integer differences and new non-finite values count as infinite error.
    """
    got, want = _flat(got), _flat(want)
    if len(got) != len(want):
        return float("inf")
    worst = 0.0
    for a, b in zip(got, want):
        if a.shape != b.shape or a.dtype != b.dtype:
            return float("inf")
        if not b.is_floating_point():
            if not torch.equal(a, b):
                return float("inf")
            continue
        finite = torch.isfinite(b)
        if not torch.equal(finite, torch.isfinite(a)):
            return float("inf")
        a, b = a[finite].double(), b[finite].double()
        if b.numel() == 0:
            continue
        worst = max(worst, float((a - b).norm() / b.norm().clamp_min(1e-30)))
    return worst


def _flat(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flat(v)]
    return []


class Pass:
    """Base class. Subclasses set `name`, `lossless` (or `tolerance`) and implement `call`."""

    name: str = ""
    lossless: bool = True
    tolerance: float | None = None  # lossy passes: bound on `relative_error` of the outputs
    after: tuple[str, ...] = ()  # run after these passes when they are in the pipeline
    before: tuple[str, ...] = ()  # run before these passes when they are in the pipeline

    def requires(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        """Raise `PassError` when the graph is not in the form this pass needs."""

    def ensures(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        """Raise `PassError` when the result breaks what this pass guarantees."""

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError(f"pass {self.name!r} does not implement call()")

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        self.requires(gm, ctx)
        result = self.call(gm, ctx)
        if not isinstance(result, PassResult):
            raise PassError(f"pass {self.name!r} returned {type(result).__name__}, not PassResult")
        self.ensures(result.graph_module, ctx)
        return result

    def __repr__(self) -> str:
        kind = "lossless" if self.lossless else f"lossy(tol={self.tolerance})"
        return f"<Pass {self.name} {kind}>"


class FunctionPass(Pass):
    """A pass made from a plain function ``fn(gm, ctx) -> PassResult``."""

    def __init__(self, fn: Callable, name: str, lossless: bool, tolerance: float | None,
                 after: Iterable[str], before: Iterable[str]):
        self.fn, self.name, self.lossless, self.tolerance = fn, name, lossless, tolerance
        self.after, self.before = tuple(after), tuple(before)
        self.__doc__ = fn.__doc__

    def call(self, gm, ctx):
        return self.fn(gm, ctx)


_REGISTRY: dict[str, Callable[[], Pass]] = {}


def register_pass(name: str, *, lossless: bool = True, tolerance: float | None = None,
                  after: Iterable[str] = (), before: Iterable[str] = ()):
    """Register a pass under `name`. Decorates a `Pass` subclass or a function ``(gm, ctx)``.

    >>> @register_pass("my_rewrite", lossless=True)
    ... def my_rewrite(gm, ctx): return PassResult(gm, False)
    """
    if not lossless and tolerance is None:
        raise OptionError(f"lossy pass {name!r} must declare tolerance=<relative error bound>")

    def deco(obj):
        if inspect.isclass(obj) and issubclass(obj, Pass):
            obj.name = name
            obj.lossless, obj.tolerance = lossless, tolerance
            obj.after, obj.before = tuple(after) or obj.after, tuple(before) or obj.before
            factory = obj
        elif callable(obj):
            def factory(fn=obj):
                return FunctionPass(fn, name, lossless, tolerance, after, before)
        else:
            raise TypeError(f"register_pass expects a Pass subclass or a function, got {obj!r}")
        _REGISTRY[name] = factory
        try:  # so that a decorated function can be handed around and still resolve to its pass
            obj.hwopt_pass_name = name
        except (AttributeError, TypeError):
            pass
        return obj

    return deco


def registered_passes() -> list[str]:
    _load_builtin_passes()
    return sorted(_REGISTRY)


def get_pass(spec: str | Pass, config: dict | None = None) -> Pass:
    """A pass object from a name or a `Pass`; an unknown name lists the registered ones."""
    if isinstance(spec, Pass):
        return spec
    if not isinstance(spec, str):
        raise OptionError(f"a pass is a name or a hwopt.Pass, got {type(spec).__name__}")
    _load_builtin_passes()
    if spec not in _REGISTRY:
        raise OptionError(f"unknown pass {spec!r}.{did_you_mean(spec, list(_REGISTRY))} "
                          f"Registered passes: {', '.join(sorted(_REGISTRY))}")
    factory = _REGISTRY[spec]
    if config and inspect.isclass(factory):
        return factory(**config)
    return factory()


def _load_builtin_passes() -> None:
    import hwopt.passes  # noqa: F401  (registers the built-in passes)


def config_dict(obj: Any) -> dict:
    """A pass's frozen config dataclass as a dict (for cache keys and reports)."""
    cfg = getattr(obj, "config", None)
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {}
