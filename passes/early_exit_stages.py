"""Cutting a graph into the stages of an early-exit cascade, and specialising each stage for
smaller batches (helpers of passes/early_exit.py; runtime in hwopt/exit_runtime.py).

`build_cascade` moves the nodes of each stage into a flat-tuple GraphModule, wires the stages
together by references (the cascade's inputs, earlier stages' outputs) and replaces all of them
in the parent graph by one ``call_module`` of an `ExitCascade`. Graphs captured with static
shapes carry the batch size in their view/expand/factory shapes; `specialize` rewrites the
leading entry of those shapes for a smaller batch, and `build_cascade` keeps a variant only when
it reproduces the full-batch rows on recorded inputs, so a batch can be compacted as samples
leave. A stage whose graph does not specialise runs padded to the full batch instead.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.fx as fx

from hwopt.exit_runtime import ExitCascade, ExitPoint, Stage, StageVariant
from hwopt.graph import propagate_meta

log = logging.getLogger("hwopt")
aten = torch.ops.aten
# shape argument index of the ops whose shapes may carry the batch size
_SHAPE_ARG = {aten.view.default: 1, aten._unsafe_view.default: 1, aten.reshape.default: 1,
              aten.expand.default: 1, aten.new_zeros.default: 1, aten.new_ones.default: 1,
              aten.new_empty.default: 1, aten.new_full.default: 1, aten.zeros.default: 0,
              aten.ones.default: 0, aten.empty.memory_format: 0, aten.full.default: 0}


@dataclass
class CascadePlan:
    """What to cut: nodes per stage (graph order), the test after each stage as
    (kind, node, old node) or None, the stack nodes used after the cascade (its outputs), and
    per stage the node that stands for each output when a sample leaves there."""

    stages: list
    exits: list
    outputs: list
    fallback: list


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _batched(val, batch: int) -> bool:
    return isinstance(val, torch.Tensor) and val.dim() >= 1 and val.shape[0] == batch


def check(gm: fx.GraphModule, plan: CascadePlan, batch: int) -> str | None:
    """Why `plan` cannot be cut out of `gm`, or None."""
    inside = {n for s in plan.stages for n in s}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in inside:
        for u in n.users:
            if u not in inside and n not in plan.outputs:
                return f"{n.name} is used after the stack by {u.name} (not an exit output)"
    later, todo = set(), [u for n in inside for u in n.users if u not in inside]
    while todo:  # nodes outside the stack that depend on it
        n = todo.pop()
        if n not in later:
            later.add(n)
            todo.extend(n.users)
    last = max(order[n] for n in inside)
    for n in inside:
        for a in n.all_input_nodes:
            if a not in inside and a in later:
                return f"input {a.name} of the stack depends on the stack's own outputs"
    for u in later:
        if u.op != "output" and order[u] < last:
            return f"{u.name} uses the stack before its last node (not a contiguous region)"
    for o in plan.outputs:
        if not _batched(_val(o), batch):
            return f"output {o.name} has no leading batch dimension of size {batch}"
    return None


def record_values(gm: fx.GraphModule, inputs) -> dict:
    """Real values of every node of `gm` on `inputs`."""
    values: dict = {}

    class Rec(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            values[n] = out
            return out

    with torch.no_grad():
        Rec(gm).run(*inputs)
    return values


def _subgraph(gm: fx.GraphModule, nodes, inputs, outputs) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict = {}
    for a in inputs:
        env[a] = graph.placeholder(a.name)
        env[a].meta = dict(a.meta)
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in env and a.op == "get_attr":
                env[a] = graph.get_attr(a.target)
                env[a].meta = dict(a.meta)
        env[n] = graph.node_copy(n, env.__getitem__)
    graph.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(gm, graph, class_name="ExitStage")


def _wiring(plan: CascadePlan):
    """Per stage: its input nodes and the nodes it must hand on (outputs)."""
    inside = {n: k for k, s in enumerate(plan.stages) for n in s}
    needed = set(plan.outputs)
    for e in plan.exits:
        if e is not None:
            needed |= {x for x in e[1:] if x is not None}
    for fb in plan.fallback:
        needed |= {x for x in fb if x is not None}
    wiring = []
    for k, nodes in enumerate(plan.stages):
        mine = set(nodes)
        ins = []
        for n in nodes:
            for a in n.all_input_nodes:
                if a not in mine and a.op != "get_attr" and a not in ins:
                    ins.append(a)
        outs = [n for n in nodes if n in needed or any(
            u not in mine and inside.get(u, -1) > k for u in n.users)]
        wiring.append((ins, outs))
    return wiring


def build_cascade(gm: fx.GraphModule, plan: CascadePlan, values: dict, batch: int,
                  buckets: tuple | None, threshold: float) -> tuple[ExitCascade, list, list]:
    """Cut `plan` out of `gm` into an ExitCascade called where the stack ended.
    `values`: real values of the stack's inputs and nodes on the example inputs.
    Returns (cascade, its input nodes, per-stage notes on batch specialisation)."""
    inside = {n for s in plan.stages for n in s}
    wiring = _wiring(plan)
    ext = []
    for ins, _ in wiring:
        ext += [a for a in ins if a not in inside and a not in ext]
    ref = {a: ("x", i) for i, a in enumerate(ext)}
    ref.update({n: ("c", n.name) for n in inside})
    batched = {ref[n]: _batched(_val(n), batch) for n in list(ext) + list(inside)}
    stages, notes, scores, names = [], [], [], []
    for k, (ins, outs) in enumerate(wiring):
        sub = _subgraph(gm, plan.stages[k], ins, outs)
        example = [values[a] for a in ins]
        score = _add_score(sub, plan.exits[k], example, k) if plan.exits[k] else None
        out_names = [o.name for o in outs] + ([score] if score else [])
        if score:
            batched[("c", score)] = True
        variants, note = _variants(sub, example, batch, buckets)
        notes.append(note)
        stages.append(Stage(variants, [batched[ref[a]] for a in ins],
                            [batched[("c", n)] for n in out_names]))
        scores.append(("c", score) if score else None)
        names.append(out_names)
    exits = [None if e is None else ExitPoint(
        e[0], ref[e[1]], ref[e[2]] if e[2] is not None else None,
        tuple(ref[f] if f is not None else None for f in fb), sc)
        for e, fb, sc in zip(plan.exits, plan.fallback, scores)]
    producer = [next(k for k, s in enumerate(plan.stages) if o in s) for o in plan.outputs]
    out_meta = [(tuple(_val(o).shape), _val(o).dtype) for o in plan.outputs]
    cascade = ExitCascade(stages, [([ref[a] for a in ins], out_names)
                                   for (ins, _), out_names in zip(wiring, names)],
                          exits, [ref[o] for o in plan.outputs], producer, batch, batched,
                          out_meta, threshold)
    return cascade, ext, notes


def _add_score(sub: fx.GraphModule, exit_at: tuple, example: list, k: int) -> str | None:
    """Append the exit score of the samples to the stage's outputs, so that it is computed in
    the compiled stage rather than by a few PyTorch ops on the host: the cosine similarity of
    the hidden states before and after the stage, or the softmax confidence of the head.
    Returns the output's name, or None (scores stay on the host) when a value the score needs
    is not in the stage."""
    kind, new, old = exit_at
    here = {n.name: n for n in sub.graph.nodes}
    if new.name not in here or (kind == "similarity" and old.name not in here):
        return None
    out = next(n for n in sub.graph.nodes if n.op == "output")
    g, f = sub.graph, torch.ops.aten
    with g.inserting_before(out):
        x = g.call_function(f.flatten.using_ints, (here[new.name], 1))
        if _val(new).dtype != torch.float32:
            x = g.call_function(f._to_copy.default, (x,), {"dtype": torch.float32})
        if kind == "similarity":
            y = g.call_function(f.flatten.using_ints, (here[old.name], 1))
            if _val(old).dtype != torch.float32:
                y = g.call_function(f._to_copy.default, (y,), {"dtype": torch.float32})
            dot = g.call_function(f.sum.dim_IntList, (g.call_function(f.mul.Tensor, (x, y)),
                                                      [1]))
            nx = g.call_function(f.sum.dim_IntList, (g.call_function(f.mul.Tensor, (x, x)),
                                                     [1]))
            ny = g.call_function(f.sum.dim_IntList, (g.call_function(f.mul.Tensor, (y, y)),
                                                     [1]))
            norm = g.call_function(f.sqrt.default, (g.call_function(f.mul.Tensor, (nx, ny)),))
            score = g.call_function(f.div.Tensor, (dot, g.call_function(
                f.clamp_min.default, (norm, 1e-8))))
        else:
            prob = g.call_function(f._softmax.default, (x, -1, False))
            score = g.call_function(f.amax.default, (prob, [-1]))
    score._rename(f"_hwopt_exit_score_{k}")
    out.args = (tuple(out.args[0]) + (score,),)
    g.lint()
    sub.recompile()
    propagate_meta(sub, example)
    return score.name


def rewrite(gm: fx.GraphModule, plan: CascadePlan, cascade: ExitCascade, ext: list,
            name: str = "_hwopt_exit_cascade") -> None:
    """Replace the stack's nodes by one call of `cascade` (kept in PyTorch)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    nodes = sorted({n for s in plan.stages for n in s}, key=order.__getitem__)
    gm.add_submodule(name, cascade)
    with gm.graph.inserting_after(nodes[-1]):
        call = gm.graph.call_module(name, tuple(ext))
    call.meta["val"] = tuple(_val(o) for o in plan.outputs)
    call.meta["hwopt_keep_in_torch"] = True
    for j, o in enumerate(plan.outputs):
        with gm.graph.inserting_after(call):
            item = gm.graph.call_function(__import__("operator").getitem, (call, j))
        item.meta["val"] = _val(o)
        o.replace_all_uses_with(item)
    for n in reversed(nodes):
        gm.graph.erase_node(n)
    gm.graph.eliminate_dead_code()
    gm.recompile()


