"""Cost model of the ``fpga`` target: int8 layers on the systolic array, the rest on the host.

Sits in the *analyse* step (``target.cost_model``): `node_cost(node)` and `graph_cost(gm)` on the
ATen graph after the passes. An int8 layer of the Q/DQ graph (`hwopt.fpga.layers`) costs the
cycles of `hwopt.fpga.systolic.simulate` at its anchor node (conv / matmul); the dequantize,
activation and quantize nodes it absorbs cost nothing. Every other node runs in fp32 on the board's
host CPU (a roofline of a quad Cortex-A53), including quantize nodes that convert fp32 host results
to int8 and dequantize nodes that feed host ops.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from hwopt.cost import ZERO, Cost, RooflineModel
from hwopt.fpga.layers import LayerMatch, match_anchor, qops
from hwopt.fpga.systolic import FPGAConfig, LayerCycles, simulate

# Zynq UltraScale+ PS: 4 x Cortex-A53 at 1.2 GHz (DS891 lists up to 1.2-1.5 GHz by speed grade);
# one 128-bit NEON FMA per cycle = 8 fp32 FLOP/cycle/core -> 38.4 GFLOP/s peak. Sustained DDR
# bandwidth from the A53 cluster is assumed to be 6 GB/s (a third of the 19.2 GB/s DDR4 peak; the
# A53's memory system, not the DRAM, limits it). Efficiencies are lower than the x86 defaults:
# an in-order core reaches a small fraction of peak without hand-tuned kernels.
HOST_PEAK_FLOPS = 4 * 1.2e9 * 8
HOST_MEM_BW = 6e9
HOST_EFFICIENCY = {"conv": 0.3, "matmul": 0.3, "bmm": 0.2, "reduction": 0.05,
                   "elementwise": 0.05, "view": 1.0, "other": 0.05}


def host_model() -> RooflineModel:
    return RooflineModel(peak_flops=HOST_PEAK_FLOPS, mem_bw=HOST_MEM_BW,
                         energy_per_flop=10e-12, energy_per_byte=160e-12, overhead_s=5e-6,
                         efficiency=dict(HOST_EFFICIENCY))


@dataclass
class FPGACostModel:
    """`Cost` of nodes and graphs for an `FPGAConfig`, with a host roofline for fp32 nodes."""

    config: FPGAConfig
    host: RooflineModel = field(default_factory=host_model)

    def layer_cycles(self, match: LayerMatch) -> LayerCycles:
        return simulate(match.gemm(), self.config)

    def layer_cost(self, match: LayerMatch) -> Cost:
        c = self.config
        lc = self.layer_cycles(match)
        energy = (lc.macs * c.mac_energy_j + lc.sram_bytes * c.bram_energy_j_per_byte
                  + lc.dram_bytes * c.dram_energy_j_per_byte)
        return Cost(lc.cycles / c.clock_hz, energy, lc.dram_bytes, 2.0 * lc.macs)

    def node_cost(self, node: fx.Node) -> Cost:
        if node.op != "call_function":
            return ZERO
        try:
            match = match_anchor(node)
        except ValueError:  # no shape metadata: cost it as a host op
            match = None
        if isinstance(match, LayerMatch):
            return self.layer_cost(match)
        if _absorbed(node):
            return ZERO
        return self.host.node_cost(node)

    def graph_cost(self, gm: fx.GraphModule) -> Cost:
        total = ZERO
        for node in gm.graph.nodes:
            total = total + self.node_cost(node)
        return total


def _absorbed(node: fx.Node) -> bool:
    """Whether `node` is done inside an int8 layer's kernel (so costs nothing by itself)."""
    _, dq, _ = qops()
    layers = _nearby_layers(node)
    if node.target is dq:  # int8 data handed straight to layers; feeding a host op is host work
        fed = {n for m in layers if m.dq_in is node for n in (*m.act_views, m.anchor)}
        return bool(node.users) and all(u in fed for u in node.users)
    return any(node in m.absorbed() for m in layers)


def _nearby_layers(node: fx.Node, depth: int = 4) -> list[LayerMatch]:
    """Int8 layers whose anchor is within `depth` edges of `node` (an output chain's quantize
    is at most four nodes from its anchor: view, activation, view, quantize)."""
    seen, frontier, found = {node}, [node], []
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for other in (*n.users, *n.all_input_nodes):
                if other in seen:
                    continue
                seen.add(other)
                nxt.append(other)
                try:
                    m = match_anchor(other)
                except ValueError:
                    m = None
                if isinstance(m, LayerMatch):
                    found.append(m)
        frontier = nxt
    return found
