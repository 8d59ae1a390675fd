"""Grouped experts for the ``split`` pass: a chain of per-expert dispatches -> one network.

A mixture of experts written as a loop over experts (``sel = (idx == e).nonzero()``,
``out = out.index_add(0, sel, expert(x[sel]))``) becomes, after `split_islands`, one `IslandOp`
per expert, each with its own padded `Bucketed` network: E small matmuls per layer, each padded
to its bucket. When the experts' networks are the same code with different weights, this step
merges the chain into one `IslandOp`:

    sels (one per expert, as before) -> group_rows: rows laid out by expert, in tiles
      -> gather the inputs (index_select / group_gather) -> one Bucketed network in which each
      per-expert linear layer is ``hwopt::grouped_mm`` over the stacked weights
      -> scatter_rows: add each row's result into the accumulator

so each layer is one kernel over all routed rows (hwopt.lowering.grouped) and one set of buckets
serves all experts. The host functions are in hwopt.dynamic.grouped. Runs inside
`passes.split.split_graph` after the islands are wrapped (``pass_config={'split':
{'group_experts': False}}`` keeps one island per expert). A chain whose networks differ in
structure, or in a constant other than a linear layer's weight and bias, is left as it is.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from hwopt.dynamic import buckets as bk
from hwopt.dynamic.control import IslandOp
from hwopt.dynamic.grouped import group_gather, group_rows, scatter_rows
from hwopt.graph import constant_value

from .split_islands import _base, choose_buckets

TILE = 4  # rows per tile of one expert: the grouped matmul's register-tile height
_MATMULS = ("addmm", "mm", "linear")


@dataclass
class _Dispatch:
    """One expert's island: ``acc.index_put_([sel], net(*[src[sel] for src in gathers]))``."""

    call: fx.Node  # the IslandOp call in the parent graph
    op: IslandOp
    sel: fx.Node  # the routed row indices (inside the island graph)
    sel_nodes: list  # the nodes computing them, in order
    gathers: list  # island placeholders gathered by sel, one per network input
    acc: fx.Node  # the accumulator placeholder
    net: bk.Bucketed

    def outer(self, ph: fx.Node) -> fx.Node:
        """The parent-graph node that feeds island placeholder `ph`."""
        phs = [n for n in self.op.graph.graph.nodes if n.op == "placeholder"]
        return self.call.args[phs.index(ph)]


def _dispatch(parent: fx.GraphModule, call: fx.Node) -> _Dispatch | None:
    if call.op != "call_module" or not isinstance(op := parent.get_submodule(str(call.target)),
                                                 IslandOp):
        return None
    nodes = list(op.graph.graph.nodes)
    outs = nodes[-1].args[0]
    if len(outs) != 1:
        return None
    put = outs[0]
    if not isinstance(put, fx.Node):
        return None
    if _base(put) == "index_put" and len(put.args) >= 4 and put.args[3] is True and len(
            put.args[1]) == 1:
        acc, sel, val = put.args[0], put.args[1][0], put.args[2]
    elif _base(put) == "index_add" and len(put.args) == 4 and put.args[1] == 0 and not put.kwargs:
        acc, sel, val = put.args[0], put.args[2], put.args[3]
    else:
        return None
    if acc.op != "placeholder" or val.target is not operator.getitem or val.args[1] != 0:
        return None
    seg = val.args[0]
    net = op.graph.get_submodule(str(seg.target)) if seg.op == "call_module" else None
    if not isinstance(net, bk.Bucketed) or net.dyn_out != (0,) or not net.buckets:
        return None
    gathers = []
    for a in seg.args:
        if not (isinstance(a, fx.Node) and _base(a) == "index_select" and a.args[1] == 0
                and a.args[2] is sel and a.args[0].op == "placeholder"):
            return None
        gathers.append(a.args[0])
    sel_nodes = _ancestors(sel)
    used = set(sel_nodes) | {seg, val, put} | {a for a in seg.args}
    for n in nodes:  # anything else must be a size check (no tensor result)
        if n.op in ("call_function", "call_module") and n not in used and isinstance(
                n.meta.get("val"), torch.Tensor):
            return None
    return _Dispatch(call, op, sel, sel_nodes, gathers, acc, net)


