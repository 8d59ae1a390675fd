"""fuse, epilogue part: element-wise ops after a linear layer run on the linear's own 2-D output.

Part of the ``fuse`` pass (passes/fuse.py), on the canonical ATen graph. A ``Linear`` on a
``[B, S, F]`` activation captures as ``view -> addmm -> view [B, S, N]``, and its activation
(GELU, GPT-2's tanh-GELU chain) and residual ``add`` are applied to the 3-D view. In Relax that
view is a ``reshape`` between the matmul and its epilogue, and FuseOps does not fuse an injective
op into a matmul's output, so the epilogue becomes a kernel of its own that re-reads the whole
activation from memory. Here the element-wise ops move in front of the view (the view is free):

    addmm -> view3d -> gelu -> view2d -> addmm      =>  addmm -> gelu -> addmm
    addmm -> view3d -> [clone] -> add(., r)         =>  addmm -> add(., view2d(r)) -> view3d

so FuseOps fuses bias, activation and residual into the matmul kernel. Also removes ``clone``s of
contiguous tensors (a functional graph needs no defensive copies). Values are unchanged: the same
ops run on the same elements.
"""
from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_MM = (aten.addmm.default, aten.mm.default)
# Element-wise ops that may run on the 2-D form; tensor operands must be scalars, [N] rows or
# tensors of exactly the 3-D shape (viewed to 2-D).
_ELEMENTWISE = {aten.gelu.default, aten.relu.default, aten.tanh.default, aten.sigmoid.default,
                aten.silu.default, aten.erf.default, aten.exp.default, aten.neg.default,
                aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
                aten.pow.Tensor_Scalar, aten.hardtanh.default, aten.clamp.default,
                aten.minimum.default, aten.maximum.default, aten.where.self}


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def remove_contiguous_clones(gm: fx.GraphModule) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        if not _is(node, aten.clone.default) or node.kwargs.get("memory_format") not in (
                None, torch.contiguous_format):
            continue
        src = node.args[0]
        val = src.meta.get("val") if isinstance(src, fx.Node) else None
        if not isinstance(val, torch.Tensor) or not val.is_contiguous() or src.op == "placeholder" \
                or any(u.op == "output" for u in node.users):
            continue
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        count += 1
    return count


def _operand_ok(arg, nodes: set, shape3: tuple) -> bool:
    if not isinstance(arg, fx.Node):
        return True  # a Python scalar (or None)
    if arg in nodes:
        return True
    s = _shape(arg)
    if s is None:
        return False
    return s == shape3 or len(s) == 0 or (len(s) == 1 and s[0] in (1, shape3[-1]))


def _epilogue(view: fx.Node, shape3: tuple) -> list[fx.Node]:
    """The element-wise nodes reachable from `view` that can run on the 2-D form, in order."""
    nodes: set = {view}
    order: list[fx.Node] = []
    frontier = list(view.users)
    while frontier:
        node = frontier.pop(0)
        if node in nodes or not _is(node, *_ELEMENTWISE) or _shape(node) != shape3:
            continue
        args = list(node.args) + list(node.kwargs.values())
        if not all(_operand_ok(a, nodes, shape3) for a in args):
            continue
        nodes.add(node)
        order.append(node)
        frontier += list(node.users)
    # Topological order: a node whose operand in the set comes later is dropped (stays 3-D).
    done, kept = {view}, []
    for node in sorted(order, key=_position(view.graph)):
        if all(a in done or a not in nodes for a in node.all_input_nodes):
            done.add(node)
            kept.append(node)
    return kept


def _position(graph: fx.Graph):
    index = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: index[n]


def _move_views(gm: fx.GraphModule, mm: fx.Node, view: fx.Node) -> list[fx.Node]:
    shape2, shape3 = _shape(mm), _shape(view)
    epi = _epilogue(view, shape3)
    if not epi:
        return []
    graph, new = gm.graph, {view: mm}
    for node in epi:
        def flat(a, node=node):
            if a in new:
                return new[a]
            if isinstance(a, fx.Node) and _shape(a) == shape3:
                with graph.inserting_before(node):
                    v = graph.call_function(aten.view.default, (a, list(shape2)))
                v.meta = {**node.meta, "val": a.meta["val"].new_empty(shape2)}
                return v
            return a
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), flat)
        with graph.inserting_before(node):
            two = graph.call_function(node.target, args, kwargs)
        # Provenance (nn_module_stack, ...) stays: later passes find blocks by it (lazy_cache).
        two.meta = {**node.meta, "val": node.meta["val"].new_empty(shape2)}
        new[node] = two
    for node in epi:
        outside = [u for u in node.users if u not in new]
        if not outside:
            continue
        with graph.inserting_after(new[node]):
            back = graph.call_function(aten.view.default, (new[node], list(shape3)))
        back.meta = dict(node.meta)
        for u in outside:
            if _is(u, *_VIEWS) and _shape(u) == shape2:
                u.replace_all_uses_with(new[node])
            else:
                u.replace_input_with(node, back)
    return epi


_GELU_LIKE = {aten.gelu.default, aten.tanh.default, aten.erf.default}
_ACT = {aten.relu.default, aten.hardtanh.default, aten.clamp.default, aten.gelu.default,
        aten.silu.default, aten.sigmoid.default}


def _kind(epi: list[fx.Node], shape3: tuple) -> str:
    if any(n.target in _GELU_LIKE for n in epi):
        return "linear+GELU"
    if any(n.target is aten.add.Tensor and any(_shape(a) == shape3 and a not in epi
                                                for a in n.all_input_nodes) for n in epi):
        return "linear+residual add"
    return "linear+element-wise"


def count_conv_epilogues(gm: fx.GraphModule) -> int:
    """conv -> add(tensor) -> activation chains: the lowering fuses them as they are (NHWC conv
    kernel epilogue, hwopt.schedules.conv2d); counted for the pass notes."""
    count = 0
    for conv in gm.graph.nodes:
        if not _is(conv, aten.convolution.default) or len(conv.users) != 1:
            continue
        add = next(iter(conv.users))
        if not _is(add, aten.add.Tensor) or len(add.users) != 1:
            continue
        other = add.args[1] if add.args[0] is conv else add.args[0]
        if _shape(other) == _shape(conv) and _is(next(iter(add.users)), *_ACT):
            count += 1
    return count


def fuse_epilogues(gm: fx.GraphModule) -> dict[str, int]:
    """Run the rewrites above; returns counts per kind for the pass notes."""
    clones = remove_contiguous_clones(gm)
    kinds = {"linear+GELU": 0, "linear+residual add": 0, "linear+element-wise": 0}
    for mm in list(gm.graph.nodes):
        if not _is(mm, *_MM) or len(mm.users) != 1 or len(_shape(mm) or ()) != 2:
            continue
        view = next(iter(mm.users))
        if not _is(view, *_VIEWS):
            continue
        shape3 = _shape(view)
        epi = _move_views(gm, mm, view)
        if epi:
            kinds[_kind(epi, shape3)] += 1
    if sum(kinds.values()) or clones:
        gm.graph.eliminate_dead_code()
    return {**kinds, "contiguous clones removed": clones}
