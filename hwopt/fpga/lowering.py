"""Lowering for the ``fpga`` target: each int8 layer of the Q/DQ graph becomes one kernel.

The *lower* step of the pipeline for this target (called through the ``lower_graph`` hook of
`hwopt.lowering.lower`; the TVM-region flow of `hwopt.lowering.region` does not apply, because
the int8 layers are spelled with quantize/dequantize ops that TVM's importer does not take and
whose int8 tensors the partitioner rejects). Steps, per layer found by `hwopt.fpga.layers`:
build the integer parameters -> generate the C kernel through TVM (`hwopt.fpga.codegen`) -> run it
on the example input and check it against the fake-quantized graph (within 1 LSB) -> replace the
layer's nodes by an `FPGALayerRegion`. What is not an int8 layer stays in the graph and runs in
PyTorch, standing for the board's host CPU.
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch.fx as fx

from hwopt.errors import HwoptError, LoweringError
from hwopt.fpga import sim
from hwopt.fpga.codegen import Kernel, generate
from hwopt.fpga.export import export_layer
from hwopt.fpga.int8layer import Int8Layer, LayerError, build_layer
from hwopt.fpga.layers import LayerMatch, find_layers
from hwopt.fpga.systolic import FPGAConfig, LayerCycles, simulate
from hwopt.graph import remove_unused_constants
from hwopt.lowering.region import RegionInfo, TVMRegion

log = logging.getLogger("hwopt")
RUN_MODES = ("sim", "c")

NO_LAYERS = ("target 'fpga' found no int8 layers in this graph: the accelerator runs only "
             "conv2d/linear layers in the quantized Q/DQ form. Compile with "
             "passes=['fuse', 'quantize'] and calibration=[example inputs, ...] so that the "
             "quantize pass produces them.")


class FPGALayerRegion(TVMRegion):
    """One int8 layer: int8 in, int8 out, computed as its generated kernel computes it.

    ``run="sim"`` uses the bit-exact simulator; ``run="c"`` calls the generated C compiled by the
    host's gcc. `export` writes the kernel's C, header and parameters (see hwopt.fpga.export).
    """

    def __init__(self, layer: Int8Layer, kernel: Kernel, cycles: LayerCycles, lowering,
                 run: str = "sim"):
        super().__init__(None, True, lowering, executable=kernel, target_name="fpga")
        self.layer, self.kernel, self.cycles, self.run = layer, kernel, cycles, run
        self._c = None

    def forward(self, x_q: torch.Tensor) -> torch.Tensor:
        if self.run == "sim":
            return sim.run_layer(self.layer, x_q)
        if self._c is None:
            from hwopt.fpga.cbuild import CKernel

            self._c = CKernel(self.kernel)
        L = self.layer
        y = self._c(x_q.reshape(self.kernel.arg_shapes[0]), L.weight, L.bias, L.mult, L.shift)
        return y.reshape(L.out_shape)

    def export(self, folder, name: str) -> list[str]:
        from pathlib import Path

        return export_layer(self.layer, self.kernel, self.cycles, self.lowering.config,
                            Path(folder), name)


class FPGALowering:
    """The fpga target's lowering object: ``lower_graph`` replaces the generic region flow."""

    def __init__(self, config: FPGAConfig, run: str = "sim"):
        if run not in RUN_MODES:
            raise ValueError(f"FPGALowering run mode must be one of {RUN_MODES}, got {run!r}")
        self.config, self.run = config, run

    def device(self):
        import tvm

        return tvm.cpu()

    def build(self, layer: Int8Layer) -> Kernel:
        return generate(layer, self.config)

    def lower_graph(self, gm: fx.GraphModule, inputs, opts, cache=None, db=None):
        """(module, region infos): int8 layers -> kernels, the rest left to PyTorch."""
        gm = fx.GraphModule(gm, _copy_graph(gm.graph))
        matches, rejected = find_layers(gm)
        if not matches:
            detail = "; ".join(f"{k}: {v}" for k, v in list(rejected.items())[:4])
            raise HwoptError(NO_LAYERS + (f" (conv/matmul nodes seen: {detail})" if detail else ""))
        values = _record(gm, inputs, matches)
        # Names now: lowering a layer rewires the next layer's input to the new kernel call.
        keys = {m.name: (m.input_node.name, m.q_out.name) for m in matches}
        infos = []
        for m in matches:
            info = self._lower_layer(gm, m, [values[k] for k in keys[m.name]], opts, rejected)
            if info is not None:
                infos.append(info)
        remove_unused_constants(gm)
        gm.recompile()
        infos += _host_info(gm, rejected)
        return gm, infos

    def _lower_layer(self, gm, m: LayerMatch, example, opts, rejected) -> RegionInfo | None:
        """Replace `m` by a kernel call; `example` is its (int8 input, int8 output) here.

        A layer whose kernel cannot be built or does not match the fake-quantized graph within
        1 LSB stays on the host with a warning (an error with ``strict=True``)."""
        try:
            region, diff = self._checked_region(gm, m, example)
        except LayerError as e:  # constants the kernel's integer arithmetic cannot express
            rejected[m.name] = str(e)
            return None
        except Exception as e:
            msg = f"fpga kernel of layer {m.name} failed: {type(e).__name__}: {e}"
            if getattr(opts, "strict", False):
                raise LoweringError(msg, node=m.name, op=str(m.anchor.target),
                                    target="fpga") from e
            warnings.warn(f"hwopt: {msg}; running it on the host", stacklevel=3)
            rejected[m.name] = msg[:300]
            return None
        name = f"fpga_{m.name}"
        gm.add_submodule(name, region)
        with gm.graph.inserting_before(m.q_out):
            call = gm.graph.call_module(name, (m.input_node,))
        call.meta = dict(m.q_out.meta)
        m.q_out.replace_all_uses_with(call)
        gm.graph.eliminate_dead_code()
        summary = layer_summary(region.layer, region.kernel, region.cycles, self.config, diff)
        return RegionInfo(name, "fpga", f"int8 {region.layer.kind} on the {self.config.rows}x"
                          f"{self.config.cols} array ({self.run})", kernels={m.name: summary})

    def _checked_region(self, gm, m: LayerMatch, example) -> tuple[FPGALayerRegion, int]:
        layer = build_layer(gm, m)
        region = FPGALayerRegion(layer, self.build(layer), simulate(layer.gemm, self.config),
                                 self, self.run)
        with torch.no_grad():
            got = region(example[0]).to(torch.int32)
        diff = int((got - example[1].to(torch.int32)).abs().max()) if got.numel() else 0
        if diff > 1:
            raise ValueError(f"output differs from the fake-quantized graph by {diff} LSB (> 1)")
        return region, diff


