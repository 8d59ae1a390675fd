"""Data-dependent-shape islands for the ``split`` pass (passes/split.py).

An island is a connected set of nodes whose sizes depend on data (unbacked sizes from torch.export:
``nonzero``, boolean-mask indexing, the tokens routed to one expert of a mixture-of-experts),
closed with the nodes that bring shapes back to static (an ``index_put`` / ``index_add`` into a
static tensor). It is cut out into an `hwopt.dynamic.control.IslandOp` (run in PyTorch, so the
gather/scatter and the size checks run on the host) and inside it each group of row-wise compute
on the dynamic rows becomes a `hwopt.dynamic.buckets.Bucketed` network, compiled at a few padded
sizes chosen by the cost model.
"""
from __future__ import annotations

import logging
import math
import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase

from hwopt.dynamic import buckets as bk
from hwopt.dynamic.control import IslandOp

log = logging.getLogger("hwopt")
# Stay on the host inside an island: they make or consume the data-dependent sizes.
HOST_OPS = {"nonzero", "index_select", "index_put", "index", "index_add", "gather", "scatter",
            "scatter_add", "masked_select", "masked_scatter", "_assert_scalar", "sym_size",
            "sym_constrain_range_for_size", "_local_scalar_dense", "item", "masked_fill"}