def _ancestors(node: fx.Node) -> list[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen or n.op == "placeholder":
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return [n for n in node.graph.nodes if n in seen]


def _chains(gm: fx.GraphModule) -> list[list[_Dispatch]]:
    """Runs of dispatches where each adds into the previous one's result (and nothing else
    reads that intermediate)."""
    chains: list[list[_Dispatch]] = []
    for node in gm.graph.nodes:
        d = _dispatch(gm, node)
        if d is None:
            continue
        prev = chains[-1][-1] if chains else None
        acc = d.outer(d.acc)
        if prev is not None and acc.target is operator.getitem and acc.args[0] is prev.call \
                and list(prev.call.users) == [acc] and list(acc.users) == [d.call]:
            chains[-1].append(d)
        else:
            chains.append([d])
    return [c for c in chains if len(c) > 1]


def _signature(gm: fx.GraphModule) -> list:
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}

    def ref(a):
        return ("node", pos[a])

    sig = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            v = n.meta.get("val")
            sig.append(("ph", getattr(v, "dtype", None), tuple(getattr(v, "shape", ()))[1:]))
        elif n.op == "get_attr":
            v = constant_value(gm, n)
            sig.append(("const", tuple(v.shape), v.dtype))
        else:
            sig.append((n.op, n.target, fx.node.map_arg(n.args, ref),
                        fx.node.map_arg(n.kwargs, ref)))
    return sig


def _const_values(gm: fx.GraphModule) -> dict[int, torch.Tensor]:
    """The value of every node computed from constants only, by position."""
    vals, pos = {}, {}
    for i, n in enumerate(gm.graph.nodes):
        pos[n] = i
        if n.op == "get_attr":
            vals[i] = constant_value(gm, n)
        elif n.op == "call_function" and n.all_input_nodes and all(
                pos[a] in vals for a in n.all_input_nodes):
            args = fx.node.map_arg(n.args, lambda a: vals[pos[a]])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: vals[pos[a]])
            vals[i] = n.target(*args, **kwargs)
    return vals