# -- batch specialisation --------------------------------------------------------------------
def _variants(sub: fx.GraphModule, example: list, batch: int, buckets):
    """Batch-size variants of one stage that reproduce the full-batch rows; always the full.
    A size the stage does not specialise to is left out (a batch that size is padded)."""
    full = {batch: StageVariant(sub, batch, example)}
    sizes = sorted({b for b in (buckets or candidates(batch)) if 0 < b < batch})
    if batch < 2 or not sizes:
        return full, "batch 1: no compaction needed" if batch < 2 else "no smaller buckets"
    with torch.no_grad():
        want = _as_tuple(sub(*example))
    failed = []
    for b in sizes:
        small = [x[:b] if _batched(x, batch) else x for x in example]
        var = specialize(sub, batch, b, example)
        try:
            with torch.no_grad():
                got = _as_tuple(var(*small))
            ok = all(_rows_match(g, w, batch, b) for g, w in zip(got, want))
        except Exception as e:  # noqa: BLE001 - a stage that does not specialise is padded
            log.debug("hwopt: early_exit stage does not run at batch %d: %s", b, e)
            ok = False
        if not ok:
            failed.append(b)
            continue
        propagate_meta(var, small)
        full[b] = StageVariant(var, b, small)
    note = f"batch sizes {sorted(full)}"
    return full, note + (f" (does not specialise to {failed}: padded)" if failed else "")


