"""The cost model a target uses on the machine where its code runs: analytical, then refined by
whatever was measured on this machine.

A `MachineCostModel` wraps a target's `RooflineModel` (``hwopt.cost``). When the compile-cache
directory (``HWOPT_CACHE_DIR`` or ``Options().cache_path()``) holds a calibration for this machine
(``hwopt.cost_calibrate``: measured per-op-class efficiencies and overheads) it uses those
parameters; when it also holds a learned refinement (``hwopt.cost_learned``), latency is that
model's prediction. Files are keyed per machine: CPU model (LLVM ``llvm_get_system_cpu``),
threads, hwopt and TVM versions. An unreadable file is ignored with a warning (analytical
fallback). Files are re-checked on every use, so a calibration written later takes effect.
"""
from __future__ import annotations

import functools
import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger("hwopt")
FORMAT = 1


@functools.lru_cache(maxsize=None)
def _versions() -> tuple:
    from hwopt import __version__
    from hwopt.cache import tvm_version

    return __version__, tvm_version()


def machine_key(cores: int | None = None) -> str:
    """e.g. ``znver3-2t-hwopt0.1.0-tvm0.27.0`` (TVM threads: the work is measured with them)."""
    from hwopt.targets.cpu import host_cores, host_mcpu

    hw, tv = _versions()
    raw = f"{host_mcpu()}-{cores or host_cores()}t-hwopt{hw}-tvm{tv}"
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", raw)


def store_dir(cache_dir: Path | str | None = None) -> Path:
    """Where per-machine cost files live: ``<compile cache>/cost``."""
    if cache_dir is None:
        from hwopt.options import Options

        cache_dir = Options().cache_path() or Path(".")
    return Path(cache_dir) / "cost"


def cost_file(kind: str, target: str = "cpu", cache_dir=None, key: str | None = None) -> Path:
    """Path of the `kind` ("calibration" or "learned") file of `target` on this machine."""
    return store_dir(cache_dir) / f"{target}-{key or machine_key()}.{kind}.json"


def read_json(path: Path, kind: str) -> dict | None:
    """The JSON object in `path`, or None (missing; or unreadable: warns, analytical fallback)."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("kind") != kind:
            raise ValueError(f"not a hwopt {kind} file (format {FORMAT})")
        return data
    except Exception as e:  # noqa: BLE001 - any broken file means: do not use it
        warnings.warn(f"hwopt: ignoring unreadable cost {kind} {path} ({type(e).__name__}: {e});"
                      f" using the analytical cost model. Re-run hwopt.cost_calibrate.calibrate"
                      f" to rebuild it.", stacklevel=3)
        return None


def write_json(path: Path, data: dict) -> Path:
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".cost-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path


class MachineCostModel:
    """A target's roofline, calibrated and refined by the files measured on this machine
    (in `cache_dir`, default: the compile cache's)."""

    def __init__(self, base, target: str = "cpu", cache_dir=None):
        self.base, self.target, self.cache_dir = base, target, cache_dir
        self._state: tuple = (None, None, None)  # (stamp, calibrated roofline, learned model)

    # -- which model is in force ----------------------------------------------------------------
    def _stamp(self) -> tuple:
        try:
            paths = tuple(cost_file(kind, self.target, self.cache_dir)
                          for kind in ("calibration", "learned"))
        except Exception:  # noqa: BLE001 - no TVM / no key: analytical only
            return ()
        return tuple((str(p), p.stat().st_mtime_ns if p.exists() else 0) for p in paths)

    def _load(self) -> tuple:
        stamp = self._stamp()
        if stamp == self._state[0]:
            return self._state[1], self._state[2]
        roof, learned = self.base, None
        if stamp:
            from hwopt.cost_calibrate import apply_calibration
            from hwopt.cost_learned import LearnedModel

            calib = read_json(Path(stamp[0][0]), "calibration")
            if calib is not None:
                roof = apply_calibration(self.base, calib)
            data = read_json(Path(stamp[1][0]), "learned")
            if data is not None:
                try:
                    learned = LearnedModel.from_json(data)
                except Exception as e:  # noqa: BLE001
                    warnings.warn(f"hwopt: ignoring unusable learned cost model ({e})",
                                  stacklevel=3)
        self._state = (stamp, roof, learned)
        return roof, learned

    def reload(self) -> None:
        self._state = (None, None, None)

    def roofline(self):
        """The RooflineModel in force (calibrated parameters when measured here)."""
        return self._load()[0]

    @property
    def learned(self):
        return self._load()[1]

    @property
    def source(self) -> str:
        roof, learned = self._load()
        name = "calibrated" if roof is not self.base else "analytical"
        return name + ("+learned" if learned is not None else "")

    # -- costs ------------------------------------------------------------------------------------
    def kernels_cost(self, kernels, call: bool = True):
        roof, learned = self._load()
        cost = roof.kernels_cost(kernels, call=call)
        if learned is None or not kernels or cost.is_symbolic:
            return cost
        from dataclasses import replace

        return replace(cost, latency_s=learned.refine(roof, kernels, cost))

    def node_cost(self, node):
        from hwopt.cost_fusion import single

        return self.kernels_cost(single(node), call=False)

    def graph_cost(self, gm):
        from hwopt.cost_fusion import graph_kernels

        return self.kernels_cost(graph_kernels(gm))

    def subgraph_cost(self, nodes):
        from hwopt.cost_fusion import group

        nodes = list(nodes)
        order = {n: i for i, n in enumerate(nodes[0].graph.nodes)} if nodes else {}
        return self.kernels_cost(group(sorted(nodes, key=order.__getitem__)))

    def __getattr__(self, name: str) -> Any:  # peak_flops, efficiency, cost_of, ... of the roofline
        if name.startswith("_") or name in ("base", "target", "cache_dir"):
            raise AttributeError(name)
        return getattr(self.roofline(), name)

    def __repr__(self) -> str:
        return f"<MachineCostModel {self.target} ({self.source})>"
