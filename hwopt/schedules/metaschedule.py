"""Opt-in MetaSchedule search (``tune="metaschedule"``): part of the *lower* step's scheduling.

hwopt's own rules (``hwopt.schedules``) give good code with no search; MetaSchedule is an
offline budget on top: every float kernel is tuned as one task of one ``tune_tir`` call
(`trials` each), the best record is measured again with the same harness as hwopt's candidates
(``measure_func``), and hwopt.lowering.region keeps whichever of the two is faster, kernel by
kernel. Records live in a MetaSchedule JSON database in the cache dir, so a kernel tuned once is
never tuned again (a later compile reads its best schedule back with no trials).

Two things make MetaSchedule usable here (measured on this 2-core machine):
- ``import tvm.s_tir.tensor_intrin`` parses every GPU intrinsic in TVMScript (45-110 s), and
  every builder worker does it again; only the host CPU's intrinsics are registered instead
  (``_cpu_intrinsics_only``), which looked like a hang before;
- the builder uses ``tvm.driver.build`` (a runtime module that exports), not ``tvm.compile``.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import platform
import sys
import types
from pathlib import Path

log = logging.getLogger("hwopt")


def _cpu_intrinsics_only() -> None:
    """Register ``tvm.s_tir.tensor_intrin`` as an empty package holding only the host CPU's
    intrinsics (x86 VNNI/AVX-512 dot or arm dot, about 1 s), so MetaSchedule's own imports of it
    (TuneContext, the default builder) cost nothing."""
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    import tvm.s_tir

    spec = importlib.util.find_spec(name)
    pkg = types.ModuleType(name)
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__, pkg.__file__, pkg.__package__ = spec, spec.origin, name
    sys.modules[name] = pkg
    tvm.s_tir.tensor_intrin = pkg
    arm = platform.machine() in ("aarch64", "arm64")
    importlib.import_module(name + (".arm_cpu" if arm else ".x86"))


def _build(mod, target, _params):  # runs in the builder's worker processes
    from hwopt.schedules.metaschedule import _cpu_intrinsics_only

    _cpu_intrinsics_only()
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _task(func):
    """A kernel as MetaSchedule keys it: ``IRModule({"main": func})``."""
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    return _normalize_mod(_anonymous(func))


def _anonymous(func):
    """Without its name: a kernel tuned in one model is found again in another."""
    return func.without_attr("global_symbol") if func.attrs and "global_symbol" in func.attrs \
        else func


def best(database, func, target):
    """(scheduled PrimFunc, seconds MetaSchedule measured) of the best record, or None."""
    mod = _task(func)
    if not database.has_workload(mod):
        return None
    recs = database.get_top_k(database.commit_workload(mod), 1)
    sch = database.query_schedule(mod, target, workload_name="main")
    if not recs or sch is None or not recs[0].run_secs:
        return None
    secs = [float(s) for s in recs[0].run_secs]
    tuned = sch.mod["main"]
    name = func.attrs.get("global_symbol") if func.attrs else None
    tuned = tuned.with_attr("global_symbol", name) if name else tuned.without_attr(
        "global_symbol")
    return tuned, sum(secs) / len(secs)


def database(work_dir: Path):
    from tvm.s_tir import meta_schedule as ms

    Path(work_dir).mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(work_dir))


@contextlib.contextmanager
def _quiet_logs():
    """MetaSchedule logs every round's table at INFO; hwopt shows a progress bar instead."""
    names = ["tvm.s_tir.meta_schedule", "tvm.meta_schedule"]
    old = [logging.getLogger(n).level for n in names]
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for n, lvl in zip(names, old):
            logging.getLogger(n).setLevel(lvl)


def _progress_callback(bar):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results):
            bar.update(len(runner_results))

    return Progress()


def tune(funcs: dict, target, trials: int, work_dir: Path, progress: bool = True) -> dict:
    """MetaSchedule over `funcs` (name -> unscheduled PrimFunc), `trials` per kernel; kernels
    the database already holds are not tuned again. Returns name -> (scheduled func, seconds)."""
    from tvm.s_tir import meta_schedule as ms

    _cpu_intrinsics_only()
    db = database(work_dir)
    out = {n: best(db, f, target) for n, f in funcs.items()}
    todo = {n: f for n, f in funcs.items() if out[n] is None}
    if todo:
        import tvm
        from tqdm.auto import tqdm

        cores = int(target.attrs.get("num-cores", os.cpu_count() or 1))
        mod = tvm.IRModule({tvm.ir.GlobalVar(n): _anonymous(f) for n, f in todo.items()})
        builder = ms.builder.LocalBuilder(max_workers=cores, timeout_sec=60, f_build=_build)
        runner = ms.runner.LocalRunner(timeout_sec=30, evaluator_config=ms.runner.EvaluatorConfig(
            number=3, repeat=1, min_repeat_ms=50, enable_cpu_cache_flush=False))
        try:
            import xgboost  # noqa: F401

            cost_model = "xgb"
        except ImportError:  # the XGBoost model needs xgboost; evolutionary search still runs
            cost_model = "random"
        bar = tqdm(total=trials * len(todo), desc="hwopt metaschedule", unit="trial",
                   disable=not progress)
        callbacks = list(ms.measure_callback.MeasureCallback.create("default"))
        try:
            with _quiet_logs():
                ms.tune_tir(mod, target, str(work_dir), max_trials_global=trials * len(todo),
                            max_trials_per_task=trials, num_trials_per_iter=min(64, trials),
                            builder=builder, runner=runner, database=db, cost_model=cost_model,
                            measure_callbacks=callbacks + [_progress_callback(bar)],
                            num_tuning_cores=cores, seed=0)
        finally:
            bar.close()
    for n, f in todo.items():
        out[n] = best(db, f, target)
    return {n: v for n, v in out.items() if v is not None}