def grouped_network(nets: list[fx.GraphModule], tile: int = TILE):
    """One network for all `nets` (same code, own weights), with a last input ``group``
    (int32, the expert of each row): linear layers whose weights differ become
    ``hwopt::grouped_mm`` over the stacked weights. (GraphModule, grouped matmuls), or the
    reason it cannot be built."""
    from hwopt.lowering import grouped  # noqa: F401 - registers hwopt::grouped_mm

    sigs = [_signature(n) for n in nets]
    if any(s != sigs[0] for s in sigs[1:]):
        return "the experts' networks differ in structure"
    vals = [_const_values(n) for n in nets]
    nodes = list(nets[0].graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    graph, env, root = fx.Graph(), {}, torch.nn.Module()

    def const(t: torch.Tensor) -> fx.Node:
        name = f"_w{len(root._buffers)}"
        root.register_buffer(name, t.detach().contiguous())
        return graph.get_attr(name)

    def same(i: int) -> bool:
        return all(torch.equal(v[i], vals[0][i]) for v in vals[1:])

    def arg(a):
        if pos[a] in vals[0]:
            if not same(pos[a]):
                raise _Differs(a)
            return const(vals[0][pos[a]])
        return env[a]

    for n in nodes:
        if n.op == "placeholder":
            env[n] = graph.placeholder(n.name)
    group = graph.placeholder("group")
    count = 0
    try:
        for n in nodes:
            if n.op == "placeholder" or pos[n] in vals[0]:
                continue
            if n.op == "output":
                graph.output(fx.node.map_arg(n.args[0], arg))
                continue
            gmm = _as_grouped(n, pos, vals, env, group, tile, const)
            if gmm is not None:
                env[n] = gmm
                count += 1
                continue
            env[n] = graph.node_copy(n, arg)
    except _Differs as e:
        return f"the experts differ in a constant that is not a linear layer's ({e.args[0].name})"
    for n in graph.nodes:  # the per-expert symbolic shapes do not hold here: cost per bucket
        n.meta.pop("val", None)
    return fx.GraphModule(root, graph, class_name="GroupedExperts"), count


class _Differs(Exception):
    pass


def _as_grouped(n, pos, vals, env, group, tile, const):
    """A grouped_mm node for linear layer `n` if its weights differ between experts."""
    name = _base(n)
    if n.op != "call_function" or name not in _MATMULS or n.kwargs:
        return None
    if name == "addmm":
        bias, x, w = n.args[:3]
        if len(n.args) > 3:
            return None
    elif name == "mm":
        (x, w), bias = n.args, None
    else:
        x, w, bias = (*n.args, None)[:3]
    consts = [a for a in (w, bias) if a is not None]
    if not isinstance(x, fx.Node) or pos[x] in vals[0] or any(
            not isinstance(a, fx.Node) or pos[a] not in vals[0] for a in consts):
        return None
    if all(all(torch.equal(v[pos[a]], vals[0][pos[a]]) for v in vals[1:]) for a in consts):
        return None  # the same weights everywhere: a plain layer

    def weight(v):
        t = v[pos[w]]
        return t.t() if name == "linear" else t

    ws = torch.stack([weight(v) for v in vals])
    if ws.dim() != 3:
        return None
    bs = None
    if bias is not None:
        bs = torch.stack([v[pos[bias]].reshape(-1).expand(ws.shape[-1]) for v in vals])
    gmm = torch.ops.hwopt.grouped_mm.default
    graph = group.graph
    return graph.call_function(gmm, (env[x], const(ws), None if bs is None else const(bs),
                                     group, tile))


def group_experts(gm: fx.GraphModule, cfg, target, prefix: str = "") -> list[str]:
    """Merge each chain of expert dispatches of `gm` (in place); returns notes."""
    notes = []
    for i, chain in enumerate(_chains(gm)):
        name = f"{prefix}_hwopt_experts_{i}"
        notes.append(_merge(gm, chain, name, cfg, target))
    if notes:
        gm.graph.lint()
        gm.recompile()
    return notes


def _merge(gm: fx.GraphModule, chain: list[_Dispatch], name: str, cfg, target) -> str:
    islands = ", ".join(str(d.call.target) for d in chain)
    built = grouped_network([d.net.sub for d in chain])
    if isinstance(built, str):
        return f"experts {islands} kept apart: {built}"
    net, count = built
    acc = chain[0].outer(chain[0].acc)
    rows_of = [_rows(d.outer(p)) for d in chain for p in d.gathers] + [_rows(acc)]
    if None in rows_of or len(set(rows_of)) != 1:
        return f"experts {islands} kept apart: sources and accumulator differ in rows"
    rows, experts = rows_of[0], len(chain)
    n_max = (rows + experts * (TILE - 1)) // TILE * TILE
    examples = [torch.zeros((n_max, *_val(d0).shape[1:]), dtype=_val(d0).dtype)
                for d0 in (chain[0].outer(p) for p in chain[0].gathers)]
    examples.append(torch.zeros(n_max, dtype=torch.int32))
    dyn_in = tuple(range(len(examples)))
    sizes = [s for s in bk.candidates(n_max) if s % TILE == 0]
    chosen, how, lat = choose_buckets(net, examples, dyn_in, sizes, n_max, cfg, target)
    bucketed = bk.Bucketed(net, dyn_in, (0,), chosen, how, lat, cfg.max_buckets)
    graph, inputs = _island_graph(chain, rows)
    root = torch.nn.Module()
    root.net = bucketed
    island = fx.GraphModule(root, graph, class_name=name)
    last = chain[-1].call
    gm.add_submodule(name, IslandOp(island, chain[-1].op.out_meta))
    with gm.graph.inserting_before(last):
        call = gm.graph.call_module(name, tuple(inputs))
    call.meta = dict(last.meta)
    call.meta["hwopt_keep_in_torch"] = True
    last.replace_all_uses_with(call)
    for d in reversed(chain):
        for u in list(d.call.users):
            gm.graph.erase_node(u)
        gm.graph.erase_node(d.call)
        delattr(gm, str(d.call.target))
    return (f"experts {islands} -> {name}: one network for {experts} experts "
            f"({count} grouped matmuls), rows <= {n_max} in tiles of {TILE}, buckets {chosen} "
            f"({how})")


def _val(node: fx.Node):
    return node.meta.get("val")


def _rows(node: fx.Node) -> int | None:
    v = _val(node)
    if isinstance(v, torch.Tensor) and v.dim() > 0 and isinstance(v.shape[0], int):
        return int(v.shape[0])
    return None


def _island_graph(chain: list[_Dispatch], rows: int) -> tuple[fx.Graph, list[fx.Node]]:
    """The merged island: selectors, layout, gathers, the grouped network, scatter."""
    graph, outer_ph = fx.Graph(), {}
    wanted = [d.outer(a) for d in chain for n in d.sel_nodes for a in n.all_input_nodes
              if a.op == "placeholder"]
    wanted += [chain[0].outer(chain[0].acc)] + [d.outer(p) for d in chain for p in d.gathers]
    for node in wanted:  # placeholders first, in the order of the call's arguments
        if node not in outer_ph:
            outer_ph[node] = graph.placeholder(node.name)
            outer_ph[node].meta = dict(node.meta)
    ph = outer_ph.__getitem__

    sels = []
    for d in chain:
        local: dict = {}
        for n in d.sel_nodes:
            local[n] = graph.node_copy(n, lambda a, d=d, local=local: local[a] if a in local
                                       else ph(d.outer(a)))
        sels.append(local[d.sel])
    acc = ph(chain[0].outer(chain[0].acc))
    lay = graph.call_function(group_rows, (sels, TILE, rows))
    src, group, flat, dst = (graph.call_function(operator.getitem, (lay, i)) for i in range(4))
    inputs = []
    for j in range(len(chain[0].gathers)):
        srcs = [ph(d.outer(d.gathers[j])) for d in chain]
        if all(s is srcs[0] for s in srcs):
            inputs.append(graph.call_function(torch.ops.aten.index_select.default,
                                              (srcs[0], 0, src)))
        else:
            inputs.append(graph.call_function(group_gather, (srcs, flat)))
    net = graph.call_module("net", (*inputs, group))
    y = graph.call_function(operator.getitem, (net, 0))
    graph.output((graph.call_function(scatter_rows, (acc, dst, y)),))
    return graph, list(outer_ph)
