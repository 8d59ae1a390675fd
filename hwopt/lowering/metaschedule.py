"""``tune="metaschedule"``: which kernels of a region take MetaSchedule's schedule instead of
hwopt's rule. Part of the *lower* step's scheduling (hwopt.lowering.region._schedule), after the
rules (and their measured tile choice) have run: each eligible kernel is timed as hwopt scheduled
it, tuned by MetaSchedule (hwopt.schedules.metaschedule), timed again with the same harness, and
the faster one is kept. The decision is stored in the tuning database, MetaSchedule's records in
its own database under the cache dir, so a second compile neither tunes nor times again.
"""
from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

from hwopt.tuning_db import TuningDB

log = logging.getLogger("hwopt")

# Kernels MetaSchedule may beat hwopt's rules on: float conv/dense/reductions and kernels no rule
# schedules (elementwise kernels are at memory speed already; int8 and sparse kernels use
# intrinsics and layouts MetaSchedule's default space does not know). Below MS_MIN_SECONDS a
# kernel is not worth trials.
MS_RULES = ("conv2d_nhwc", "dense", "reduction", "none")
MS_MIN_SECONDS = 20e-6
MS_MARGIN = 0.95  # MetaSchedule's kernel must be at least 5 % faster to replace hwopt's


def metaschedule_override(orig, scheduled, choices, target, opts, db, tvm_target, lanes) -> dict:
    """{kernel name: MetaSchedule's PrimFunc} for the kernels where it beat hwopt's schedule,
    both measured here with the same harness; decisions are kept in the tuning database."""
    if not target.runs_here() or not hasattr(target.lowering, "measure"):
        warnings.warn(f"hwopt: tune='metaschedule' measures on this machine; target "
                      f"{target.name!r} does not run here, so only hwopt's rules are used",
                      stacklevel=3)
        return {}
    from tvm import tirx
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    from hwopt.schedules import metaschedule as msched

    names = {gv.name_hint for gv, f in orig.functions.items() if isinstance(f, tirx.PrimFunc)}
    final = {gv.name_hint: f for gv, f in scheduled.functions.items()
             if isinstance(f, tirx.PrimFunc)}
    todo, known, prefer, tstr = {}, {}, {}, str(tvm_target)
    for name, choice in choices.items():
        base = name.removesuffix("_prepacked")
        if choice.rule not in MS_RULES or base not in names or name not in final:
            continue
        func = orig[base]
        if any(str(a.dtype) != "float32" for a in ArgInfo.from_prim_func(func)):
            continue
        key = "metaschedule:" + TuningDB.key(func, tstr, lanes)
        rec = db.records.get(key)
        if rec is not None:
            known[base] = rec
            continue
        try:
            hw = target.lowering.measure(final[name], tvm_target)
        except Exception as e:  # noqa: BLE001 - a kernel that does not time is left as it is
            log.debug("hwopt: could not time %s: %s", name, e)
            continue
        if hw >= MS_MIN_SECONDS:
            todo[base] = (func, hw, key)
            prefer[base] = name
    work = (opts.cache_path() or Path(tempfile.gettempdir()) / "hwopt") / "metaschedule"
    found = msched.tune({n: f for n, (f, _, _) in todo.items()}, tvm_target, opts.tune_trials,
                        work, progress=opts.progress) if todo else {}
    found.update(msched.tune({n: orig[n] for n, r in known.items()
                              if r["rule"] == "metaschedule"}, tvm_target, opts.tune_trials,
                             work, progress=False) if known else {})
    override = {}
    for name, (_, hw, key) in todo.items():
        ms_sec = None
        if name in found:
            try:  # timed in turns with hwopt's kernel: the machine's speed drifts
                hw, ms_sec = _paired(target.lowering.measure, final[prefer[name]],
                                     found[name][0], tvm_target)
            except Exception as e:  # noqa: BLE001
                log.debug("hwopt: MetaSchedule's %s did not run: %s", name, e)
        wins = ms_sec is not None and ms_sec < MS_MARGIN * hw
        db.put(key, "metaschedule" if wins else "hwopt",
               {"hwopt_us": round(hw * 1e6, 2),
                "metaschedule_us": round(ms_sec * 1e6, 2) if ms_sec else None}, min(
                   hw, ms_sec or hw))
        log.info("hwopt: %s: hwopt %.1f us, MetaSchedule %s -> %s", name, hw * 1e6,
                 f"{ms_sec * 1e6:.1f} us" if ms_sec else "no valid schedule",
                 "MetaSchedule" if wins else "hwopt")
        if wins:
            override[name] = found[name][0]
    for name, rec in known.items():
        if rec["rule"] == "metaschedule" and name in found:
            override[name] = found[name][0]
    return override


def _paired(measure, a, b, tvm_target, rounds: int = 3) -> tuple[float, float]:
    """Best seconds of kernels `a` and `b`, timed in alternation."""
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(measure(a, tvm_target))
        tb.append(measure(b, tvm_target))
    return min(ta), min(tb)
