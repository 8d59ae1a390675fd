"""early_exit: per-sample early exits through a stack of blocks or a chain of exit heads (lossy).

Two kinds of exit, one runtime (hwopt/exit_runtime.py):

* similarity exit (MuE): the repeated blocks of the captured ATen graph (transformer layers,
  found by ``lazy_cache.find_blocks`` from ``node.meta["nn_module_stack"]``) become the stages;
  a sample leaves after block k when the cosine similarity of its hidden state before and after
  the block reaches the threshold. Its last hidden state then goes through the rest of the graph
  (final norm, pooler, classifier head), which is left where it was.
* exit heads: a model that returns the logits of intermediate classifiers (two or more outputs
  of one ``[batch, classes]`` shape, in depth order; or the outputs named by the ``exits``
  option) is cut into segments, one per head; a sample leaves at the first head whose softmax
  confidence reaches the threshold. Output j then holds head j's logits for a sample that
  reached head j, and the logits of the head it left at otherwise (so the last output is the
  early-exit prediction).

Samples leave one by one: the batch is compacted and the later stages run on the samples still
active (hwopt.exit_runtime.ExitCascade), padded up to a batch size the stage was specialised
for; which sizes is chosen per stage with the target's cost model from the row counts each stage
ran on in the calibration run (``early_exit_stages.choose_variants``). The threshold is
calibrated from ``calibration`` to a quality target vs full compute (mean per-sample cosine, or
argmax agreement) within the pass tolerance (passes/early_exit_calibrate.py); without
calibration a conservative default is used.
The exit histogram (stages run per sample) goes into the pass notes, and `exit_stats(compiled)`
gives it at run time.

Lowering: the cascade is a ``call_module`` kept in PyTorch; each stage (per batch size it was
specialised for) is lowered to TVM as a nested region, the code around it as usual.
Runs after ``fuse``. A graph with neither repeated blocks nor exit heads is returned unchanged
with a note.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx

from hwopt.errors import OptionError
from hwopt.pass_base import Pass, PassContext, PassResult, register_pass

from .early_exit_calibrate import calibrate, default_stats, observe
from .early_exit_stages import (
    CascadePlan,
    build_cascade,
    check,
    choose_variants,
    record_values,
    rewrite,
)
from .lazy_cache import _plan_block, find_blocks

log = logging.getLogger("hwopt")
aten = torch.ops.aten
_COMPUTE = {aten.convolution.default, aten.mm.default, aten.addmm.default, aten.bmm.default,
            aten.linear.default}


@dataclass(frozen=True)
class EarlyExitConfig:
    mode: str = "auto"  # "auto" (exit heads when found, else similarity) | "similarity" | "heads"
    exits: tuple | None = None  # indices of the outputs that are exit logits, shallowest first
    metric: str = "cosine"  # quality vs full compute: "cosine" (mean per sample) | "agreement"
    target: float = 0.99  # quality floor the calibrated threshold must keep
    # Defaults without calibration: leave only when almost nothing would change.
    similarity_threshold: float = 0.9999
    confidence_threshold: float = 0.999
    first_exit: int = 1  # similarity: earliest block index after which a sample may leave
    # batch sizes stages are specialised for; None: candidates m*2^k (m = 1, 3, 5, 7) of which
    # the cost model keeps up to max_variants per stage for the row counts seen on calibration
    buckets: tuple | None = None
    max_variants: int = 6
    quantiles: int = 41  # candidate thresholds: quantiles of the calibration scores
    tolerance_share: float = 0.9  # calibration keeps the relative error within this share
    min_blocks: int = 2


@register_pass("early_exit", lossless=False, tolerance=0.2, after=("fuse",))
class EarlyExit(Pass):
    def __init__(self, **config):
        if isinstance(config.get("exits"), list):
            config["exits"] = tuple(config["exits"])
        if isinstance(config.get("buckets"), list):
            config["buckets"] = tuple(config["buckets"])
        self.config = EarlyExitConfig(**config)
        cfg = self.config
        if cfg.mode not in ("auto", "similarity", "heads"):
            raise OptionError(f"pass_config['early_exit']['mode'] must be 'auto', 'similarity' "
                              f"or 'heads', got {cfg.mode!r}")
        if not isinstance(cfg.max_variants, int) or cfg.max_variants < 1:
            raise OptionError(f"pass_config['early_exit']['max_variants'] must be an int >= 1, "
                              f"got {cfg.max_variants!r}")
        if cfg.metric not in ("cosine", "agreement"):
            raise OptionError(f"pass_config['early_exit']['metric'] must be 'cosine' or "
                              f"'agreement', got {cfg.metric!r}")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        cfg = self.config
        plan, kind, why = None, "", []
        if cfg.mode in ("auto", "heads"):
            plan, reason = heads_plan(gm, cfg.exits)
            kind = "confidence"
            why.append(reason)
        if plan is None and cfg.mode in ("auto", "similarity"):
            plan, reason = stack_plan(gm, cfg)
            kind = "similarity"
            why.append(reason)
        if plan is None:
            return PassResult(gm, False, [r for r in why if r] + ["unchanged"])
        batch = plan.outputs[0].meta["val"].shape[0]
        bad = check(gm, plan, batch)
        if bad is not None:
            return PassResult(gm, False, [f"cannot cut the {kind} cascade: {bad}; unchanged"])
        if not ctx.example_inputs:
            return PassResult(gm, False, ["no example inputs to specialise the stages on; "
                                          "unchanged"])
        default = cfg.similarity_threshold if kind == "similarity" else cfg.confidence_threshold
        values = record_values(gm, ctx.example_inputs)
        cascade, ext, spec = build_cascade(gm, plan, values, batch, cfg.buckets, default)
        rewrite(gm, plan, cascade, ext)
        notes = [f"{kind} exits over {len(plan.stages)} stage(s), batch {batch}; stages: "
                 + "; ".join(f"{k}: {s}" for k, s in enumerate(spec))]
        tol = ctx.tolerance if ctx.tolerance is not None else self.tolerance
        if ctx.calibration:
            notes.append(calibrate(gm, cascade, ctx.calibration, cfg, tol,
                                   tuple(ctx.example_inputs)))
            observe(gm, cascade, ctx.calibration, tuple(ctx.example_inputs))
        else:
            notes.append(f"no calibration: {kind} threshold {default}; "
                         + default_stats(gm, cascade, tuple(ctx.example_inputs)))
        if cfg.buckets is None and batch > 1:
            notes.append(choose_variants(cascade, ctx.cost_model, cfg.max_variants))
        cascade.stats.reset()
        return PassResult(gm, True, notes)


def _ancestors(node: fx.Node) -> set:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen or n.op in ("placeholder", "get_attr"):
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen


def _logit_outputs(gm: fx.GraphModule) -> list[int]:
    """Indices of the outputs that look like exit logits: two or more of one [batch, classes]
    float shape, each ending a segment with its own compute."""
    outs = list(next(n for n in gm.graph.nodes if n.op == "output").args[0])
    groups: dict = {}
    for i, o in enumerate(outs):
        v = o.meta.get("val") if isinstance(o, fx.Node) else None
        if isinstance(v, torch.Tensor) and v.dim() == 2 and v.is_floating_point() and \
                v.shape[1] >= 2 and o.op == "call_function":
            groups.setdefault(tuple(v.shape), []).append(i)
    best = max(groups.values(), key=len, default=[])
    order = {n: k for k, n in enumerate(gm.graph.nodes)}
    return sorted(best, key=lambda i: order[outs[i]]) if len(best) >= 2 else []


def heads_plan(gm: fx.GraphModule, exits: tuple | None) -> tuple[CascadePlan | None, str]:
    """Segments ending at each exit head's logits, or (None, why not)."""
    outs = list(next(n for n in gm.graph.nodes if n.op == "output").args[0])
    if exits is not None:
        if any(not isinstance(i, int) or not 0 <= i < len(outs) for i in exits) or len(
                set(exits)) != len(exits) or len(exits) < 2:
            raise OptionError(f"pass_config['early_exit']['exits'] must list 2+ distinct output "
                              f"indices below {len(outs)}, shallowest first; got {exits!r}")
        idx = list(exits)
    else:
        idx = _logit_outputs(gm)
    if not idx:
        return None, "no exit heads (2+ outputs of one [batch, classes] shape)"
    heads = [outs[i] for i in idx]
    if len(set(heads)) != len(heads) or any(not isinstance(h, fx.Node) for h in heads):
        return None, "exit outputs are not distinct graph nodes"
    done: set = set()
    stages = []
    for k, h in enumerate(heads):
        seg = _ancestors(h) - done
        if h in done:
            return None, f"exit {k} ({h.name}) is computed before exit {k - 1} is"
        if k and exits is None and not (
                any(n.target in _COMPUTE for n in seg)
                and any(a in done for n in seg for a in n.all_input_nodes)):
            return None, (f"output {idx[k]} does not continue a backbone after output "
                          f"{idx[k - 1]} (not exit heads; name them with the 'exits' option)")
        stages.append(sorted(seg, key=list(gm.graph.nodes).index))
        done |= seg
    exits_at = [("confidence", h, None) for h in heads[:-1]] + [None]
    fallback = [[h if j > k else None for j in range(len(heads))] for k, h in enumerate(heads)]
    return CascadePlan(stages, exits_at, heads, fallback), ""


def stack_plan(gm: fx.GraphModule, cfg: EarlyExitConfig) -> tuple[CascadePlan | None, str]:
    """The repeated blocks as stages of a similarity cascade, or (None, why not)."""
    blocks = find_blocks(gm, cfg.min_blocks)
    if not blocks:
        return None, "no repeated blocks found (nn_module_stack)"
    plans = []
    for path, nodes in blocks:
        p = _plan_block(gm, nodes, None)
        if isinstance(p, str):
            return None, f"block {path}: {p}"
        plans.append(p)
    for (path, _), prev, p in zip(blocks[1:], plans, plans[1:]):
        if p.inputs[p.primary] is not prev.out:
            return None, f"block {path} does not take the previous block's output"
    outs = [p.out for p in plans]
    first = plans[0].inputs[plans[0].primary]
    exits = [("similarity", o, outs[k - 1] if k else first)
             if cfg.first_exit <= k < len(plans) - 1 else None for k, o in enumerate(outs)]
    return CascadePlan([p.nodes for p in plans], exits, [outs[-1]],
                       [[o] for o in outs]), ""
