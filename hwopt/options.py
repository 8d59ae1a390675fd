"""Compile options: the `options` dict of ``torch.compile(..., backend="hwopt")`` and the keyword
arguments of ``hwopt.compile``. Validated up front; a bad key or value lists the valid ones."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import OptionError, did_you_mean

TUNE_MODES = ("none", "measure", "metaschedule")
FALLBACK_MODES = ("auto", "tvm", "torch")


def default_cache_dir() -> Path:
    env = os.environ.get("HWOPT_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hwopt"


@dataclass
class Options:
    """All compile options with their defaults.

    target:       "cpu" (default) or another registered target name, or a hwopt.Target.
    passes:       pass names or Pass objects; None = the target's default (lossless) pipeline.
    calibration:  iterable of example-input tuples for lossy passes.
    report:       path of an HTML report to write, or None.
    strict:       raise on any lowering failure instead of falling back to PyTorch.
    cache_dir:    on-disk compile cache; None = $HWOPT_CACHE_DIR or ~/.cache/hwopt. False = off.
    tune:         "none" (schedule rules, no search), "measure" (time a few tile candidates per
                  kernel, remembered in the tuning database), "metaschedule" (as "measure", then
                  TVM's MetaSchedule search per float kernel, `tune_trials` trials each; per
                  kernel the faster of the two is kept; an offline budget: minutes per model).
    tune_trials:  MetaSchedule trials per kernel (tune="metaschedule"); 64 by default.
    executor:     "auto" (per region, the faster of TVM and PyTorch, measured once and cached),
                  "tvm" (always TVM), "torch" (passes only, run in PyTorch).
    progress:     show progress bars on long steps.
    tolerance:    bound on the relative RMS error (||got - want|| / ||want||, i.e. an SQNR floor
                  of -20*log10(tolerance) dB) that every lossy pass must meet on the example
                  and calibration inputs; None = each pass's own declared bound.
    devices:      a TVM RPC tracker "host:port/key" (or a hwopt.rpc.DeviceFarm): with
                  tune="measure", tile candidates are timed on those devices (the way to tune
                  for a target that does not run here, e.g. arm64 boards).
    dynamic_shapes: hwopt.compile only: which input sizes vary, as torch.export's
                  ``dynamic_shapes`` (one entry per input, ``{axis: Dim("seq", min=16,
                  max=128)}``), or the shorthand ``{axis: (16, 128)}`` (equal ranges share one
                  size). One static variant is compiled per shape bucket (hwopt.dynamic.shapes);
                  under torch.compile use ``dynamic=True`` / ``torch._dynamo.mark_dynamic``.
    max_buckets:  at most this many compiled variants per dynamic graph (shape buckets, or
                  exact shapes where padding is unsafe); beyond that, PyTorch with a warning.
    """

    target: Any = "cpu"
    passes: Any = None
    calibration: Any = None
    report: Any = None
    strict: bool = False
    cache_dir: Any = None
    tune: str = "none"
    tune_trials: int = 64
    executor: str = "auto"
    progress: bool = True
    tolerance: float | None = None
    devices: Any = None
    dynamic_shapes: Any = None
    max_buckets: int = 4
    pass_config: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, options: dict | None) -> "Options":
        options = dict(options or {})
        valid = [f.name for f in fields(cls)]
        for key in options:
            if key not in valid:
                raise OptionError(f"unknown hwopt option {key!r}.{did_you_mean(key, valid)} "
                                  f"Valid options: {', '.join(valid)}")
        opts = cls(**options)
        opts.validate()
        return opts

    def validate(self) -> None:
        from .target import get_target

        self.target = get_target(self.target)
        _choice("tune", self.tune, TUNE_MODES)
        _choice("executor", self.executor, FALLBACK_MODES)
        if self.passes is not None:
            if isinstance(self.passes, (str, bytes)) or not hasattr(self.passes, "__iter__"):
                raise OptionError(f"option 'passes' must be a list of pass names or Pass objects, "
                                  f"got {self.passes!r} (e.g. passes=['fuse'])")
            from .pass_base import get_pass

            self.passes = [get_pass(p, self.pass_config.get(p) if isinstance(p, str) else None)
                           for p in self.passes]
        if self.calibration is not None:
            self.calibration = [b if isinstance(b, (tuple, list)) else (b,)
                                for b in self.calibration]
        if not isinstance(self.strict, bool):
            raise OptionError(f"option 'strict' must be True or False, got {self.strict!r}")
        if self.devices is not None:
            from .rpc import DeviceFarm, DeviceFarmError

            try:
                self.devices = DeviceFarm.parse(self.devices)
            except DeviceFarmError as e:
                raise OptionError(f"option 'devices': {e}") from e
        if isinstance(self.tune_trials, bool) or not (
                isinstance(self.tune_trials, int) and self.tune_trials >= 1):
            raise OptionError(f"option 'tune_trials' must be a positive integer, got "
                              f"{self.tune_trials!r}")
        if isinstance(self.max_buckets, bool) or not (
                isinstance(self.max_buckets, int) and self.max_buckets >= 1):
            raise OptionError(f"option 'max_buckets' must be a positive integer, got "
                              f"{self.max_buckets!r}")
        if self.dynamic_shapes is not None:
            from .dynamic.shapes import normalize_dynamic_shapes

            normalize_dynamic_shapes(self.dynamic_shapes)  # raises on a malformed spec
        if self.tolerance is not None and not (
                isinstance(self.tolerance, (int, float)) and self.tolerance > 0):
            raise OptionError(f"option 'tolerance' must be a positive number, got "
                              f"{self.tolerance!r}")

    def cache_path(self) -> Path | None:
        if self.cache_dir is False:
            return None
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()

    def fingerprint(self) -> dict:
        """The options that change generated code (part of the compile-cache key)."""
        from .pass_base import config_dict

        return {"target": self.target.name, "tvm_target": self.target.tvm_target(),
                "passes": [(p.name, config_dict(p)) for p in (self.passes or [])],
                "tune": self.tune,
                "tune_trials": self.tune_trials if self.tune == "metaschedule" else None,
                "executor": self.executor, "tolerance": self.tolerance,
                "devices": (self.devices.key if self.devices and self.tune != "none" else None),
                "calibration": _calibration_digest(self.calibration)}


def _calibration_digest(batches) -> str | None:
    """Lossy passes depend on the calibration data: its values are part of the cache key."""
    if not batches:
        return None
    import hashlib

    import torch

    from .cache import tensor_digest

    h = hashlib.sha256()
    for batch in batches:
        for x in batch:
            h.update((tensor_digest(x) if isinstance(x, torch.Tensor) else repr(x)).encode())
    return h.hexdigest()


def _choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise OptionError(f"option {name!r} must be one of {', '.join(map(repr, valid))}, got "
                          f"{value!r}.{did_you_mean(str(value), valid)}")
