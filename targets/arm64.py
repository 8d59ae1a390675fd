"""The arm64 target: a Cortex-A78-class mobile SoC, cross-compiled to an aarch64 shared library.

Exports ``TARGET``: spec, roofline cost model, TVM target dict (LLVM, ``aarch64-linux-gnu``,
``cortex-a78`` with NEON + dotprod + fp16) and the LLVM lowering with hwopt's schedule rules at
4 fp32 lanes (one 128-bit NEON register), linked by ``aarch64-linux-gnu-g++``. The code runs
natively only on an aarch64 host; elsewhere ``hwopt.compile(..., target="arm64").save(dir)``
writes the libraries and ``hwopt.emulate.run_saved`` runs them under qemu-user
(``scripts/setup_arm64.sh`` installs the toolchain, qemu and an aarch64 Python with TVM).

Reference part: MediaTek Dimensity 8100 (4x Cortex-A78 at 2.85 GHz + 4x Cortex-A55, LPDDR5-6400,
4 x 16-bit channels); the A55 little cores are not counted. Figures and where they come from:
- Cortex-A78 (Arm TRM 101430 / Software Optimization Guide): Armv8.2-A + dotprod + fp16, two
  128-bit ASIMD pipes that each issue an FMLA (4 fp32 FMAs), an SDOT (16 int8 MACs into 4 int32)
  or an FP16 FMLA (8 lanes) per cycle; 64 KiB L1D, 256/512 KiB private L2 (512 KiB here); L1
  load bandwidth 2 x 16 B/cycle. No SVE, no i8mm, no bf16 (those arrive with Armv9 cores).
- DSU-110 shared L3: 2-4 MiB on SoCs of this class; 4 MiB here.
- LPDDR5-6400 on a 64-bit bus: 51.2 GB/s peak; the CPU cluster sustains roughly 60 % of it in
  streaming tests on such phones, ~30 GB/s (an estimate; calibrate on the device).
- Energy: datapath and memory figures from Horowitz (ISSCC'14, 45 nm) scaled to 5 nm, with the
  Eyeriss access-energy ratios for the caches; LPDDR5 ~4 pJ/bit. Estimates, for ranking rewrites,
  not for absolute battery predictions.
"""
from __future__ import annotations

import platform
import shutil
from pathlib import Path

from hwopt.cost import RooflineModel
from hwopt.errors import LoweringError
from hwopt.lowering.llvm import LLVMLowering
from hwopt.target import Target, TargetSpec

CORES = 4  # big cores (Cortex-A78)
CLOCK_HZ = 2.85e9
LANES = 4  # fp32 lanes of a 128-bit NEON register
FMA_PIPES = 2  # 128-bit ASIMD FMA pipes per core
DRAM_PEAK = 51.2e9  # LPDDR5-6400, 64-bit bus
DRAM_BW = 0.6 * DRAM_PEAK  # sustained by the CPU cluster (estimate)
CROSS_CXX = "aarch64-linux-gnu-g++"


def on_aarch64() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


def tvm_target() -> dict:
    return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78",
            "mattr": ["+neon", "+dotprod", "+fullfp16"], "num-cores": CORES}


class CrossLLVMLowering(LLVMLowering):
    """`LLVMLowering` whose export says how to get the cross linker when it is missing."""

    def export(self, executable, folder: Path, name: str) -> list[str]:
        if self.cross_compiler and shutil.which(self.cross_compiler) is None:
            raise LoweringError(
                f"cannot link {name}.so for target arm64: {self.cross_compiler} is not on PATH; "
                "run `bash scripts/setup_arm64.sh` as root (or apt-get install "
                "g++-aarch64-linux-gnu)", target="arm64")
        return super().export(executable, folder, name)


def _spec() -> TargetSpec:
    fp32 = CORES * FMA_PIPES * LANES * 2 * CLOCK_HZ  # 2 FLOPs per FMA: 182 GFLOP/s
    # SDOT: 16 int8 MACs per instruction vs 4 fp32 FMAs for FMLA, same pipes -> 4x.
    int8 = 4 * fp32
    per_core = CLOCK_HZ * CORES
    levels = (("L1", 64 * 2**10 * CORES, 32 * per_core, 0.3e-12),
              ("L2", 512 * 2**10 * CORES, 16 * per_core, 1.0e-12),
              ("L3", 4 * 2**20, 8 * per_core, 3.0e-12),
              ("DRAM", 0, DRAM_BW, 32e-12))
    return TargetSpec(
        peak_flops={"float32": fp32, "float16": 2 * fp32, "int8": int8}, mem_bw=DRAM_BW,
        on_chip_bytes=4 * 2**20, vector_lanes=LANES, cores=CORES,
        dtypes=("float32", "float16", "int8"), sparsity_formats=(),
        mem_levels=levels, energy_per_mac={"float32": 1.2e-12, "float16": 0.5e-12,
                                           "int8": 0.15e-12},
        clock_hz=CLOCK_HZ)


_SPEC = _spec()

TARGET = Target(
    name="arm64",
    description="mobile SoC, 4x Cortex-A78 @ 2.85 GHz (NEON, dotprod), aarch64 via LLVM",
    spec=_SPEC,
    cost_model=RooflineModel.from_spec(_SPEC),
    tvm_target=tvm_target, runs_here=on_aarch64,
    default_passes=("fuse",), schedule_lanes=LANES,
    # On an aarch64 host the native compiler links; elsewhere the Debian cross compiler.
    lowering=CrossLLVMLowering(lanes=LANES, cross_compiler=None if on_aarch64() else CROSS_CXX),
    extra={"reference_soc": "MediaTek Dimensity 8100 (big cluster)", "dram_peak_bw": DRAM_PEAK,
           "cross_compiler": CROSS_CXX})
