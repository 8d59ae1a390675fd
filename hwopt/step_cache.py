"""Step cache: the runtime state of the ``lazy_cache`` pass (passes/lazy_cache.py).

Sits in the *run* step. The pass replaces each repeated block of a diffusion transformer by a
`LazyBlock` (a ``call_module`` that stays in PyTorch) and puts one ``hwopt::step_begin`` custom
op (``torch.library``; TVM has no converter for it, so the partitioner leaves it in PyTorch) in
front of them. All of them share one `StepCache`, a submodule of the compiled graph that holds,
per block, the input seen when the block was last computed and its residual (output - input).

At each call a block whose primary input moved less than its threshold (relative L1) since then
returns ``input + cached residual`` instead of running. The cache is bounded (``max_bytes``), is
reset when the timestep does not go down (a new sampling run) or by `reset_cache`, and drops an
entry whose shapes, dtypes or integer inputs (class labels) changed instead of mixing them.
"""
from __future__ import annotations

import itertools
import logging
import weakref
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import is_fake

log = logging.getLogger("hwopt")

_CACHES: "weakref.WeakValueDictionary[int, StepCache]" = weakref.WeakValueDictionary()
_IDS = itertools.count()


@torch.library.custom_op("hwopt::step_begin", mutates_args=())
def step_begin(timestep: torch.Tensor, cache_id: int) -> torch.Tensor:
    """Start of a model call: resets the cache on a new sampling run. Returns a token that the
    LazyBlocks take, so the op runs before them and is never dead code."""
    cache = _CACHES.get(cache_id)
    if cache is not None:
        cache.begin(timestep)
    return torch.zeros((), dtype=torch.int64)


@step_begin.register_fake
def _(timestep, cache_id):
    return torch.empty((), dtype=torch.int64)