def candidates(batch: int) -> list[int]:
    """Sizes a stage may be specialised for: those of `hwopt.dynamic.buckets.candidates` below
    `batch` (every size up to 8, then each under a quarter larger than the one before)."""
    from hwopt.dynamic.buckets import candidates as sizes

    return [b for b in sizes(batch) if b < batch]


def choose_variants(cascade, cost_model, max_variants: int, min_gain: float = 0.01) -> str:
    """Keep, per stage, the batch sizes that pay on the observed run: ``cascade.stats.active``
    (rows still running when the stage ran, per call, from the calibration run) weighted by
    the cost model's latency of each variant, chosen as shape buckets are
    (`hwopt.dynamic.buckets.choose`: up to `max_variants` sizes, each further one only while it
    cuts the expected latency by `min_gain`); unused variants are dropped before lowering (no
    build for them). A small prior over all sizes keeps a variant for counts not seen."""
    from hwopt.dynamic.buckets import choose

    notes = []
    for k, stage in enumerate(cascade.stages):
        seen = cascade.stats.active[k]
        full = max(stage.sizes)
        if len(stage.sizes) == 1:
            continue
        if not seen:  # never reached on calibration: powers of two, as a plain default
            stage.keep([b for b in stage.sizes if b & (b - 1) == 0])
            notes.append(f"{k}: {stage.sizes} (not reached)")
            continue
        try:
            lat = {b: float(cost_model.graph_cost(stage.variants[f"b{b}"].graph).latency_s)
                   for b in stage.sizes}
        except Exception as e:  # noqa: BLE001 - keep every variant when the model cannot say
            log.debug("hwopt: early_exit: no cost for stage %d variants: %s", k, e)
            continue
        calls = sum(seen.values())
        prior = 0.05 * calls / full if any(n < full for n in seen) else 0.0
        weights = {n: seen.get(n, 0) + prior for n in range(1, full + 1)}
        chosen = choose(lat, full, max_variants, weights, min_gain)
        stage.keep(chosen)
        notes.append(f"{k}: {chosen}")
    if not notes:
        return "batch sizes: no stage ran on fewer rows"
    return "batch sizes kept by the cost model on the calibration run: " + "; ".join(notes)


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _rows_match(got, want, batch: int, b: int) -> bool:
    if not isinstance(want, torch.Tensor):
        return got == want
    if _batched(want, batch):
        want = want[:b]
    if got.shape != want.shape:
        return False
    scale = float(want.abs().max()) if want.numel() else 0.0
    return bool(((got - want).abs() <= 1e-4 * max(scale, 1.0)).all())