def layer_summary(layer: Int8Layer, kernel: Kernel, lc: LayerCycles, cfg: FPGAConfig,
                  lsb: int | None = None) -> dict:
    """What the manifest and reports say about one layer: shape, cycles, stalls, traffic."""
    g = layer.gemm
    out = {"kind": layer.kind, "symbol": kernel.symbol, "gemm_m_n_k_groups": [g.m, g.n, g.k,
                                                                              g.groups],
           "cycles": lc.cycles, "compute_cycles": lc.compute_cycles,
           "stall_cycles": lc.stall_cycles, "stall_fraction": round(lc.stall_fraction, 4),
           "utilization": round(lc.utilization, 4), "folds": lc.folds,
           "latency_us": round(lc.cycles / cfg.clock_hz * 1e6, 3),
           "dram_bytes": int(lc.dram_bytes), "macs": lc.macs}
    if lsb is not None:
        out["max_lsb_vs_fake_quant"] = lsb
    return out


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    return new


def _record(gm: fx.GraphModule, inputs, matches) -> dict:
    """Values of the layers' int8 inputs and outputs on the example inputs."""
    wanted = {n.name for m in matches for n in (m.input_node, m.q_out)}
    seen = {}

    class Rec(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in wanted:
                seen[n.name] = out
            return out

    with torch.no_grad():
        Rec(gm).run(*inputs)
    return seen


def _host_info(gm: fx.GraphModule, rejected: dict) -> list[RegionInfo]:
    """The host's share: one entry for the fp32 ops, one fallback entry per conv/matmul that
    could not become an int8 layer (with the reason)."""
    ops = []
    for n in gm.graph.nodes:
        if n.op == "call_function":
            name = getattr(n.target, "__name__", str(n.target))
            if name not in ops:
                ops.append(name)
    infos = [RegionInfo("host_ops", "host", "fp32 ops on the board's host CPU, run here in "
                        f"PyTorch: {', '.join(ops) or 'none'}")]
    for node, why in rejected.items():
        log.info("hwopt: fpga: %s stays on the host: %s", node, why)
        infos.append(RegionInfo(f"host_{node}", "torch", f"{node} stays on the host: {why}"))
    return infos
