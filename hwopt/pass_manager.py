"""Pass manager: orders passes from their declared constraints and runs each under an observer.

Sits in the *rewrite* step of the pipeline. The observer times every pass, stamps the nodes a pass
creates with ``node.meta["hwopt_pass"]`` (provenance), lints the graph after each pass, records the
predicted cost before and after it, and skips passes named in ``HWOPT_DISABLE=name,...`` so a bad
result can be bisected. A lossy pass is held to its bound: its output is compared with the graph
before it on the example and calibration inputs, and a pass whose error exceeds the bound is undone
with a warning — a compiled model never silently returns numbers outside the tolerance.
"""
from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from dataclasses import dataclass

import torch

from .errors import OptionError, PassError
from .pass_base import Pass, PassContext, PassResult, relative_error

log = logging.getLogger("hwopt")


def disabled_passes() -> set[str]:
    return {p.strip() for p in os.environ.get("HWOPT_DISABLE", "").split(",") if p.strip()}


def order_passes(passes: list[Pass]) -> list[Pass]:
    """Topological order honouring `after`/`before`; ties keep the given order.

    Constraints naming passes that are not in the list are ignored (they are optional anchors).
    """
    names = [p.name for p in passes]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise PassError(f"pass(es) listed twice: {', '.join(dup)}")
    deps: dict[str, set[str]] = {n: set() for n in names}
    for p in passes:
        deps[p.name] |= {a for a in p.after if a in deps}
        for b in p.before:
            if b in deps:
                deps[b].add(p.name)
    ordered: list[Pass] = []
    done: set[str] = set()
    remaining = list(passes)
    while remaining:
        ready = [p for p in remaining if deps[p.name] <= done]
        if not ready:
            cycle = ", ".join(p.name for p in remaining)
            raise PassError(f"pass ordering constraints form a cycle among: {cycle}")
        ordered.append(ready[0])
        done.add(ready[0].name)
        remaining.remove(ready[0])
    return ordered


@dataclass
class PassRecord:
    name: str
    seconds: float
    modified: bool
    skipped: str | None = None
    nodes_before: int = 0
    nodes_after: int = 0
    notes: tuple[str, ...] = ()
    cost_before: object = None  # predicted Cost of the graph before / after the pass
    cost_after: object = None
    error: float | None = None  # lossy passes: measured relative error vs the graph before
    bound: float | None = None  # ... and the bound it was held to
    reverted: str | None = None  # why the pass's result was undone


class PassManager:
    """Runs an ordered list of passes on a GraphModule under the observer."""

    def __init__(self, passes: list[Pass], check: bool = True):
        self.passes = order_passes(list(passes))
        self.check = check
        self.records: list[PassRecord] = []

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        off = disabled_passes()
        modified_any = False
        cost = None
        for p in self.passes:
            if p.name in off:
                log.info("hwopt: pass %s disabled by HWOPT_DISABLE", p.name)
                self.records.append(PassRecord(p.name, 0.0, False, skipped="HWOPT_DISABLE"))
                continue
            gm, rec = self._observe(p, gm, ctx, cost)
            cost = rec.cost_after
            self.records.append(rec)
            modified_any |= rec.modified
        ctx.log.extend(vars(r) for r in self.records)
        return PassResult(gm, modified_any)

    def _observe(self, p: Pass, gm: torch.fx.GraphModule, ctx: PassContext, cost_before=None):
        before = set(gm.graph.nodes)
        n_before = len(before)
        cost_before = cost_before if cost_before is not None else _predict(gm, ctx)
        original = None if p.lossless else copy.deepcopy(gm)  # passes may rewrite in place
        t0 = time.perf_counter()
        try:
            res = p(gm, ctx)
        except (PassError, OptionError):  # a bad option or missing data: the user must fix it
            raise
        except Exception as e:  # name the pass: the traceback alone rarely does
            raise PassError(f"pass {p.name!r} failed: {type(e).__name__}: {e}") from e
        dt = time.perf_counter() - t0
        out = res.graph_module
        for node in out.graph.nodes:
            if node not in before:
                node.meta.setdefault("hwopt_pass", p.name)
        if self.check:
            try:
                out.graph.lint()
            except Exception as e:
                raise PassError(f"pass {p.name!r} left an invalid graph: {e}") from e
        if res.modified:
            out.recompile()
        log.debug("hwopt: pass %s %.3fs modified=%s", p.name, dt, res.modified)
        rec = PassRecord(p.name, dt, res.modified, None, n_before, len(out.graph.nodes),
                         tuple(res.notes), cost_before)
        if original is not None and res.modified:
            out = self._hold_to_bound(p, original, out, ctx, rec)
        rec.cost_after = _predict(out, ctx) if rec.modified else cost_before
        return out, rec

    def _hold_to_bound(self, p, original, out, ctx, rec):
        """Measure a lossy pass's error; undo the pass when it is over the bound."""
        bound = ctx.tolerance if ctx.tolerance is not None else p.tolerance
        batches = [tuple(ctx.example_inputs)] if ctx.example_inputs else []
        batches += [tuple(b) for b in (ctx.calibration or [])[:2]]
        if not batches or bound is None:
            return out
        with torch.no_grad():
            err = max(relative_error(out(*b), original(*b)) for b in batches)
        rec.error, rec.bound = err, bound
        if err <= bound:
            return out
        rec.reverted = (f"relative error {err:.3g} > bound {bound:.3g} "
                        f"(SQNR {_db(err):.1f} dB < {_db(bound):.1f} dB)")
        rec.modified, rec.nodes_after = False, len(original.graph.nodes)
        warnings.warn(f"hwopt: pass {p.name!r} undone: {rec.reverted} on the example/calibration "
                      "inputs; raise the tolerance option or tune the pass", stacklevel=4)
        return original


def _db(err: float) -> float:
    import math

    return -20 * math.log10(err) if 0 < err < float("inf") else (float("inf") if err == 0 else 0.0)


def _predict(gm: torch.fx.GraphModule, ctx: PassContext):
    """Predicted Cost of `gm` on the context's target (None when shapes are unknown)."""
    target = ctx.target
    if target is None or not ctx.example_inputs:
        return None
    try:
        from .graph import propagate_meta

        propagate_meta(gm, tuple(ctx.example_inputs))
        return target.cost(gm)
    except Exception as e:  # noqa: BLE001 - a cost is a report figure, never a reason to fail
        log.debug("hwopt: could not predict the cost after a pass: %s", e)
        return None
