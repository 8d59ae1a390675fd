"""The ``fpga`` target: an FPGA-style int8 systolic-array accelerator (ZCU102-class board).

Exports ``TARGET``: spec (the array's int8 peak, DDR4 bandwidth, on-chip buffers; fp32 runs on
the board's Cortex-A53 host), a cycle-level cost model (`hwopt.fpga.cost`, SCALE-Sim style), the
TVM target ``{"kind": "c"}`` the kernels are generated with, and a lowering (`hwopt.fpga.lowering`)
that turns every int8 conv2d / linear layer of a quantized graph into a C/HLS-style kernel. The
code runs here by simulation: bit-exact integer arithmetic on the host (or, with
``make_target(run="c")``, the generated C compiled by gcc). Default passes: ``fuse`` then
``quantize`` (which needs ``calibration``); a graph without int8 layers is an error that says so.

``make_target(FPGAConfig(rows=64, cols=64, dataflow="ws"), run="c")`` gives a variant to pass as
``target=`` (e.g. for design-space exploration with the cost model).
"""
from __future__ import annotations

from hwopt.fpga.cost import HOST_MEM_BW, HOST_PEAK_FLOPS, FPGACostModel
from hwopt.fpga.lowering import FPGALowering
from hwopt.fpga.systolic import FPGAConfig
from hwopt.target import Target, TargetSpec


def spec_of(cfg: FPGAConfig) -> TargetSpec:
    """The TargetSpec of an accelerator configuration (int8 on the array, fp32 on the host)."""
    dram_bw = cfg.dram_bytes_per_cycle * cfg.clock_hz
    on_chip = cfg.ifmap_buf + cfg.filter_buf + cfg.ofmap_buf
    # BRAM: two ports of 8 B per block per cycle; ~288 blocks back the three buffers.
    bram_bw = 288 * 16 * cfg.clock_hz
    return TargetSpec(
        peak_flops={"int8": 2 * cfg.peak_macs_per_s, "float32": HOST_PEAK_FLOPS},
        mem_bw=dram_bw, on_chip_bytes=on_chip, vector_lanes=4, cores=4, dtypes=("int8",),
        sparsity_formats=(),
        mem_levels=(("BRAM", on_chip, bram_bw, cfg.bram_energy_j_per_byte),
                    ("DDR4", 0, dram_bw, cfg.dram_energy_j_per_byte)),
        energy_per_mac={"int8": cfg.mac_energy_j}, clock_hz=cfg.clock_hz)


def make_target(config: FPGAConfig | None = None, run: str = "sim", name: str = "fpga") -> Target:
    """An fpga Target for `config`; ``run`` is "sim" (bit-exact simulator) or "c" (gcc-built C)."""
    cfg = config or FPGAConfig()
    return Target(
        name=name,
        description=(f"FPGA-style int8 systolic array ({cfg.rows}x{cfg.cols} PEs, "
                     f"{cfg.dataflow}, {cfg.clock_hz / 1e6:.0f} MHz), C/HLS kernels, "
                     "bit-exact simulation"),
        spec=spec_of(cfg), cost_model=FPGACostModel(cfg), tvm_target=lambda: {"kind": "c"},
        runs_here=lambda: True, default_passes=("fuse", "quantize"),
        lowering=FPGALowering(cfg, run), extra={"config": cfg, "host_mem_bw": HOST_MEM_BW,
               # timings taken here measure the simulator, not the device: never compare them
               "simulated": True})


TARGET = make_target()