@dataclass
class _Entry:
    key: tuple  # shapes/dtypes of all inputs
    ints: list  # integer/bool inputs (class labels): a change invalidates the entry
    x: torch.Tensor  # primary input when the block was last computed
    residual: torch.Tensor  # output - input then (the output itself for an output cache)
    l1: float  # |x|_1, the denominator of the relative change


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    resets: int = 0
    invalidations: int = 0
    per_block_hits: dict = field(default_factory=dict)

    @property
    def skipped_share(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class StepCache(torch.nn.Module):
    """Per-block cached residuals of one compiled graph, with their skip thresholds."""

    # Calls depend on earlier calls: timing one input over and over (the backend's whole-graph
    # eager-vs-compiled check) measures a cache reset each time, not a sampling run.
    hwopt_stateful = True

    def __init__(self, thresholds: list[float], max_bytes: int = 1 << 30,
                 reset_on_repeat: bool = True):
        super().__init__()
        self.thresholds = list(thresholds)
        self.max_bytes = max_bytes
        self.reset_on_repeat = reset_on_repeat
        self.enabled = True
        self.record: list[list[float]] | None = None  # calibration: per-block input changes
        self.entries: dict[int, _Entry] = {}
        self.last_t: float | None = None
        self.stats = CacheStats()
        self.cache_id = next(_IDS)
        _CACHES[self.cache_id] = self

    def __deepcopy__(self, memo):  # a copy is a fresh, empty cache with its own id
        new = StepCache(self.thresholds, self.max_bytes, self.reset_on_repeat)
        new.enabled = self.enabled
        memo[id(self)] = new
        return new

    def reset(self) -> None:
        self.entries.clear()
        self.last_t = None
        self.stats.resets += 1

    def nbytes(self) -> int:
        return sum(e.x.nbytes + e.residual.nbytes for e in self.entries.values())

    def begin(self, timestep: torch.Tensor) -> None:
        if timestep.numel() == 0:
            return
        t = float(timestep.reshape(-1)[0])
        if self.last_t is not None and (t > self.last_t or (self.reset_on_repeat and
                                                            t == self.last_t)):
            self.entries.clear()
            self.stats.resets += 1
        self.last_t = t

    def lookup(self, index: int, key: tuple, ints: list, x: torch.Tensor) -> torch.Tensor | None:
        """The cached residual of block `index` when it may be reused for input `x`, else None."""
        entry = self.entries.get(index)
        if entry is None:
            return None
        if entry.key != key or len(entry.ints) != len(ints) or not all(
                torch.equal(a, b) for a, b in zip(entry.ints, ints)):
            del self.entries[index]  # a new batch, resolution or conditioning: never mix
            self.stats.invalidations += 1
            return None
        change = float(torch.dist(x, entry.x, 1)) / max(entry.l1, 1e-12)
        if self.record is not None:
            self.record[index].append(change)
        if self.enabled and change < self.thresholds[index]:
            return entry.residual
        return None

    def store(self, index: int, key: tuple, ints: list, x: torch.Tensor,
              out: torch.Tensor, residual: bool = True) -> None:
        old = self.entries.pop(index, None)
        need = x.nbytes + out.nbytes
        if self.nbytes() + need > self.max_bytes:
            log.debug("hwopt: step cache full (%d bytes); block %d not cached", self.max_bytes,
                      index)
            return
        del old
        # The graph is functional (nothing writes into x later), so x is kept, not copied.
        x = x.detach()
        kept = (out - x if residual else out).detach()
        self.entries[index] = _Entry(key, [i.clone() for i in ints], x, kept,
                                     float(torch.linalg.vector_norm(x, 1)))


class LazyBlock(torch.nn.Module):
    """One repeated block behind the step cache: runs `block` or reuses its cached residual.

    Inputs: the step_begin token, then the block's inputs; `primary` indexes the block input
    whose change decides reuse: with `residual`, the one whose shape and dtype the output has
    (the hidden states) and the cache holds output - input; without, the cache holds the output
    itself. `exact` indexes the inputs that must not change for a cached value to be reused
    (integer conditioning such as class labels; the timestep is not among them)."""

    def __init__(self, block: torch.nn.Module, cache: StepCache, index: int, primary: int,
                 exact: tuple = (), residual: bool = True):
        super().__init__()
        self.block = block
        self.index, self.primary, self.exact = index, primary, tuple(exact)
        self.residual = residual
        self._seen: tuple | None = None  # real inputs of one call, for the lowering
        self.__dict__["cache"] = cache  # shared by all blocks; owned by the parent graph

    def hwopt_inner(self):
        """For hwopt.lowering: the block graph to compile (TVM) with inputs seen at a real call;
        the cache decision around it stays in PyTorch. Empties the cache the lowering's own
        run filled."""
        self.cache.reset()
        if self._seen is None or not isinstance(self.block, torch.fx.GraphModule):
            return None
        seen, self._seen = self._seen, None
        return "block", self.block, list(seen)

    def forward(self, token, *inputs):
        x = inputs[self.primary]
        if is_fake(x) or torch.is_grad_enabled() and x.requires_grad:
            return self._run(inputs)
        if self._seen is None and isinstance(self.block, torch.fx.GraphModule):
            self._seen = tuple(t.detach().clone() if isinstance(t, torch.Tensor) else t
                               for t in inputs)
        key = tuple((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else repr(t)
                    for t in inputs)
        ints = [inputs[i] for i in self.exact]
        cache = self.cache
        residual = cache.lookup(self.index, key, ints, x)
        if residual is not None:
            cache.stats.hits += 1
            cache.stats.per_block_hits[self.index] = cache.stats.per_block_hits.get(
                self.index, 0) + 1
            return x + residual if self.residual else residual
        cache.stats.misses += 1
        out = self._run(inputs)
        cache.store(self.index, key, ints, x, out, self.residual)
        return out


    def _run(self, inputs) -> torch.Tensor:
        out = self.block(*inputs)  # a flat tuple (canonical form, also once lowered)
        return out[0] if isinstance(out, (tuple, list)) else out


def step_caches(obj) -> list[StepCache]:
    """The StepCaches reachable from a compiled object (GraphModule, Compiled, Artifact...)."""
    seen, found, todo = set(), [], [obj]
    while todo:
        o = todo.pop()
        if o is None or id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, StepCache):
            found.append(o)
        elif isinstance(o, torch.nn.Module):
            todo.extend(o.children())
        for attr in ("compiled", "module", "graph", "hwopt_compiled", "_orig_mod"):
            child = getattr(o, attr, None)
            if child is not None and not isinstance(child, (str, int, float)):
                todo.append(child)
    return found


def reset_cache(model=None) -> int:
    """Empty the step caches of `model` (a compiled graph, Artifact or module); returns how many.

    With no model, or one whose compiled graphs are not reachable from it (a ``torch.compile``
    wrapper: Dynamo keeps its graphs to itself), every live step cache is reset."""
    caches = step_caches(model) if model is not None else []
    if not caches:
        caches = list(_CACHES.values())
    for c in caches:
        c.reset()
    return len(caches)


def live_caches() -> list[StepCache]:
    return list(_CACHES.values())