def _base(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def _unbacked(node: fx.Node) -> bool:
    v = node.meta.get("val")
    if isinstance(v, torch.Tensor):
        return any(free_unbacked_symbols(s) for s in v.shape)
    if isinstance(v, (torch.SymInt, torch.SymBool, torch.SymFloat)):
        return bool(free_unbacked_symbols(v))
    return False


def find_islands(gm: fx.GraphModule, probe: bool = False) -> list[list[fx.Node]]:
    """The islands of `gm` (nodes in graph order); `probe`: stop at the first one found."""
    dyn = {n for n in gm.graph.nodes if n.op == "call_function" and _unbacked(n)}
    if probe or not dyn:
        return [sorted(dyn, key=_order(gm).__getitem__)] if dyn else []
    for n in gm.graph.nodes:  # asserts and checks on the sizes belong with them
        if n.op == "call_function" and n not in dyn and any(a in dyn for a in n.all_input_nodes) \
                and not isinstance(n.meta.get("val"), torch.Tensor):
            dyn.add(n)
    parent = {n: n for n in dyn}

    def find(n):
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    sinks: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        ins = [a for a in n.all_input_nodes if a in dyn]
        for a in ins[1:]:
            if n in dyn:
                parent[find(a)] = find(n)
        if n in dyn and ins:
            parent[find(ins[0])] = find(n)
        elif n not in dyn and ins and n.op == "call_function":  # a static result: the sink
            root = find(ins[0])
            for a in ins[1:]:
                parent[find(a)] = root
            sinks[n] = root
    groups: dict[fx.Node, set] = {}
    for n in dyn:
        groups.setdefault(find(n), set()).add(n)
    for s, root in sinks.items():
        groups.setdefault(find(root), set()).add(s)
    order = _order(gm)
    return [_close(gm, g, order) for g in groups.values()]


def _order(gm):
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def _close(gm, group: set, order: dict) -> list[fx.Node]:
    """Add the nodes between island nodes (no cycle through the outside) and the constant-only
    nodes (weight transposes) that only the island uses."""
    changed = True
    while changed:
        changed = False
        first = min(order[n] for n in group)
        for n in list(group):
            for a in n.all_input_nodes:
                if a in group or a.op != "call_function" or order[a] < first:
                    continue
                if _depends_on(a, group, first, order) or _const_only(a):
                    group.add(a)
                    changed = True
        for n in list(group):
            for a in n.all_input_nodes:
                if a not in group and a.op == "call_function" and _const_only(a) and all(
                        u in group for u in a.users):
                    group.add(a)
                    changed = True
    return sorted(group, key=order.__getitem__)


def _depends_on(node, group, first, order) -> bool:
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in group:
            return True
        if n in seen or order.get(n, -1) < first:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return False


def _const_only(node: fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    return node.op == "call_function" and bool(node.all_input_nodes) and all(
        _const_only(a) for a in node.all_input_nodes)


def extract(gm: fx.GraphModule, nodes: list[fx.Node], name: str, make) -> fx.Node:
    """Move `nodes` into a GraphModule (flat tuple out; constants copied in) and call it as
    submodule `name` = make(sub, inputs, outputs) where the last node was; returns the call."""
    from hwopt.graph import constant_value

    inside = set(nodes)
    inputs, outputs = [], [n for n in nodes if any(u not in inside for u in n.users)]
    graph, env = fx.Graph(), {}
    sub_root = torch.nn.Module()
    for n in nodes:
        for a in n.all_input_nodes:
            if a in inside or a in env:
                continue
            if a.op == "get_attr":
                attr = f"_c{len(env)}"
                sub_root.register_buffer(attr, constant_value(gm, a).detach())
                env[a] = graph.get_attr(attr)
            else:
                inputs.append(a)
                env[a] = graph.placeholder(a.name)
            env[a].meta = dict(a.meta)
        env[n] = graph.node_copy(n, env.__getitem__)
    graph.output(tuple(env[o] for o in outputs))
    sub = fx.GraphModule(sub_root, graph, class_name=name)
    gm.add_submodule(name, make(sub, inputs, outputs))
    with gm.graph.inserting_after(nodes[-1]):
        call = gm.graph.call_module(name, tuple(inputs))
    call.meta["hwopt_keep_in_torch"] = True
    call.meta["val"] = tuple(o.meta.get("val") for o in outputs)
    for i, o in enumerate(outputs):
        with gm.graph.inserting_after(call):
            get = gm.graph.call_function(operator.getitem, (call, i))
        get.meta = dict(o.meta)
        o.replace_all_uses_with(get, delete_user_cb=lambda u, g=get: u is not g)
    for n in reversed(nodes):
        gm.graph.erase_node(n)
    return call


def wrap_island(gm: fx.GraphModule, nodes: list[fx.Node], name: str, cfg, target) -> str:
    outs = [n for n in nodes if any(u not in set(nodes) for u in n.users)]
    meta = []
    for o in outs:
        v = o.meta.get("val")
        if not isinstance(v, torch.Tensor) or free_unbacked_symbols(v):
            return f"island at {nodes[0].name} left as is: its output {o.name} is not static"
        meta.append((tuple(v.shape), v.dtype))
    segments: list[str] = []

    def make(sub, inputs, outputs):
        segments.extend(_bucket_segments(sub, cfg, target))
        return IslandOp(sub, meta)

    extract(gm, nodes, name, make)
    return (f"data-dependent island {name} ({len(nodes)} nodes) -> host dispatcher; "
            + ("; ".join(segments) if segments else "no row-wise compute to compile"))


class _Compute(OperatorSupportBase):
    def is_node_supported(self, submodules, node: fx.Node) -> bool:
        from hwopt.lowering.partition import unsupported_reason

        if node.op != "call_function" or _base(node) in HOST_OPS or node.target is operator.getitem:
            return False
        if unsupported_reason(node) is not None or any(
                isinstance(a, torch.SymInt) or (isinstance(a, fx.Node) and not isinstance(
                    a.meta.get("val"), torch.Tensor)) for a in node.args):
            return False
        v = node.meta.get("val")
        return isinstance(v, torch.Tensor) and (_const_only(node) or (
            v.dim() > 0 and free_unbacked_symbols(v.shape[0])))


def _bucket_segments(island: fx.GraphModule, cfg, target) -> list[str]:
    """Replace row-wise compute on the dynamic rows inside `island` by Bucketed networks."""
    notes = []
    parts = CapabilityBasedPartitioner(island, _Compute(), allows_single_node_partition=True)
    for i, p in enumerate(parts.propose_partitions()):
        nodes = sorted(p.nodes, key=_order(island).__getitem__)
        if all(_const_only(n) for n in nodes) or all(
                _base(n) in ("view", "squeeze", "unsqueeze", "permute", "t") for n in nodes):
            continue
        why = bk.row_independent(nodes) if cfg.pad else "padding off (pass_config pad=False)"
        if why is not None:
            notes.append(f"segment at {nodes[0].name} stays in PyTorch: {why}")
            continue
        note = []
        extract(island, nodes, f"seg_{i}", lambda sub, ins, outs, note=note: _bucketed(
            sub, ins, outs, cfg, target, note))
        notes += note
    island.graph.eliminate_dead_code()
    island.recompile()
    return notes


def _bucketed(sub, inputs, outputs, cfg, target, note: list):
    def dyn(n):
        v = n.meta.get("val")
        return isinstance(v, torch.Tensor) and v.dim() > 0 and bool(free_unbacked_symbols(
            v.shape[0]))

    dyn_in = tuple(i for i, a in enumerate(inputs) if dyn(a))
    dyn_out = tuple(i for i, o in enumerate(outputs) if dyn(o))
    sym = inputs[dyn_in[0]].meta["val"].shape[0] if dyn_in else None
    n_max = _upper(sym)
    if not dyn_in or n_max is None:
        note.append(f"{sub.__class__.__name__}: no bound on the dynamic rows; runs in PyTorch")
        return bk.Bucketed(sub, dyn_in or (0,), dyn_out, [])
    example = [_example(a, n_max) for a in inputs]
    chosen, how, lat = choose_buckets(sub, example, dyn_in, bk.candidates(n_max), n_max, cfg,
                                      target)
    note.append(f"{sub.__class__.__name__}: rows <= {n_max}, buckets {chosen} ({how})")
    return bk.Bucketed(sub, dyn_in, dyn_out, chosen, how, lat, cfg.max_buckets)


def choose_buckets(sub, example: list, dyn_in: tuple, sizes: list[int], n_max: int, cfg,
                   target) -> tuple[list[int], str, dict | None]:
    """(bucket sizes, how they were chosen, predicted latency per size) for `sub` with the
    target's cost model, or the largest size alone without a target."""
    if target is None:
        return [n_max], "largest size only (no cost model)", None
    lat, how = bk.latencies(sub, example, dyn_in, sizes, target.cost_model)
    return bk.choose(lat, n_max, cfg.max_buckets), how, lat


def _upper(sym) -> int | None:
    if not isinstance(sym, torch.SymInt):
        return None
    node = sym.node
    rng = node.shape_env.var_to_range.get(node.expr) if node.shape_env else None
    up = getattr(rng, "upper", None)
    try:
        up = int(up)
    except (TypeError, ValueError, OverflowError):
        return None
    return up if 0 < up < math.inf else None


def _example(node: fx.Node, rows: int) -> torch.Tensor:
    v = node.meta["val"]
    shape = [rows if isinstance(s, torch.SymInt) else int(s) for s in v.shape]
    return torch.zeros(shape, dtype=v.dtype)
