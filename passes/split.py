"""split: data-dependent control flow -> static sub-networks plus a host dispatcher (lossless).

DyCL-style. The captured ATen graph (torch.export) keeps control flow as higher-order ops and
data-dependent shapes as unbacked sizes; neither lowers to one static TVM function. This pass
rewrites them into ``call_module`` nodes of `hwopt.dynamic.control` modules that stay in PyTorch
(the host dispatcher), each holding static FX sub-networks that hwopt.lowering compiles through
TVM like any graph (nested regions, as for lazy_cache):

- ``torch.cond`` -> `CondOp` (true / false branch networks; the predicate is read on the host);
- ``torch.while_loop`` -> `WhileOp` (condition and body networks);
- a data-dependent-shape island (``nonzero`` / boolean-mask routing as in mixture-of-experts,
  from the node that creates the unbacked size to the nodes whose shapes are static again) ->
  `IslandOp`: its gather/scatter stays in PyTorch and its row-wise compute becomes
  `hwopt.dynamic.buckets.Bucketed` networks compiled at a few padded sizes chosen by the cost
  model (at most ``max_buckets``; sizes above the largest run in PyTorch). A chain of such
  islands, one per expert of a mixture of experts with the same code and own weights, is merged
  into one island whose network runs every expert at once with grouped matmuls
  (passes/split_experts.py; ``group_experts=False`` keeps them apart).

Branch graphs get the constants they read as their own (weights are compile-time constants of
their TVM code), and are split recursively (a cond inside a loop body). Python ``if`` on a tensor
cannot be captured by torch.export: hwopt.compile says to write it with torch.cond; under
torch.compile Dynamo breaks the graph there and each side is compiled on its own.

Must run before shape propagation on static fake tensors (hwopt.compiler calls `split_dynamic`
first when the graph needs it); as a listed pass it is a no-op on an already split graph.
A graph without control flow is returned unchanged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx

from hwopt.dynamic.control import CondOp, WhileOp
from hwopt.pass_base import Pass, PassContext, PassResult, register_pass

from .split_experts import group_experts
from .split_islands import find_islands, wrap_island

log = logging.getLogger("hwopt")
HOPS = ("cond", "while_loop")


@dataclass(frozen=True)
class SplitConfig:
    max_buckets: int = 4  # compiled sizes per dynamic sub-network (bounds recompiles)
    max_iterations: int = 1_000_000  # a while_loop running longer raises (a runaway loop)
    pad: bool = True  # pad dynamic rows to buckets where row-independent; False: PyTorch
    group_experts: bool = True  # one grouped network for a chain of same-code experts


def _hop(node: fx.Node) -> str | None:
    if node.op != "call_function":
        return None
    name = getattr(node.target, "__name__", "")
    mod = getattr(node.target, "__module__", "") or ""
    return name if name in HOPS and "higher_order" in mod else None


def needs_split(gm: fx.GraphModule) -> bool:
    """Whether the graph has control flow or data-dependent shapes that `split` rewrites."""
    return any(_hop(n) for n in gm.graph.nodes) or bool(find_islands(gm, probe=True))


@register_pass("split", lossless=True, before=("fuse", "quantize", "lazy_cache"))
class Split(Pass):
    def __init__(self, **config):
        self.config = SplitConfig(**config)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if not needs_split(gm):
            return PassResult(gm, False, ["no control flow or data-dependent shapes: unchanged"])
        notes = split_graph(gm, self.config, ctx.target)
        return PassResult(gm, True, notes)


def split_graph(gm: fx.GraphModule, cfg: SplitConfig, target=None, prefix: str = "") -> list[str]:
    """Rewrite `gm` in place; returns notes."""
    notes = []
    for i, island in enumerate(find_islands(gm)):
        notes.append(wrap_island(gm, island, f"{prefix}_hwopt_island_{i}", cfg, target))
    if cfg.group_experts and cfg.pad:
        notes += group_experts(gm, cfg, target, prefix)
    counts = {"cond": 0, "while_loop": 0}
    for node in list(gm.graph.nodes):
        kind = _hop(node)
        if kind is None:
            continue
        name = f"{prefix}_hwopt_{kind}_{counts[kind]}"
        counts[kind] += 1
        if kind == "cond":
            _rewrite_cond(gm, node, name, cfg, target)
        else:
            _rewrite_while(gm, node, name, cfg, target)
        notes.append(f"{kind} {node.name} -> {name} (host dispatcher, branches compiled)")
    gm.graph.eliminate_dead_code()
    _drop_unused_graphs(gm)
    gm.recompile()
    return notes


def _out_meta(node: fx.Node) -> list:
    val = node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else (val,)
    out = []
    for v in vals:
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{node.name}: output without a tensor shape ({type(v).__name__})")
        if any(not isinstance(s, int) for s in v.shape):
            raise ValueError(f"{node.name}: output shape {tuple(v.shape)} is not static")
        out.append((tuple(v.shape), v.dtype))
    return out


def _branch(parent: fx.GraphModule, attr_node: fx.Node, operands: list, const_at: set,
            cfg: SplitConfig, target, name: str) -> fx.GraphModule:
    """A copy of a branch graph whose placeholders at `const_at` are the parent's constants."""
    from hwopt.graph import constant_value

    src = getattr(parent, str(attr_node.target))
    gm = fx.GraphModule(src, _copy_graph(src.graph))
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i in sorted(const_at):
        buf = f"_c{i}"
        gm.register_buffer(buf, constant_value(parent, operands[i]).detach())
        with gm.graph.inserting_before(phs[i]):
            get = gm.graph.get_attr(buf)
        get.meta = dict(phs[i].meta)
        phs[i].replace_all_uses_with(get)
        gm.graph.erase_node(phs[i])
    out = next(n for n in gm.graph.nodes if n.op == "output")
    vals = out.args[0]
    out.args = (tuple(vals) if isinstance(vals, (tuple, list)) else (vals,),)
    gm.recompile()
    split_graph(gm, cfg, target, prefix=name)  # nested control flow
    return gm


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    env: dict = {}
    out = new.graph_copy(graph, env)
    new.output(out)
    return new


