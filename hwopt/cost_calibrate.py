"""Calibration: fit the roofline's per-op-class efficiencies and overheads to measurements of
hwopt's own generated code on this machine.

``calibrate(target, budget_s=...)`` builds small kernels through hwopt's lowering (random shapes
of conv, depthwise conv, matmul/linear, bmm, softmax, layernorm, reduction, element-wise; see
``hwopt.cost_dataset``), times them (``hwopt.cost_measure``), fits the parameters (`fit`) and
stores them as JSON per machine in the compile cache (``hwopt.cost_machine``), where the target's
cost model picks them up. With scikit-learn installed it also trains the learned refinement
(``hwopt.cost_learned``) on the same measurements. Also a command:

    python -m hwopt.cost_calibrate --budget 300 [--no-progress] [--no-learned]
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from hwopt.cost import RooflineModel
from hwopt.cost_machine import FORMAT, cost_file, machine_key, write_json

log = logging.getLogger("hwopt")
MIN_KERNELS = 3  # an op class needs this many measured kernels before its efficiency is fitted


@dataclass
class Measurement:
    """A measured subgraph: its kernels (``hwopt.cost_fusion``) and median latency."""

    name: str
    kernels: list
    latency_s: float
    other_cores: float = 0.0  # CPU other processes used while it was timed


def _arrays(base: RooflineModel, samples: list[Measurement]) -> dict:
    """Per kernel of every sample: class, seconds at peak compute, seconds per memory level at
    the spec's bandwidth, which sample it belongs to, whether it runs in parallel."""
    levels = base.levels()
    cls, comp, mem, owner, par = [], [], [], [], []
    for i, s in enumerate(samples):
        for t in base.kernel_terms(s.kernels):
            cls.append(t["cls"])
            comp.append(float(t["flops"]) / (base.peak(t["dtype"]) * float(t["util"])))
            mem.append([float(b) / lv[2] for b, lv in zip(t["level_bytes"], levels)])
            owner.append(i)
            par.append(base.cores <= 1 or float(t["work"]) >= base.parallel_min_work)
    return {"cls": cls, "comp": np.array(comp, dtype=float),
            "mem": np.array(mem, dtype=float).reshape(len(cls), len(levels)),
            "owner": np.array(owner, dtype=int), "par": np.array(par, dtype=bool)}


class _Theta:
    """Layout of the fitted vector (all logs): efficiency and memory efficiency per fitted
    class, a bandwidth factor per memory level, overheads (parallel, serial, per call)."""

    def __init__(self, base: RooflineModel, fitted: list[str]):
        self.base, self.fitted, self.n_c, self.n_l = base, fitted, len(fitted), len(base.levels())
        self.theta0 = np.log(np.concatenate([
            [base.efficiency.get(c, 0.1) for c in fitted],
            [base.mem_efficiency.get(c, 1.0) for c in fitted], np.ones(self.n_l),
            [max(o, 1e-7) for o in (base.overhead_s, base.serial_overhead_s,
                                    base.call_overhead_s)]]))
        self.lo = np.log(np.concatenate([np.full(2 * self.n_c, 1e-4), np.full(self.n_l, 0.05),
                                         np.full(3, 1e-8)]))
        self.hi = np.log(np.concatenate([np.full(self.n_c, 1.5), np.full(self.n_c, 20.0),
                                         np.full(self.n_l, 5.0), np.full(3, 1e-3)]))

    def split(self, theta) -> tuple:
        n, m = self.n_c, self.n_l
        e = np.exp(theta)
        return e[:n], e[n:2 * n], e[2 * n:2 * n + m], e[2 * n + m:]

    def params(self, theta) -> dict:
        eff, meff, bw, (o_par, o_ser, o_call) = self.split(theta)
        return {"efficiency": dict(zip(self.fitted, map(float, eff))),
                "mem_efficiency": dict(zip(self.fitted, map(float, meff))),
                "level_bandwidth": {lv[0]: float(lv[2] * f)
                                    for lv, f in zip(self.base.levels(), bw)},
                "overhead_s": float(o_par), "serial_overhead_s": float(o_ser),
                "call_overhead_s": float(o_call)}


def fit(base: RooflineModel, samples: list[Measurement], prior: float = 0.05) -> dict:
    """Per-class efficiency and memory efficiency, per-level bandwidth, per-kernel (parallel,
    serial) and per-call overheads, fitted in log space (robust loss, a weak pull towards
    `base`'s values so classes seen rarely stay near them)."""
    from scipy.optimize import least_squares

    a = _arrays(base, samples)
    cls = a["cls"]
    counts = {c: cls.count(c) for c in set(cls)}
    fitted = sorted(c for c, n in counts.items() if n >= MIN_KERNELS and c != "view")
    th = _Theta(base, fitted)
    idx = np.array([fitted.index(c) if c in fitted else -1 for c in cls], dtype=int)
    eff0 = np.array([base.efficiency.get(c, 0.1) for c in cls])
    meff0 = np.array([base.mem_efficiency.get(c, 1.0) for c in cls])
    scale = np.where(a["par"], 1.0, float(max(base.cores, 1)))  # small kernels: one core
    measured = np.log([s.latency_s for s in samples])

    def predict(theta):
        eff_c, meff_c, bw, (o_par, o_ser, o_call) = th.split(theta)
        eff = np.where(idx >= 0, eff_c[idx.clip(0)] if fitted else 1.0, eff0)
        meff = np.where(idx >= 0, meff_c[idx.clip(0)] if fitted else 1.0, meff0)
        memory = (a["mem"] / bw).max(axis=1) / meff
        per_kernel = np.maximum(a["comp"] / eff, memory) * scale + np.where(a["par"], o_par,
                                                                             o_ser)
        return np.bincount(a["owner"], weights=per_kernel, minlength=len(samples)) + o_call

    # The pull towards `base` keeps rarely seen classes near their defaults; overheads are in
    # every sample and need none (base's call overhead of 0 would bias them).
    weights = np.full(len(th.theta0), prior)
    weights[-3:] = prior / 50

    def residuals(theta):
        return np.concatenate([np.log(predict(theta)) - measured, weights * (theta - th.theta0)])

    res = least_squares(residuals, th.theta0.clip(th.lo + 1e-9, th.hi - 1e-9),
                        bounds=(th.lo, th.hi), loss="soft_l1", f_scale=0.1)
    err = np.abs(np.log(predict(res.x)) - measured)
    return {**th.params(res.x), "fit": {"samples": len(samples), "kernels": counts,
                                        "median_abs_log_err": float(np.median(err))}}


