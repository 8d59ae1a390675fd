"""Early-exit runtime: the run-time side of the ``early_exit`` pass (passes/early_exit.py).

Sits in the *run* step. The pass cuts a model into stages (the repeated blocks of a transformer,
or the backbone segments between the exit heads of a multi-exit network) and replaces them by
one `ExitCascade`, a ``call_module`` that stays in PyTorch while each stage's graph is lowered to
TVM as a nested region (`StageVariant.hwopt_inner`, see hwopt.lowering._lower_nested).

After each stage that has an exit, every sample still running gets a score: the cosine similarity
of its hidden state before and after the stage (MuE-style similarity exit), or the softmax
confidence of the stage's classifier (exit heads). A sample whose score reaches the threshold
leaves: its outputs are written into the full-batch results, and the remaining stages run on the
samples still active only (the batch is compacted and padded up to the nearest batch size a stage
was specialised for). `ExitStats` counts, per sample, after which stage it left, and per stage how
many rows were still running (what the pass picks the batch sizes to specialise for from).
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import is_fake

log = logging.getLogger("hwopt")
_LIVE: "weakref.WeakSet[ExitCascade]" = weakref.WeakSet()


@dataclass
class ExitStats:
    """Per-sample exit statistics, accumulated over calls (reset with `reset`)."""

    n_stages: int
    histogram: list = field(default_factory=list)  # samples that left after stage k
    calls: int = 0
    rows_run: int = 0  # stage evaluations actually run, per row, padding included
    active: list = field(default_factory=list)  # per stage: {rows still running: calls}

    def __post_init__(self):
        self.histogram = self.histogram or [0] * self.n_stages
        self.active = self.active or [{} for _ in range(self.n_stages)]

    def reset(self) -> None:
        self.histogram, self.calls, self.rows_run = [0] * self.n_stages, 0, 0
        self.active = [{} for _ in range(self.n_stages)]

    def ran(self, k: int, n: int) -> None:
        """Stage k ran on n rows (before padding)."""
        self.active[k][n] = self.active[k].get(n, 0) + 1

    @property
    def samples(self) -> int:
        return sum(self.histogram)

    @property
    def skipped_share(self) -> float:
        """Share of (sample, stage) evaluations not run because the sample had left."""
        total = self.samples * self.n_stages
        run = sum(c * (k + 1) for k, c in enumerate(self.histogram))
        return 1 - run / total if total else 0.0

    @property
    def mean_exit(self) -> float:
        """Mean number of stages a sample ran."""
        return sum(c * (k + 1) for k, c in enumerate(self.histogram)) / max(self.samples, 1)

    def summary(self) -> str:
        hist = ", ".join(f"{k + 1}:{c}" for k, c in enumerate(self.histogram) if c)
        return (f"{self.samples} sample(s): stages run per sample {{{hist}}} (of "
                f"{self.n_stages}), mean {self.mean_exit:.2f}, {100 * self.skipped_share:.0f}% of "
                "stage evaluations skipped")


class StageVariant(torch.nn.Module):
    """One stage specialised for one batch size: a flat-tuple GraphModule the lowering compiles
    (with the example inputs recorded by the pass) while the cascade around it stays in PyTorch."""

    def __init__(self, graph: fx.GraphModule, batch: int, example: list | None):
        super().__init__()
        self.graph, self.batch = graph, batch
        self._example = example

    def hwopt_inner(self):
        if self._example is None or not isinstance(self.graph, fx.GraphModule):
            return None
        example, self._example = self._example, None
        return "graph", self.graph, list(example)

    def forward(self, *args):
        out = self.graph(*args)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class Stage(torch.nn.Module):
    """A stage with its batch-size variants; `run` pads a compacted batch up to one of them."""

    def __init__(self, variants: dict[int, StageVariant], in_batched: list[bool],
                 out_batched: list[bool]):
        super().__init__()
        self.sizes = sorted(variants)
        self.variants = torch.nn.ModuleDict({f"b{b}": v for b, v in variants.items()})
        self.in_batched, self.out_batched = list(in_batched), list(out_batched)

    def keep(self, sizes) -> None:
        """Drop the variants not in `sizes` (the full batch always stays), before lowering."""
        keep = set(sizes) | {max(self.sizes)}
        for b in [b for b in self.sizes if b not in keep]:
            del self.variants[f"b{b}"]
        self.sizes = sorted(b for b in self.sizes if b in keep)

    def run(self, args: list, n: int) -> tuple:
        size = next(s for s in self.sizes if s >= n)
        if size != n:  # pad with copies of the first row; their results are dropped
            pad = torch.cat([torch.arange(n), torch.zeros(size - n, dtype=torch.long)])
            args = [a.index_select(0, pad) if b else a for a, b in zip(args, self.in_batched)]
        out = self.variants[f"b{size}"](*args)
        if size != n:
            out = tuple(o[:n] if b else o for o, b in zip(out, self.out_batched))
        return out


@dataclass(frozen=True)
class ExitPoint:
    """The test after a stage: ("similarity", new_ref, old_ref) or ("confidence", ref, None);
    `fallback[j]` is the ref whose value becomes output j for a sample leaving here (None when
    output j is already final)."""

    kind: str
    ref: tuple
    old: tuple | None
    fallback: tuple
    score: tuple | None = None  # ref of the score when the stage computes it (else the host)


class ExitCascade(torch.nn.Module):
    """Runs the stages with per-sample exits. Refs name values: ("x", i) the cascade's i-th
    input, ("c", name) a stage output. `wiring[k]` = (input refs, output names) of stage k;
    `outputs` = refs of the cascade's outputs, `producer[j]` the stage that computes output j."""

    def __init__(self, stages: list[Stage], wiring: list, exits: list, outputs: list,
                 producer: list, batch: int, batched: dict, out_meta: list, threshold: float):
        super().__init__()
        self.stages = torch.nn.ModuleList(stages)
        self.wiring, self.exits, self.outputs = wiring, exits, outputs
        self.producer, self.batch, self.batched = producer, batch, batched
        self.out_meta = out_meta  # (shape, dtype) of each output
        self.threshold = threshold
        self.record: list[list] | None = None  # calibration: per-stage scores of every sample
        self.stats = ExitStats(len(stages))
        self._tvm = False  # True once lowering has replaced every stage by a TVM region
        _LIVE.add(self)

    def forward(self, *ext):
        if any(is_fake(x) for x in ext if isinstance(x, torch.Tensor)) or (
                torch.is_grad_enabled() and any(getattr(x, "requires_grad", False) for x in ext)):
            return self._full(ext)
        if not self._tvm:  # every stage variant built by TVM: host ops on one thread
            from hwopt.lowering.region import TVMRegion

            self._tvm = all(isinstance(v.graph, TVMRegion) for st in self.stages
                            for v in st.variants.values())
        from hwopt.host_threads import single_torch_thread

        with torch.no_grad(), single_torch_thread(self._tvm):
            return self._run(ext)

    def _full(self, ext) -> tuple:
        """Every stage on the whole batch, no decisions (fake tensors, autograd)."""
        env = {}
        for stage, (ins, outs) in zip(self.stages, self.wiring):
            args = [ext[r[1]] if r[0] == "x" else env[r[1]] for r in ins]
            size = max(stage.sizes)
            env.update(zip(outs, stage.variants[f"b{size}"](*args)))
        return tuple(ext[r[1]] if r[0] == "x" else env[r[1]] for r in self.outputs)

    def _run(self, ext) -> tuple:
        if self.batch == 1:
            return self._run_one(ext)
        live = self._live()
        active = torch.arange(self.batch)
        results = [torch.empty(s, dtype=d) for s, d in self.out_meta]
        env: dict = {}
        ext_now = list(ext)
        stats = self.stats
        stats.calls += 1

        def get(ref):
            return ext_now[ref[1]] if ref[0] == "x" else env[ref[1]]

        last = len(self.stages) - 1
        for k, (stage, (ins, outs)) in enumerate(zip(self.stages, self.wiring)):
            n = len(active)
            env.update(zip(outs, stage.run([get(r) for r in ins], n)))
            stats.ran(k, n)
            stats.rows_run += next(s for s in stage.sizes if s >= n)
            for j, p in enumerate(self.producer):
                if p == k:
                    if n == self.batch:  # nobody left yet: a plain copy, no scatter
                        results[j].copy_(get(self.outputs[j]))
                    else:
                        results[j][active] = get(self.outputs[j])
            point = self.exits[k]
            if point is None or k == last:
                continue
            done = self._score(point, get, k) >= self.threshold
            n_done = int(done.sum())
            if not n_done:
                continue
            rows, leaving = active[done], {}
            for j, ref in enumerate(point.fallback):
                if ref is not None:  # outputs falling back to one value gather it once
                    if ref not in leaving:
                        leaving[ref] = get(ref)[done]
                    results[j][rows] = leaving[ref]
            stats.histogram[k] += n_done
            if n_done == n:
                return tuple(results)
            keep = (~done).nonzero().squeeze(1)
            active = active[keep]
            need = live[k]  # compact only what later stages, exits and outputs read
            env = {r: (t.index_select(0, keep) if self.batched.get(("c", r)) else t)
                   for r, t in env.items() if ("c", r) in need}
            ext_now = [None if ("x", i) not in need else
                       x.index_select(0, keep) if self.batched.get(("x", i)) else x
                       for i, x in enumerate(ext_now)]
        stats.histogram[last] += len(active)
        return tuple(results)

    def _run_one(self, ext) -> tuple:
        """Batch 1: no compaction; the outputs are the values at the exit, not copies."""
        env: dict = {}
        stats = self.stats
        stats.calls += 1

        def get(ref):
            return ext[ref[1]] if ref[0] == "x" else env[ref[1]]

        last = len(self.stages) - 1
        for k, (stage, (ins, outs)) in enumerate(zip(self.stages, self.wiring)):
            env.update(zip(outs, stage.run([get(r) for r in ins], 1)))
            stats.rows_run += 1
            stats.ran(k, 1)
            point = self.exits[k]
            if point is None or k == last:
                continue
            if float(self._score(point, get, k)[0]) >= self.threshold:
                stats.histogram[k] += 1
                return tuple(get(f if f is not None else o)
                             for f, o in zip(point.fallback, self.outputs))
        stats.histogram[last] += 1
        return tuple(get(o) for o in self.outputs)

    def _live(self) -> list[set]:
        """Per stage k: the refs read after stage k (by later stages, exits, or outputs that
        later stages produce)."""
        live = getattr(self, "_live_refs", None)
        if live is None:
            live = []
            for k in range(len(self.stages)):
                need = {tuple(r) for ins, _ in self.wiring[k + 1:] for r in ins}
                for e in self.exits[k + 1:]:
                    if e is not None:
                        need |= {tuple(r) for r in (e.ref, e.old, e.score, *e.fallback)
                                 if r is not None}
                need |= {tuple(o) for o, p in zip(self.outputs, self.producer) if p > k}
                live.append(need)
            self._live_refs = live
        return live

    def _score(self, point: ExitPoint, get, k: int) -> torch.Tensor:
        if point.score is not None:
            score = get(point.score)
            if self.record is not None:
                self.record[k].append(score.detach().clone())
            return score
        new = get(point.ref).float()
        if point.kind == "similarity":
            score = torch.nn.functional.cosine_similarity(
                new.flatten(1), get(point.old).float().flatten(1), dim=1)
        else:
            score = torch.softmax(new, dim=-1).amax(dim=-1)
        if self.record is not None:
            self.record[k].append(score.detach().clone())
        return score


def exit_cascades(obj) -> list[ExitCascade]:
    """The ExitCascades reachable from a compiled object (GraphModule, Compiled, Artifact...)."""
    seen, found, todo = set(), [], [obj]
    while todo:
        o = todo.pop()
        if o is None or id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, ExitCascade):
            found.append(o)
        elif isinstance(o, torch.nn.Module):
            todo.extend(o.children())
        for attr in ("compiled", "module", "graph", "hwopt_compiled", "_orig_mod"):
            child = getattr(o, attr, None)
            if child is not None and not isinstance(child, (str, int, float)):
                todo.append(child)
    return found


def exit_stats(obj=None) -> list[ExitStats]:
    """The per-sample exit statistics of the cascades reachable from `obj`. With no object, or
    one whose compiled graphs are not reachable (a ``torch.compile`` wrapper: Dynamo keeps its
    graphs to itself), those of every live cascade."""
    found = exit_cascades(obj) if obj is not None else []
    return [c.stats for c in (found or list(_LIVE))]
