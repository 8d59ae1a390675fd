"""Which kernels a subgraph becomes once hwopt lowers it, and which tensors each kernel moves.

Used by the cost models (``hwopt.cost``) to cost a subgraph (an FX GraphModule, or a set of nodes
of a bigger graph) as the code hwopt's lowering produces for it: Relax ``FuseOps`` folds an
element-wise epilogue into the conv/matmul before it and element-wise chains into one kernel, so
a fused intermediate never reaches memory; tensors passed between kernels do. The rules mirror
what ``hwopt.lowering.relax_import.prepare`` does (checked against its output in the tests):

- conv/depthwise conv/matmul/bmm start a kernel and absorb the element-wise ops that directly
  follow them (not across a reshape); reductions, softmax and norms start a kernel and absorb
  any element-wise or layout op that follows;
- element-wise and layout ops (permute, expand, slice materialised by TVM) join the kernel of
  their producer when they are its only consumer, else start a kernel;
- a gather (embedding) is a kernel of its own, after a kernel casting int64 indices to int32;
- reshapes are free; layout ops of constants fold at compile time;
- convs run in NHWC: a 4-D activation entering a conv from outside the subgraph, or leaving a
  conv kernel towards something that is not NHWC-aware, pays a transpose kernel (classes
  "to_nhwc", "to_nchw": measured 3-14x slower than a copy of the same bytes).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx

from hwopt.cost_ops import Work, base_name, is_free_view, node_work, op_class, tensor_bytes

ANCHORS = ("conv", "dwconv", "matmul", "bmm")
REDUCES = ("reduction", "softmax", "norm")
_NHWC_AWARE = ("conv", "dwconv", "elementwise", "reduction")


@dataclass(eq=False)
class Read:
    key: Any  # the producing node (after free views), shared by every kernel reading it
    nbytes: Any
    source: str  # "const" (weights), "input" (from outside the subgraph), "inter" (a kernel)
    role: int = 0  # 0 data, 1 weight, 2+ other operands of the kernel's lead op


@dataclass(eq=False)
class Kernel:
    cls: str
    work: Work  # of the lead node (the anchor, reduction or first element-wise op)
    nodes: list = field(default_factory=list)
    flops: Any = 0
    macs: Any = 0
    reads: list = field(default_factory=list)
    writes: list = field(default_factory=list)  # [node, bytes, leaves the subgraph]
    tail: Any = None  # the node whose output later element-wise ops may fuse onto


def root(node):
    """The node that stores a tensor, looking through free views (reshape, getitem)."""
    while isinstance(node, fx.Node) and is_free_view(node) and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return node


def _is_const(node) -> bool:
    """A constant, or a layout view chain of one (folded at compile time)."""
    while isinstance(node, fx.Node) and node.op == "call_function" and op_class(node) == "view":
        if not node.all_input_nodes:
            return True
        node = node.all_input_nodes[0]
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _kind(node: fx.Node) -> str | None:
    if node.op != "call_function" or is_free_view(node) or _is_const(node):
        return None
    cls = op_class(node)
    if cls == "other" or not _has_tensor(node.meta.get("val")):
        return None
    if cls in ANCHORS:
        return "anchor"
    if cls in REDUCES:
        return "reduce"
    return "opaque" if cls == "gather" else "injective"


def _has_tensor(val) -> bool:
    if isinstance(val, torch.Tensor):
        return True
    return isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val)


def _users(node: fx.Node) -> list:
    """Consumers of a node's tensor, looking through free views."""
    out = []
    for u in node.users:
        out.extend(_users(u) if is_free_view(u) else [u])
    return out


def _direct(producer: fx.Node, node: fx.Node) -> bool:
    return producer in node.all_input_nodes


def _candidates(node, kernels_of, owner) -> list:
    """Kernels whose output only `node` consumes and that `node` may fuse onto."""
    out = []
    for a in node.all_input_nodes:
        p = root(a)
        k = kernels_of.get(p)
        if k is None or k.tail is not p or set(_users(p)) != {node} or p not in owner:
            continue
        if k.cls == "gather":
            continue
        if k.cls in ANCHORS and not (_direct(p, node) and op_class(node) == "elementwise"):
            continue
        if k not in out:
            out.append(k)
    return out


def _join_target(node, kernels_of, owner) -> Kernel | None:
    """The kernel an element-wise/layout node fuses into (the latest candidate), or None."""
    cands = _candidates(node, kernels_of, owner)
    return max(cands, key=lambda k: owner[k.tail]) if cands else None


