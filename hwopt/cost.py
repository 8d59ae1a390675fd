"""Cost values and the analytical (roofline) cost model every target starts from.

Sits in the *analyse* step: each node of the ATen graph gets a `Cost` from its target's model, and
passes ask the model whether a rewrite pays. Costs are values, never bare floats.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Cost:
    latency_s: float = 0.0
    energy_j: float = 0.0
    bytes_moved: float = 0.0
    flops: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.latency_s + other.latency_s, self.energy_j + other.energy_j,
                    self.bytes_moved + other.bytes_moved, self.flops + other.flops)

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved (the roofline's x axis)."""
        return self.flops / self.bytes_moved if self.bytes_moved else math.inf


ZERO = Cost()

# Ops that only relabel memory: no compute, no traffic once fused.
_VIEW_OPS = {"view", "_unsafe_view", "reshape", "expand", "squeeze", "unsqueeze", "alias",
             "detach", "t", "slice", "select", "getitem", "permute", "transpose"}


def op_class(node: torch.fx.Node) -> str:
    """Coarse class of an ATen node: conv, matmul, bmm, reduction, view, elementwise, other."""
    if node.op != "call_function":
        return "other"
    name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    if name in ("convolution", "conv2d", "_convolution"):
        return "conv"
    if name in ("mm", "addmm", "linear", "matmul"):
        return "matmul"
    if name in ("bmm", "baddbmm", "scaled_dot_product_attention"):
        return "bmm"
    if name in ("sum", "mean", "amax", "amin", "max", "min", "_softmax", "softmax", "var",
                "_log_softmax", "native_layer_norm", "_native_batch_norm_legit_no_training",
                "avg_pool2d", "max_pool2d", "max_pool2d_with_indices", "adaptive_avg_pool2d",
                "cumsum", "argmax"):
        return "reduction"
    if name in _VIEW_OPS:
        return "view"
    return "elementwise"


def _numel_bytes(val) -> tuple[int, int]:
    if isinstance(val, torch.Tensor):
        return val.numel(), val.numel() * val.element_size()
    if isinstance(val, (tuple, list)):
        pairs = [_numel_bytes(v) for v in val]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    return 0, 0


def node_flops(node: torch.fx.Node) -> float:
    """FLOPs of one node from its shape metadata (``node.meta['val']``)."""
    out = node.meta.get("val")
    cls = op_class(node)
    vals = [a.meta.get("val") for a in node.all_input_nodes]
    if cls == "conv" and isinstance(out, torch.Tensor) and len(vals) >= 2:
        w = vals[1]
        k = math.prod(w.shape[1:])  # Cin/groups * kh * kw
        return 2.0 * out.numel() * k
    if cls in ("matmul", "bmm") and isinstance(out, torch.Tensor):
        ins = [v for v in vals if isinstance(v, torch.Tensor) and v.dim() >= 2]
        if ins:
            k = ins[-1].shape[-2] if ins[-1].dim() >= 2 else 1
            if node.target is torch.ops.aten.linear.default:
                k = ins[-1].shape[-1]
            return 2.0 * out.numel() * k
    n, _ = _numel_bytes(out)
    return 0.0 if cls == "view" else float(n)


def node_bytes(node: torch.fx.Node) -> float:
    if op_class(node) == "view":
        return 0.0
    _, out_b = _numel_bytes(node.meta.get("val"))
    in_b = sum(_numel_bytes(a.meta.get("val"))[1] for a in node.all_input_nodes)
    return float(in_b + out_b)


@dataclass
class RooflineModel:
    """Roofline latency with per-op-class efficiency; energy from a MAC + data-movement model.

    `efficiency` is the fraction of peak compute an op class reaches with hwopt's schedules; the
    defaults are analytical guesses, refined by measurement on the machine where the target runs.
    """

    peak_flops: float  # fp32 FLOP/s
    mem_bw: float  # bytes/s from main memory
    energy_per_flop: float = 1e-12  # J
    energy_per_byte: float = 60e-12  # J, DRAM access
    overhead_s: float = 2e-6  # per-kernel launch / dispatch
    efficiency: dict = field(default_factory=lambda: {
        "conv": 0.85, "matmul": 0.75, "bmm": 0.5, "reduction": 0.1, "elementwise": 0.1,
        "view": 1.0, "other": 0.1})

    def cost_of(self, flops: float, nbytes: float, cls: str) -> Cost:
        if cls == "view":
            return ZERO
        compute = flops / (self.peak_flops * self.efficiency.get(cls, 0.1))
        memory = nbytes / self.mem_bw
        latency = max(compute, memory) + self.overhead_s
        energy = flops * self.energy_per_flop + nbytes * self.energy_per_byte
        return Cost(latency, energy, nbytes, flops)

    def node_cost(self, node: torch.fx.Node) -> Cost:
        return self.cost_of(node_flops(node), node_bytes(node), op_class(node))

    def graph_cost(self, gm: torch.fx.GraphModule) -> Cost:
        total = ZERO
        for node in gm.graph.nodes:
            if node.op == "call_function":
                total = total + self.node_cost(node)
        return total
