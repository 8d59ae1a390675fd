"""Find the int8 layers of a Q/DQ graph (the quantized-graph contract) for the ``fpga`` target.

Sits between the rewrite and lower steps: the cost model (`hwopt.fpga.cost`) asks which nodes an
int8 layer absorbs, and the lowering (`hwopt.fpga.lowering`) replaces each layer by one kernel.
An int8 layer, as the ``quantize`` pass writes it (PT2E reference representation)::

    x_q (int8) -> dequantize_per_tensor -> [view] --\\
    w_q (int8 const) -> dequantize_per_channel -> [t/permute] -> convolution | addmm | mm | linear
        (+ fp32 bias const) -> [view] [relu | hardtanh | clamp] -> quantize_per_tensor -> y_q (int8)

`match_anchor` checks this structure on one conv/matmul node (shapes from ``meta['val']`` only);
`hwopt.fpga.int8layer.build_layer` then reads the constants. Anything else stays on the host.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from hwopt.fpga.systolic import GemmShape, conv_gemm

aten = torch.ops.aten
CONV = (aten.convolution.default,)
MATMUL = (aten.addmm.default, aten.mm.default, aten.linear.default)
RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
WEIGHT_VIEWS = RESHAPES + (aten.t.default, aten.permute.default, aten.transpose.int)
# Activations that commute with quantization: q(act(v)) == clamp(q(v), q(lo), q(hi)).
ACTIVATIONS = (aten.relu.default, aten.hardtanh.default, aten.clamp.default,
               aten.clamp_min.default)


def qops():
    """The quantized_decomposed ops (registered on import of torch's _decomposed module)."""
    from torch.ao.quantization.fx import _decomposed  # noqa: F401

    q = torch.ops.quantized_decomposed
    return (q.quantize_per_tensor.default, q.dequantize_per_tensor.default,
            q.dequantize_per_channel.default)


def arguments(node: fx.Node) -> dict:
    """A node's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    out = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args) and not a.kwarg_only:
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


@dataclass
class LayerMatch:
    """The nodes of one int8 layer in the Q/DQ graph."""

    anchor: fx.Node  # convolution / addmm / mm / linear
    kind: str  # "conv2d" | "linear"
    dq_in: fx.Node
    act_views: list = field(default_factory=list)  # reshapes between dq_in and the anchor
    dq_w: fx.Node | None = None
    w_views: list = field(default_factory=list)  # weight views, dq_w first
    out_chain: list = field(default_factory=list)  # reshapes / activations after the anchor
    q_out: fx.Node | None = None
    bias: fx.Node | None = None

    @property
    def input_node(self) -> fx.Node:
        return self.dq_in.args[0]

    @property
    def name(self) -> str:
        return self.anchor.name

    def absorbed(self) -> list[fx.Node]:
        """Nodes whose work the kernel does (the input dq only feeds it, so it is not listed)."""
        return [self.dq_w, *self.w_views, *self.act_views, self.anchor, *self.out_chain,
                self.q_out]

    def gemm(self) -> GemmShape:
        if self.kind == "conv2d":
            x = _shape(self.anchor.args[0])
            w = _shape(self.anchor.args[1])
            y = _shape(self.anchor)
            return conv_gemm(x[0], x[1], x[2], x[3], y[1], w[2], w[3], y[2], y[3],
                             int(self.anchor.args[8]))
        m, k, n = linear_dims(self.anchor)
        return GemmShape(m=m, n=n, k=k)


def _shape(node) -> tuple:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        raise ValueError(f"node {getattr(node, 'name', node)} has no shape metadata")
    return tuple(int(s) for s in val.shape)


def linear_dims(anchor: fx.Node) -> tuple[int, int, int]:
    """(m, k, n) of a matmul anchor from its metadata."""
    x = _shape(anchor.args[1] if anchor.target is aten.addmm.default else anchor.args[0])
    y = _shape(anchor)
    return math.prod(x[:-1]), x[-1], y[-1]


def _through(node, ops) -> tuple[fx.Node, list]:
    """Walk producers of `node` through `ops`; returns (first other node, chain in data order)."""
    chain = []
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in ops:
        chain.insert(0, node)
        node = node.args[0]
    return node, chain


def match_anchor(node: fx.Node) -> LayerMatch | str | None:
    """The int8 layer around conv/matmul `node`; a reason string when it is not one; None when
    `node` is not a conv/matmul at all."""
    if node.op != "call_function" or node.target not in CONV + MATMUL:
        return None
    q, dq, dqc = qops()
    kind = "conv2d" if node.target in CONV else "linear"
    act, w = _operands(node)
    if kind == "conv2d":
        if node.args[6]:
            return "transposed convolution"
        if len(_shape(node.args[1])) != 4:
            return "only 2-D convolutions run on the systolic array"
    src, act_views = _through(act, RESHAPES if kind == "linear" else ())
    if not (isinstance(src, fx.Node) and src.target is dq):
        return "activation is not dequantized from int8 (no dequantize_per_tensor)"
    if not _int8_qparams(arguments(src)):
        return "activation quantization is not per-tensor int8"
    wsrc, w_views = _through(w, WEIGHT_VIEWS)
    if not (isinstance(wsrc, fx.Node) and wsrc.target is dqc):
        return "weight is not dequantized from int8 (no dequantize_per_channel)"
    wargs = arguments(wsrc)
    if wargs["dtype"] != torch.int8 or not isinstance(wargs["input"], fx.Node) \
            or wargs["input"].op != "get_attr":
        return "weight is not an int8 constant"
    chain, q_out = _output_chain(node, kind)
    if isinstance(q_out, str):
        return q_out
    if not _int8_qparams(arguments(q_out)):
        return "output quantization is not per-tensor int8"
    bias = _bias(node)
    if isinstance(bias, str):
        return bias
    return LayerMatch(node, kind, src, act_views, wsrc, w_views, chain, q_out, bias)


def _operands(node: fx.Node) -> tuple:
    if node.target is aten.addmm.default:
        return node.args[1], node.args[2]
    return node.args[0], node.args[1]


def _int8_qparams(a: dict) -> bool:
    return (a.get("dtype") == torch.int8 and isinstance(a.get("scale"), (int, float))
            and isinstance(a.get("zero_point"), int) and a["quant_min"] >= -128
            and a["quant_max"] <= 127 and a["scale"] > 0)


def _output_chain(anchor: fx.Node, kind: str) -> tuple[list, fx.Node | str]:
    q, _, _ = qops()
    chain, node = [], anchor
    allowed = ACTIVATIONS + (RESHAPES if kind == "linear" else ())
    while True:
        if len(node.users) != 1:
            return chain, f"float result of {node.name} has {len(node.users)} users (needs 1)"
        (user,) = node.users
        if user.op == "call_function" and user.target is q:
            return chain, user
        if user.op != "call_function" or user.target not in allowed or user.args[0] is not node:
            return chain, f"output is not requantized to int8 ({user.name} follows)"
        chain.append(user)
        node = user


def _bias(anchor: fx.Node):
    if anchor.target is aten.mm.default:
        return None
    if anchor.target is aten.addmm.default:
        a = arguments(anchor)
        if a.get("beta", 1) != 1 or a.get("alpha", 1) != 1:
            return "addmm with alpha/beta != 1"
        b = a["self"]
    else:
        b = anchor.args[2] if len(anchor.args) > 2 else None
    if b is None:
        return None
    if not (isinstance(b, fx.Node) and b.op == "get_attr"):
        return "bias is not a constant"
    return b


def activation_bounds(chain: list) -> tuple[float, float]:
    """The float interval the fused activations clamp to."""
    lo, hi = -math.inf, math.inf
    for n in chain:
        if n.target is aten.relu.default:
            lo = max(lo, 0.0)
        elif n.target in ACTIVATIONS:
            a = arguments(n)
            mn = a.get("min_val", a.get("min"))
            mx = a.get("max_val", a.get("max"))
            lo = max(lo, float(mn)) if mn is not None else lo
            hi = min(hi, float(mx)) if mx is not None else hi
    return lo, hi


def find_layers(gm: fx.GraphModule) -> tuple[list[LayerMatch], dict[str, str]]:
    """Every int8 layer of `gm`, and why each other conv/matmul node is not one."""
    found, rejected = [], {}
    for node in gm.graph.nodes:
        try:
            m = match_anchor(node)
        except ValueError as e:  # missing metadata: not a layer the array can take
            m = str(e)
        if isinstance(m, LayerMatch):
            found.append(m)
        elif isinstance(m, str):
            decided = node.meta.get("hwopt_quant") or {}
            if decided.get("dtype") not in (None, "int8") and decided.get("reason"):
                m = f"quantize kept it {decided['dtype']} ({decided['reason']})"
            rejected[node.name] = m
    return found, rejected
