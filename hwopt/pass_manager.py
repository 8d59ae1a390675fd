"""Pass manager: orders passes from their declared constraints and runs each under an observer.

Sits in the *rewrite* step of the pipeline. The observer times every pass, stamps the nodes a pass
creates with ``node.meta["hwopt_pass"]`` (provenance), lints the graph after each pass, and skips
passes named in ``HWOPT_DISABLE=name,...`` so a bad result can be bisected.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from .errors import PassError
from .pass_base import Pass, PassContext, PassResult

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


class PassManager:
    """Runs an ordered list of passes on a GraphModule under the observer."""

    def __init__(self, passes: list[Pass], check: bool = True):
        self.passes = order_passes(list(passes))
        self.check = check
        self.records: list[PassRecord] = []

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        off = disabled_passes()
        modified_any = False
        for p in self.passes:
            if p.name in off:
                log.info("hwopt: pass %s disabled by HWOPT_DISABLE", p.name)
                self.records.append(PassRecord(p.name, 0.0, False, skipped="HWOPT_DISABLE"))
                continue
            gm, rec = self._observe(p, gm, ctx)
            self.records.append(rec)
            modified_any |= rec.modified
        ctx.log.extend(vars(r) for r in self.records)
        return PassResult(gm, modified_any)

    def _observe(self, p: Pass, gm: torch.fx.GraphModule, ctx: PassContext):
        before = set(gm.graph.nodes)
        n_before = len(before)
        t0 = time.perf_counter()
        try:
            res = p(gm, ctx)
        except PassError:
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
                         tuple(res.notes))
        return out, rec
