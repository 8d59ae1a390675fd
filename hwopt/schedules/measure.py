"""Measure a scheduled PrimFunc on random inputs, and a ``pick`` that chooses candidates by timing.

Used by the optional per-layer search of ``schedule_module``: about 0.3-2 s per candidate.
"""
from __future__ import annotations

import logging

import numpy as np
import tvm
import tvm_ffi
from tvm import tirx

log = logging.getLogger("hwopt")


def _random_args(func: tirx.PrimFunc) -> list:
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    rng = np.random.default_rng(0)
    args = []
    for info in ArgInfo.from_prim_func(func):
        shape, dtype = [int(s) for s in info.shape], str(info.dtype)
        if dtype.startswith("float"):
            data = rng.standard_normal(shape).astype(dtype)
        else:  # indices and masks: zeros are always in range
            data = np.zeros(shape, dtype=dtype)
        args.append(tvm.runtime.tensor(data))
    return args


def measure_func(func: tirx.PrimFunc, target: tvm.target.Target, repeat: int = 5) -> float:
    """Median seconds of one call of the built PrimFunc on random inputs."""
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    lib = tvm.compile(mod, target=target)
    ev = lib.mod.time_evaluator("main", tvm.cpu(), number=1, repeat=repeat, min_repeat_ms=20)
    return float(np.median(ev(*_random_args(func)).results))


def measuring_pick(target: tvm.target.Target, lanes: int = 16, limit: int = 12, repeat: int = 5):
    """A ``pick`` for ``schedule_module`` that times up to ``limit`` candidates per func."""
    cache: dict = {}

    def pick(name: str, func: tirx.PrimFunc, rule, candidates: list[dict]) -> dict | None:
        if len(candidates) < 2:
            return None
        key = tvm_ffi.structural_hash(func)
        if key in cache:
            return cache[key]
        best, best_t = None, float("inf")
        for params in candidates[:limit]:
            try:
                t = measure_func(rule.apply(func, params, lanes), target, repeat)
            except Exception as err:  # noqa: BLE001 - a failing candidate is skipped
                log.debug("candidate %s %s failed: %s", name, params,
                          str(err).splitlines()[0][:200])
                continue
            if t < best_t:
                best, best_t = params, t
        log.debug("picked %s %s (%.1f us)", name, best, best_t * 1e6)
        cache[key] = best
        return best

    return pick
