"""Threshold calibration of the ``early_exit`` pass (passes/early_exit.py).

The calibration batches run once with exits off: that gives the full-compute outputs and every
sample's score after every stage (similarity or confidence). Candidate thresholds are quantiles
of those scores; a bisection finds the lowest one (most exits) whose outputs keep the quality
target vs full compute (mean per-sample cosine, or argmax agreement, worst output) and whose
relative error per batch stays within a share of the pass tolerance. Assumes quality does not go
down as the threshold goes up, which holds per sample (a higher threshold never makes a sample
leave earlier). The notes carry the exit histogram on the calibration samples.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.fx as fx

from hwopt.exit_runtime import ExitCascade
from hwopt.pass_base import relative_error

log = logging.getLogger("hwopt")


def _flat(o) -> list:
    return list(o) if isinstance(o, (tuple, list)) else [o]


def quality(got: list, want: list, metric: str) -> float:
    """Worst output's quality over all samples: mean per-sample cosine, or argmax agreement.
    `got`/`want`: per batch, the model's outputs."""
    worst = math.inf
    for j in range(len(_flat(want[0]))):
        g = torch.cat([_flat(o)[j] for o in got]).double()
        w = torch.cat([_flat(o)[j] for o in want]).double()
        if not w.is_floating_point() or w.dim() == 0:
            continue
        if metric == "agreement":
            q = float((g.argmax(-1) == w.argmax(-1)).double().mean())
        else:
            q = float(torch.nn.functional.cosine_similarity(
                g.flatten(1), w.flatten(1), dim=1).mean())
        worst = min(worst, q)
    return worst


def _usable(batches, example: tuple) -> list[tuple]:
    """Calibration batches with the example inputs' shapes (the graph is shape-specialised)."""
    shapes = [tuple(x.shape) for x in example]
    return [tuple(b) for b in batches
            if [tuple(x.shape) for x in b] == shapes]


@torch.no_grad()
def calibrate(gm: fx.GraphModule, cascade: ExitCascade, batches, cfg, tolerance: float | None,
              example: tuple) -> str:
    """Set `cascade.threshold` to the lowest candidate that keeps the quality target."""
    usable = _usable(batches, example)
    if not usable:
        return (f"no calibration batch has the example inputs' shapes "
                f"{[tuple(x.shape) for x in example]}; threshold {cascade.threshold} kept")
    cascade.threshold = math.inf
    cascade.record = [[] for _ in cascade.stages]
    refs = [gm(*b) for b in usable]
    scores = [torch.cat(r) for r in cascade.record if r]
    cascade.record = None
    if not scores:
        return "no stage can be left early (too few stages); exits off"
    flat = torch.cat(scores).double()
    levels = torch.linspace(0, 1, cfg.quantiles, dtype=torch.double)
    cands = sorted(set(torch.quantile(flat, levels).tolist())) + [math.inf]

    def trial(thr):
        cascade.threshold = thr
        cascade.stats.reset()
        outs = [gm(*b) for b in usable]
        q = quality(outs, refs, cfg.metric)
        err = max(relative_error(o, r) for o, r in zip(outs, refs))
        ok = q >= cfg.target and (tolerance is None or err <= cfg.tolerance_share * tolerance)
        log.debug("hwopt: early_exit threshold %.5g: %s %.4g, error %.3g, %s", thr, cfg.metric,
                  q, err, cascade.stats.summary())
        return ok, (q, err, cascade.stats.summary())

    lo, hi, best = 0, len(cands) - 1, None
    while lo < hi:  # the last candidate (never leave) always passes
        mid = (lo + hi) // 2
        ok, score = trial(cands[mid])
        if ok:
            hi, best = mid, score
        else:
            lo = mid + 1
    thr = cands[hi]
    if best is None:
        best = trial(thr)[1]
    cascade.threshold = thr
    q, err, summary = best
    if math.isinf(thr):
        return (f"calibration on {sum(len(b[0]) for b in usable)} sample(s): no threshold keeps "
                f"{cfg.metric} >= {cfg.target}; exits off")
    return (f"calibration on {len(usable)} batch(es): threshold {thr:.6g}, {cfg.metric} "
            f"{q:.4g} (target {cfg.target}), max batch error {err:.3g}; {summary}")


@torch.no_grad()
def default_stats(gm: fx.GraphModule, cascade: ExitCascade, example: tuple) -> str:
    """The exit histogram on the example inputs at the default threshold."""
    cascade.stats.reset()
    gm(*example)
    return "on the example inputs: " + cascade.stats.summary()


@torch.no_grad()
def observe(gm: fx.GraphModule, cascade: ExitCascade, batches, example: tuple) -> None:
    """Run the calibration batches (else the example) once at the calibrated threshold, so
    ``cascade.stats`` holds how many rows each stage ran on (for the batch-size choice)."""
    cascade.stats.reset()
    for b in _usable(batches, example) or [example]:
        gm(*b)