def _absorb(k: Kernel, node, kernels: list, kernels_of: dict, owner) -> None:
    """Element-wise chains meeting at `node` become one kernel (Relax fuses both into it)."""
    for other in _candidates(node, kernels_of, owner):
        if other is k or other.cls in ANCHORS + REDUCES:
            continue
        for n in other.nodes:
            kernels_of[n] = k
        k.nodes = sorted(k.nodes + other.nodes, key=owner.__getitem__)
        k.flops, k.macs = k.flops + other.flops, k.macs + other.macs
        kernels.remove(other)


def group(nodes: Iterable[fx.Node], outputs: set | None = None) -> list[Kernel]:
    """Kernels of the subgraph made of `nodes` (call_function nodes in program order).

    `outputs` are the nodes whose values leave the subgraph; by default those with a user
    outside `nodes`.
    """
    nodes = [n for n in nodes if n.op == "call_function"]
    inside = set(nodes)
    if outputs is None:
        outputs = {n for n in nodes if any(u not in inside for u in n.users)}
    order = {n: i for i, n in enumerate(nodes)}
    kernels: list[Kernel] = []
    kernels_of: dict = {}
    for n in nodes:
        kind = _kind(n)
        if kind is None:
            continue
        k = _join_target(n, kernels_of, order) if kind == "injective" else None
        if k is None:
            cls = op_class(n)
            k = Kernel("layout" if cls == "view" else cls, node_work(n))
            kernels.append(k)
        elif k.cls not in ANCHORS + REDUCES:
            _absorb(k, n, kernels, kernels_of, order)
        w = node_work(n) if k.nodes else k.work
        k.nodes.append(n)
        k.flops, k.macs, k.tail = k.flops + w.flops, k.macs + w.macs, n
        kernels_of[n] = k
    for k in kernels:
        _reads_writes(k, kernels_of, inside, outputs)
    kernels = [part for k in kernels for part in _split_attention(k)]
    return kernels + _layout_kernels(kernels, kernels_of)


def _source(r, kernels_of) -> str:
    if _is_const(r):
        return "const"
    return "inter" if r in kernels_of else "input"


def _reads_writes(k: Kernel, kernels_of: dict, inside: set, outputs: set) -> None:
    mine = set(k.nodes)
    seen: dict = {}
    for n in k.nodes:
        w = k.work if n is k.nodes[0] else node_work(n)
        for role, (a, nbytes) in enumerate(w.inputs):
            r = root(a)
            if r in mine:
                continue
            if r in seen:
                seen[r].nbytes = _max_bytes(seen[r].nbytes, nbytes)
                continue
            seen[r] = Read(r, nbytes, _source(r, kernels_of), role if n is k.nodes[0] else 2)
    k.reads = list(seen.values())
    for n in k.nodes:
        users = _users(n)
        leaves = n in outputs or any(u not in inside for u in users)
        if leaves or any(kernels_of.get(u) is not k for u in users):
            k.writes.append([n, tensor_bytes(n.meta.get("val")), leaves])


ATTENTION_PAD = 16  # hwopt.lowering.attention pads the key length to a multiple of this