def _consts(parent: fx.GraphModule, nodes: list, allowed: range) -> set:
    return {i for i in allowed if isinstance(nodes[i], fx.Node) and nodes[i].op == "get_attr"
            and isinstance(_attr(parent, nodes[i]), torch.Tensor)}


def _attr(parent, node):
    from hwopt.graph import constant_value

    try:
        return constant_value(parent, node)
    except AttributeError:
        return None


def _rewrite_cond(gm: fx.GraphModule, node: fx.Node, name: str, cfg, target) -> None:
    pred, t_node, f_node, operands = node.args[:4]
    operands = list(operands)
    const_at = _consts(gm, operands, range(len(operands)))
    t = _branch(gm, t_node, operands, const_at, cfg, target, name + "_t")
    f = _branch(gm, f_node, operands, const_at, cfg, target, name + "_f")
    gm.add_submodule(name, CondOp(t, f, _out_meta(node)))
    kept = [a for i, a in enumerate(operands) if i not in const_at]
    _replace(gm, node, name, (pred, *kept))


def _rewrite_while(gm: fx.GraphModule, node: fx.Node, name: str, cfg, target) -> None:
    c_node, b_node, carried, extra = node.args[:4]
    inputs = list(carried) + list(extra)
    const_at = _consts(gm, inputs, range(len(carried), len(inputs)))
    c = _branch(gm, c_node, inputs, const_at, cfg, target, name + "_c")
    b = _branch(gm, b_node, inputs, const_at, cfg, target, name + "_b")
    gm.add_submodule(name, WhileOp(c, b, len(carried), _out_meta(node), cfg.max_iterations))
    kept = [a for i, a in enumerate(inputs) if i not in const_at]
    _replace(gm, node, name, tuple(kept))


def _replace(gm: fx.GraphModule, node: fx.Node, name: str, args: tuple) -> None:
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(name, args)
    call.meta = dict(node.meta)
    call.meta["hwopt_keep_in_torch"] = True
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)


def _drop_unused_graphs(gm: fx.GraphModule) -> None:
    used = {str(n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for child, mod in list(gm.named_children()):
        if isinstance(mod, fx.GraphModule) and child not in used and (
                "graph" in child or child.startswith(("true_", "false_"))):
            delattr(gm, child)


def split_dynamic(gm: fx.GraphModule, opts) -> list[str]:
    """Called by hwopt.compiler before shapes are propagated: split when the graph needs it
    (control flow cannot be propagated on static fake tensors), unless HWOPT_DISABLE=split."""
    from hwopt.pass_manager import disabled_passes

    if "split" in disabled_passes() or not needs_split(gm):
        return []
    config = (opts.pass_config or {}).get("split") or {}
    notes = split_graph(gm, SplitConfig(**config), opts.target)
    for n in notes:
        log.info("hwopt: split: %s", n)
    return notes


__all__ = ["Split", "SplitConfig", "needs_split", "split_dynamic", "split_graph"]