def specialize(sub: fx.GraphModule, batch: int, b: int, example: list | None = None
               ) -> fx.GraphModule:
    """A copy of `sub` whose shape arguments say batch `b` where they said `batch`: the leading
    entry of a view/reshape/expand/factory shape, when it is a multiple of `batch` and the
    tensor it shapes comes from the inputs (weights keep their shapes; an expand that
    broadcasts a weight to the batch is rescaled). With `example` (the stage's inputs), a
    constant with a leading batch dimension whose rows are all equal (an attention mask built
    from ``ones``, folded) is sliced to `b` rows where non-constant code uses it."""
    graph = copy.deepcopy(sub.graph)
    cuts = _slice_batched_constants(sub, graph, batch, b, example) if example else set()
    const: set = set()
    for n in graph.nodes:
        if n.op == "get_attr" or (n.op == "call_function" and n.all_input_nodes and n not in cuts
                                  and all(a in const for a in n.all_input_nodes)):
            const.add(n)
        idx = _SHAPE_ARG.get(n.target) if n.op == "call_function" else None
        if idx is None or len(n.args) <= idx or not n.args[idx]:
            continue
        shape = list(n.args[idx])
        lead = shape[0]
        if not isinstance(lead, int) or lead <= 0 or lead % batch:
            continue
        src = n.args[0] if idx == 1 else None
        if isinstance(src, fx.Node) and src in const:
            sv = _val(src)
            broadcasts = (n.target is aten.expand.default and isinstance(sv, torch.Tensor)
                          and (sv.dim() < len(shape) or sv.shape[0] == 1))
            if not broadcasts:
                continue
            const.discard(n)
        shape[0] = lead // batch * b
        n.args = n.args[:idx] + (shape,) + n.args[idx + 1:]
    graph.lint()
    return fx.GraphModule(sub, graph, class_name="ExitStage")


def _slice_batched_constants(sub, graph: fx.Graph, batch: int, b: int, example: list) -> set:
    """Insert ``slice(c, 0, 0, b)`` between each constant of `graph` (a copy of `sub.graph`;
    node names match) that has a leading batch dimension with equal rows and its non-constant
    users. Returns the inserted nodes."""
    const: set = set()
    for n in graph.nodes:
        if n.op == "get_attr" or (n.op == "call_function" and n.all_input_nodes and all(
                a in const for a in n.all_input_nodes)):
            const.add(n)
    bounds = [n for n in graph.nodes if n in const and _batched(_val(n), batch)
              and any(u not in const for u in n.users)]
    if not bounds:
        return set()
    values = {n.name: v for n, v in record_values(sub, example).items()}
    cuts = set()
    for n in bounds:
        v = values.get(n.name)
        if not isinstance(v, torch.Tensor) or not torch.equal(v, v[:1].expand_as(v)):
            continue
        users = [u for u in n.users if u not in const]
        with graph.inserting_after(n):
            cut = graph.call_function(aten.slice.Tensor, (n, 0, 0, b))
        cut.meta["val"] = v[:b]
        cuts.add(cut)
        for u in users:
            u.replace_input_with(n, cut)
    return cuts