def _split_attention(k: Kernel) -> list[Kernel]:
    """A fused ``hwopt::attention`` node as the kernels its converter (hwopt.lowering.attention)
    builds: K transposed (and padded), V padded when the key length is not a multiple of
    `ATTENTION_PAD`, Q K^T with the scale and mask as epilogue, softmax over padded rows, P V
    (with whatever element-wise ops fused after it)."""
    lead = k.nodes[0] if k.nodes else None
    if lead is None or k.cls != "bmm" or base_name(lead) != "attention" or not k.work.gemm:
        return [k]
    b, m, e, s = k.work.gemm
    sp = -(-s // ATTENTION_PAD) * ATTENTION_PAD if isinstance(s, int) else s
    size = 4 if k.work.dtype in ("float32", "int32") else 2
    reads = {r.role: r for r in k.reads}
    q, key, v = reads.get(0), reads.get(1), reads.get(2)
    if q is None or key is None or v is None:
        return [k]
    kt_bytes, scores = b * sp * e * size, b * m * sp * size

    def kern(cls, flops, macs, ins, out, nbytes, gemm=None, leaves=False):
        work = Work(cls, flops, macs, k.work.dtype, tuple((r.key, r.nbytes) for r in ins),
                    nbytes, gemm=gemm, row_bytes=sp * size if cls == "softmax" else 0)
        return Kernel(cls, work, nodes=[], flops=flops, macs=macs, reads=list(ins),
                      writes=[[out, nbytes, leaves]])

    parts = [kern("layout", 0, 0, [key], ("kT", lead), kt_bytes)]
    v_read = v
    if sp != s:
        parts.append(kern("layout", 0, 0, [v], ("vpad", lead), kt_bytes))
        v_read = Read(("vpad", lead), kt_bytes, "inter", 1)
    kt = Read(("kT", lead), kt_bytes, "inter", 1)
    extra = [r for role, r in reads.items() if role >= 3]  # the mask
    macs = b * m * sp * e
    parts.append(kern("bmm", 2 * macs + 2 * b * m * sp, macs, [q, kt] + extra, ("s", lead),
                      scores, gemm=(b, m, e, sp)))
    parts.append(kern("softmax", 5 * b * m * sp, 0, [Read(("s", lead), scores, "inter")],
                      ("p", lead), scores))
    pv = Kernel("bmm", Work("bmm", 2 * macs, macs, k.work.dtype, (), k.work.out_bytes,
                            gemm=(b, m, sp, e)), nodes=list(k.nodes), flops=2 * macs
                + (k.flops - k.work.flops), macs=macs, tail=k.tail,
                reads=[Read(("p", lead), scores, "inter"), v_read]
                + [r for r in k.reads if r.role == 2 and r is not v], writes=k.writes)
    return parts + [pv]


def _max_bytes(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return max(a, b)
    import sympy

    return sympy.Max(a, b)


def _is_4d(node) -> bool:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.dim() == 4


def _layout_kernels(kernels: list[Kernel], kernels_of: dict) -> list[Kernel]:
    """NHWC transposes at the edges of conv chains (weights are transposed at compile time),
    and the int64 -> int32 cast of gather indices."""
    extra = []
    for k in kernels:
        if k.cls == "gather":
            extra += _index_casts(k)
        if k.cls not in ("conv", "dwconv"):
            continue
        data = next((r for r in k.reads if r.role == 0), None)
        if data is not None and data.source == "input" and _is_4d(data.key):
            extra.append(_transpose(data.key, ("nhwc", data.key), data.nbytes, k.work.dtype,
                                    "input", leaves=False, cls="to_nhwc"))
            data.key, data.source = ("nhwc", data.key), "inter"
        for wr in k.writes:
            node, nbytes, leaves = wr
            consumers = {kernels_of.get(u) for u in _users(node)}
            aware = all(c is not None and c.cls in _NHWC_AWARE for c in consumers)
            through_view = any(is_free_view(u) for u in node.users)
            if _is_4d(node) and (leaves or through_view or not aware):
                wr[0], wr[2] = ("nhwc", node), False
                extra.append(_transpose(("nhwc", node), node, nbytes, k.work.dtype, "inter",
                                        leaves=leaves, cls="to_nchw"))
    return extra


def _index_casts(k: Kernel) -> list[Kernel]:
    out = []
    for r in k.reads:
        v = r.key.meta.get("val") if isinstance(r.key, fx.Node) else None
        if r.role >= 1 and isinstance(v, torch.Tensor) and v.dtype == torch.int64:
            out.append(_transpose(r.key, ("i32", r.key), r.nbytes, "int64", r.source, False,
                                  cls="layout"))
            out[-1].writes[0][1] = r.nbytes / 2
            r.key, r.nbytes, r.source = ("i32", r.key), r.nbytes / 2, "inter"
    return out


def _transpose(src, dst, nbytes, dtype, source: str, leaves: bool, cls: str) -> Kernel:
    """A copy kernel reading `src` and writing `dst`: an NCHW -> NHWC ("to_nhwc") or NHWC ->
    NCHW ("to_nchw", strided stores: slower still) transpose, or an index cast ("layout")."""
    work = Work(cls, 0, 0, dtype, ((src, nbytes),), nbytes)
    return Kernel(cls, work, nodes=[], reads=[Read(src, nbytes, source)],
                  writes=[[dst, nbytes, leaves]])


def single(node: fx.Node) -> list[Kernel]:
    """The node as a kernel of its own (reads every input, writes its output)."""
    if _kind(node) is None:
        return []
    w = node_work(node)
    k = Kernel(op_class(node), w, [node], w.flops, w.macs, tail=node)
    src = {}
    for role, (a, nbytes) in enumerate(w.inputs):
        src.setdefault(root(a), Read(root(a), nbytes, "const" if _is_const(a) else "input", role))
    k.reads = list(src.values())
    k.writes = [[node, w.out_bytes, True]]
    return [k]


def graph_kernels(gm: fx.GraphModule) -> list[Kernel]:
    """Kernels of a whole GraphModule compiled as one region."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = {root(a) for a in out.all_input_nodes}
    return group(list(gm.graph.nodes), outputs)


def kernel_signature(kernels: list[Kernel]) -> list[str]:
    """Readable one-line names of the kernels, e.g. 'conv[convolution+relu]' (reports, tests)."""
    return [f"{k.cls}[{'+'.join(base_name(n) for n in k.nodes)}]" for k in kernels]