def apply_calibration(base: RooflineModel, calib: dict) -> RooflineModel:
    """`base` with the fitted parameters of a calibration (a dict from `fit` or its JSON file)."""
    p = calib.get("params", calib)
    bw = p.get("level_bandwidth", {})
    levels = tuple((n, size, bw.get(n, b), e) for n, size, b, e in base.levels())
    return base.with_params(efficiency={**base.efficiency, **p.get("efficiency", {})},
                            mem_efficiency={**base.mem_efficiency, **p.get("mem_efficiency", {})},
                            mem_levels=levels if base.mem_levels or bw else base.mem_levels,
                            mem_bw=bw.get("DRAM", base.mem_bw),
                            overhead_s=p.get("overhead_s", base.overhead_s),
                            serial_overhead_s=p.get("serial_overhead_s", base.serial_overhead_s),
                            call_overhead_s=p.get("call_overhead_s", base.call_overhead_s))


def save_calibration(params: dict, target: str = "cpu", cache_dir=None, key=None) -> str:
    data = {"format": FORMAT, "kind": "calibration", "target": target,
            "machine": key or machine_key(), "created": datetime.now(timezone.utc).isoformat(),
            "params": {k: v for k, v in params.items() if k != "fit"},
            "fit": params.get("fit", {})}
    return str(write_json(cost_file("calibration", target, cache_dir, key), data))


def measure_random(target, budget_s: float, progress: bool = True, seed: int = 0,
                   max_items: int = 400) -> list[Measurement]:
    """Build and time random op-class subgraphs until `budget_s` is spent."""
    from tqdm.auto import tqdm

    from hwopt.cost_dataset import random_subgraphs
    from hwopt.cost_fusion import graph_kernels
    from hwopt.cost_measure import build, time_quietly

    out: list[Measurement] = []
    start = time.perf_counter()
    bar = tqdm(total=int(budget_s), desc="hwopt calibrate", unit="s", disable=not progress)
    for name, gm, ins in random_subgraphs(max_items, seed=seed):
        try:
            b = build(gm, ins, target)
            times, other = time_quietly(b, repeat=7)
        except Exception as e:  # noqa: BLE001 - a kernel that does not build is skipped
            log.debug("hwopt calibrate: %s failed: %s", name, e)
            continue
        out.append(Measurement(name, graph_kernels(gm), float(np.median(times)), other))
        spent = time.perf_counter() - start
        bar.update(min(int(spent), int(budget_s)) - bar.n)
        bar.set_postfix_str(f"{len(out)} kernels")
        if spent > budget_s:
            break
    bar.close()
    return out


def calibrate(target="cpu", budget_s: float = 300.0, progress: bool = True, cache_dir=None,
              learned: bool = True, seed: int = 0) -> dict:
    """Measure, fit and store this machine's calibration for `target` (it must run here).

    Returns the fitted parameters; the target's cost model uses them from then on. With
    `learned` (and scikit-learn installed) also trains and stores the learned refinement.
    """
    from hwopt.errors import OptionError
    from hwopt.target import get_target

    t = get_target(target)
    if not t.runs_here():
        raise OptionError(f"cannot calibrate target {t.name!r} here: its code does not run on "
                          "this machine; calibrate on the device itself")
    base = getattr(t.cost_model, "base", t.cost_model)
    samples = measure_random(t, budget_s, progress, seed)
    if len(samples) < 8:
        raise OptionError(f"calibration measured only {len(samples)} kernels in {budget_s:.0f} s;"
                          " give it a larger budget_s")
    params = fit(base, samples)
    params["fit"]["other_cores_median"] = float(np.median([s.other_cores for s in samples]))
    path = save_calibration(params, t.name, cache_dir)
    log.info("hwopt: calibration of %s stored in %s (%d kernels)", t.name, path, len(samples))
    if learned:
        _train_learned(t, base, params, samples, cache_dir)
    if hasattr(t.cost_model, "reload"):
        t.cost_model.reload()
    return params


def _train_learned(t, base, params, samples, cache_dir) -> None:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        log.warning("hwopt: scikit-learn is not installed (pip install 'hwopt[models]'); "
                    "skipping the learned cost refinement")
        return
    from hwopt.cost_learned import save_learned, train

    roof = apply_calibration(base, params)
    model = train(roof, [(s.kernels, s.latency_s) for s in samples])
    save_learned(model, t.name, cache_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="cpu")
    p.add_argument("--budget", type=float, default=300.0, help="seconds of measuring")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-learned", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    calibrate(a.target, a.budget, progress=not a.no_progress, learned=not a.no_learned)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
