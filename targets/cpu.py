"""The host CPU target: native code through LLVM for the machine hwopt runs on.

Exports ``TARGET``: spec (peak compute from the vector width LLVM reports for the host CPU, core
count, memory bandwidth), a roofline cost model (refined by the calibration and learned model
measured on this machine when the compile cache holds them, see ``hwopt.cost_machine``), the TVM
target dict and the schedule-rule vector width. Default pipeline: lossless passes only.
"""
from __future__ import annotations

import functools
import os

from hwopt.cost import RooflineModel
from hwopt.cost_machine import MachineCostModel
from hwopt.lowering.llvm import LLVMLowering
from hwopt.target import Target, TargetSpec

FMA_UNITS = 2  # fused multiply-add pipes per core on current x86 cores
DEFAULT_GHZ = 3.0  # used when the OS does not report a frequency
DRAM_BW = 25e9  # bytes/s available to two cores; refined by calibration (targets issue)


def _probe_host() -> dict:
    """What LLVM reports for the host CPU: its name, fp32 lanes of the widest vector unit (16
    AVX-512, 8 AVX2, else 4) and the int8 dot product ("vnni" where AVX-512 VNNI's vpdpbusd is
    there, else "i16": vpmaddwd int16 pairs; see ``hwopt.lowering.qdq.converters``)."""
    import tvm
    from tvm.target.codegen import llvm_cpu_has_features, llvm_get_system_cpu

    mcpu = os.environ.get("HWOPT_MCPU") or llvm_get_system_cpu()
    t = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
    has = lambda f: bool(llvm_cpu_has_features([f], t))  # noqa: E731
    lanes = 16 if has("avx512f") else 8 if has("avx2") else 4
    dot = "vnni" if lanes == 16 and has("avx512vnni") else "i16"
    return {"mcpu": mcpu, "lanes": lanes, "int8_dot": dot}


def _host_key() -> str:
    """Identity of this CPU as the OS reports it (model and feature flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = {ln for ln in f.read().splitlines()
                     if ln.split(":")[0].strip() in ("model name", "flags", "Features",
                                                      "CPU part")}
    except OSError:
        import platform

        lines = {platform.processor(), platform.machine()}
    return "\n".join(sorted(lines)) + "|" + os.environ.get("HWOPT_MCPU", "")


@functools.lru_cache(maxsize=None)
def host_facts() -> dict:
    """``_probe_host()``, kept per CPU identity (hwopt.memo): asking LLVM needs TVM's compiler
    library, which a compile-cache hit otherwise never loads."""
    from hwopt.memo import disk_memo

    return disk_memo("host", _host_key(), _probe_host,
                     valid=lambda v: isinstance(v, dict) and set(v) == {"mcpu", "lanes",
                                                                         "int8_dot"})


def host_mcpu() -> str:
    return host_facts()["mcpu"]


def host_cores() -> int:
    env = os.environ.get("TVM_NUM_THREADS")
    return int(env) if env else (os.cpu_count() or 1)


def host_lanes() -> int:
    """fp32 lanes of the widest vector unit the host CPU has (16 AVX-512, 8 AVX2, else 4)."""
    return host_facts()["lanes"]


def host_int8_dot() -> str:
    """"vnni" where the host has AVX-512 VNNI, else "i16" (see ``_probe_host``)."""
    return host_facts()["int8_dot"]


def tvm_target() -> dict:
    return {"kind": "llvm", "mcpu": host_mcpu(), "num-cores": host_cores()}


def _ghz() -> float:
    try:
        import psutil

        f = psutil.cpu_freq()
        mhz = (f.max or f.current) if f else 0
        return mhz / 1e3 if mhz else DEFAULT_GHZ
    except Exception:
        return DEFAULT_GHZ


@functools.lru_cache(maxsize=None)
def _spec() -> TargetSpec:
    lanes, cores = host_lanes(), host_cores()
    fp32 = cores * FMA_UNITS * lanes * 2 * _ghz() * 1e9
    # Energy per byte by level: 45 nm figures scaled to 7 nm (Horowitz ISSCC'14; Eyeriss ratios
    # RF 1 : L1 ~2 : L2 ~6 : DRAM ~200 relative to a MAC).
    levels = (("L1", 32 * 2**10 * cores, 64 * _ghz() * 1e9 * cores, 0.5e-12),
              ("L2", 512 * 2**10 * cores, 32 * _ghz() * 1e9 * cores, 2e-12),
              ("L3", 32 * 2**20, 16 * _ghz() * 1e9 * cores, 8e-12),
              ("DRAM", 0, DRAM_BW, 60e-12))
    # int8 multiply-adds per fp32 FMA slot: 4 with vpdpbusd, 2 with vpmaddwd (which needs an add)
    int8 = (4 if host_int8_dot() == "vnni" else 2) * fp32
    return TargetSpec(
        peak_flops={"float32": fp32, "int8": int8}, mem_bw=DRAM_BW,
        on_chip_bytes=32 * 2**20, vector_lanes=lanes, cores=cores,
        dtypes=("float32", "int8"), sparsity_formats=(),
        mem_levels=levels, energy_per_mac={"float32": 2e-12, "int8": 0.3e-12},
        clock_hz=_ghz() * 1e9)


_SPEC = _spec()

TARGET = Target(
    name="cpu", description="this machine (x86-64), native code via LLVM",
    spec=_SPEC,
    cost_model=MachineCostModel(RooflineModel.from_spec(_SPEC), "cpu"),
    tvm_target=tvm_target, runs_here=lambda: True,
    default_passes=("fuse",), schedule_lanes=_SPEC.vector_lanes,
    lowering=LLVMLowering(_SPEC.vector_lanes, int8_dot=host_int8_dot()))
