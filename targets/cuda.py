"""The cuda target: an NVIDIA data-centre GPU (A100 = sm_80, H100 = sm_90), CUDA kernels via TVM.

Exports ``TARGET`` for the architecture named by the environment variable ``HWOPT_CUDA_ARCH``
(default ``sm_80``) and `make_target(arch)` for either one. Each has its spec (figures from
NVIDIA's data sheets, cited below), a roofline cost model at the fp32 CUDA-core peak (hwopt's
kernels are fp32 and do not use tensor cores), the TVM target dict and the GPU lowering
(`hwopt.lowering.gpu.CUDALowering`: dlight schedules, CUDA C++ + PTX + a loadable library).
Code is built on any machine that has TVM (PTX also needs ``nvcc``); it runs only where both
PyTorch and TVM see a CUDA device.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from hwopt.cost import RooflineModel
from hwopt.errors import OptionError, did_you_mean
from hwopt.lowering.gpu import CUDALowering
from hwopt.target import Target, TargetSpec

T, G, M, K = 1e12, 1e9, 2**20, 2**10


@dataclass(frozen=True)
class GPU:
    """Data-sheet figures of one GPU (dense, i.e. without 2:4 sparsity; boost clock)."""

    name: str
    sms: int
    clock_hz: float
    peak: dict  # dtype -> FLOP/s or OP/s
    hbm: str
    hbm_bw: float  # bytes/s
    hbm_bytes: int
    l2_bytes: int
    l2_bw: float  # bytes/s
    smem_per_sm: int  # bytes of shared memory one SM can give to kernels
    process_scale: float  # energy per op relative to TSMC N7 (A100)
    sources: tuple[str, ...]


# NVIDIA A100 Tensor Core GPU data sheet (A100 80GB SXM4) and "NVIDIA A100 Tensor Core GPU
# Architecture" white paper (2020): 108 SMs at 1410 MHz boost, 64 FP32 lanes per SM
# (108 * 64 * 2 * 1.41 GHz = 19.5 TFLOP/s); TF32 156, FP16/BF16 312 TFLOP/s and INT8 624 TOP/s on
# tensor cores (dense); HBM2e 2039 GB/s (the 40 GB HBM2 part: 1555 GB/s); 40 MB L2 delivering
# 5120 B/clk; up to 164 KB shared memory per SM.
A100 = GPU(
    name="A100-SXM4-80GB", sms=108, clock_hz=1.41e9,
    peak={"float32": 19.5 * T, "tfloat32": 156 * T, "float16": 312 * T, "bfloat16": 312 * T,
          "int8": 624 * T},
    hbm="HBM2e", hbm_bw=2039 * G, hbm_bytes=80 * 2**30, l2_bytes=40 * M,
    l2_bw=5120 * 1.41e9, smem_per_sm=164 * K, process_scale=1.0,
    sources=("NVIDIA A100 Tensor Core GPU data sheet (80GB SXM4)",
             "NVIDIA A100 Tensor Core GPU Architecture white paper, 2020"))

# NVIDIA H100 Tensor Core GPU data sheet (H100 SXM5 80GB) and "NVIDIA H100 Tensor Core GPU
# Architecture" white paper (2022): 132 SMs at 1980 MHz boost, 128 FP32 lanes per SM
# (132 * 128 * 2 * 1.98 GHz = 66.9 TFLOP/s); dense tensor-core TF32 494.5, FP16/BF16 989.5
# TFLOP/s, INT8 1979 TOP/s (the data sheet's 989/1979/3958 figures are with sparsity);
# HBM3 3.35 TB/s; 50 MB L2; up to 228 KB shared memory per SM. The L2 bandwidth is not in the
# data sheet: estimated at the A100's 5120 B/clk at the H100 clock.
H100 = GPU(
    name="H100-SXM5-80GB", sms=132, clock_hz=1.98e9,
    peak={"float32": 67 * T, "tfloat32": 494.5 * T, "float16": 989.5 * T, "bfloat16": 989.5 * T,
          "int8": 1979 * T},
    hbm="HBM3", hbm_bw=3350 * G, hbm_bytes=80 * 2**30, l2_bytes=50 * M,
    l2_bw=5120 * 1.98e9, smem_per_sm=228 * K, process_scale=0.8,
    sources=("NVIDIA H100 Tensor Core GPU data sheet (SXM5)",
             "NVIDIA H100 Tensor Core GPU Architecture white paper, 2022"))

GPUS = {"sm_80": A100, "sm_90": H100}
DEFAULT_ARCH = "sm_80"
REGISTER_FILE_PER_SM = 256 * K  # 64 K 32-bit registers per SM on both
THREADS_PER_BLOCK = 1024
STATIC_SMEM_PER_BLOCK = 48 * K  # what a kernel may use without opting in to more


def _levels(gpu: GPU) -> tuple[tuple[str, int, float, float], ...]:
    """Registers, shared memory, L2, HBM: (name, bytes, bytes/s, J per byte).

    Bandwidths: registers 3 operands x 4 B x 128 lanes per SM per clock; shared memory 32 banks x
    4 B per SM per clock. Energy per byte is an estimate: SRAM access 50 pJ per 32 B from an 8 KB
    bank at 40 nm (Keckler et al., "GPUs and the Future of Parallel Computing", IEEE Micro 2011)
    scaled ~4x to N7 for registers and ~2x up for the larger shared memory; L2 adds the on-chip
    wire (~26 pJ per 32 B per 10 mm, same source); HBM2 ~3.9 pJ/bit (O'Connor et al.,
    "Fine-Grained DRAM", MICRO 2017). On-chip figures scale with the process (`process_scale`).
    """
    s = gpu.process_scale
    return (
        ("registers", REGISTER_FILE_PER_SM * gpu.sms, 3 * 4 * 128 * gpu.sms * gpu.clock_hz,
         0.4e-12 * s),
        ("SMEM", gpu.smem_per_sm * gpu.sms, 128 * gpu.sms * gpu.clock_hz, 1.0e-12 * s),
        ("L2", gpu.l2_bytes, gpu.l2_bw, 5.0e-12 * s),
        (gpu.hbm, gpu.hbm_bytes, gpu.hbm_bw, 31e-12),
    )


def gpu_spec(gpu: GPU) -> TargetSpec:
    """The TargetSpec of one GPU.

    Energy per MAC: Horowitz (ISSCC 2014) 45 nm fp32 mul+add 4.6 pJ, fp16 1.5 pJ, int8 0.23 pJ,
    scaled ~4x down to N7 (and by `process_scale` beyond).
    """
    s = gpu.process_scale
    return TargetSpec(
        peak_flops=dict(gpu.peak), mem_bw=gpu.hbm_bw, on_chip_bytes=gpu.l2_bytes,
        vector_lanes=32,  # one warp
        cores=gpu.sms,
        dtypes=("float32", "tfloat32", "float16", "bfloat16", "int8"),
        # Tensor cores support 2:4 sparsity, but hwopt's kernels do not use it: not claimed.
        sparsity_formats=(),
        mem_levels=_levels(gpu),
        energy_per_mac={"float32": 1.2e-12 * s, "tfloat32": 0.6e-12 * s,
                        "float16": 0.4e-12 * s, "bfloat16": 0.4e-12 * s, "int8": 0.06e-12 * s},
        clock_hz=gpu.clock_hz)


def tvm_target_dict(arch: str, gpu: GPU) -> dict:
    """TVM 0.27 target dict: the CUDA device with its limits, the host CPU code as generic x86-64.

    The host part only launches kernels, so it is built for any x86-64 CPU (not this one's).
    """
    return {"kind": "cuda", "arch": arch, "max_num_threads": THREADS_PER_BLOCK,
            "max_threads_per_block": THREADS_PER_BLOCK, "thread_warp_size": 32,
            "max_shared_memory_per_block": STATIC_SMEM_PER_BLOCK,
            "registers_per_block": 65536, "l2_cache_size_bytes": gpu.l2_bytes,
            "host": {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}}


@functools.lru_cache(maxsize=None)
def runs_here() -> bool:
    """True only when both PyTorch and TVM can use a CUDA device on this machine."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import tvm

        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001 - a broken driver means "cannot run here"
        return False


def make_target(arch: str = DEFAULT_ARCH) -> Target:
    """The cuda `Target` for `arch` (``sm_80`` or ``sm_90``)."""
    if arch not in GPUS:
        raise OptionError(f"unsupported CUDA architecture {arch!r} for target 'cuda'."
                          f"{did_you_mean(arch, list(GPUS))} Set HWOPT_CUDA_ARCH to one of: "
                          f"{', '.join(GPUS)}")
    gpu = GPUS[arch]
    spec = gpu_spec(gpu)
    return Target(
        name="cuda",
        description=f"NVIDIA {gpu.name} ({arch}): CUDA kernels built by TVM (dlight schedules)",
        spec=spec,
        cost_model=RooflineModel.from_spec(spec),
        tvm_target=functools.partial(tvm_target_dict, arch, gpu),
        runs_here=runs_here,
        default_passes=("fuse",),
        schedule_lanes=spec.vector_lanes,
        lowering=CUDALowering(arch),
        extra={"arch": arch, "gpu": gpu.name, "sources": list(gpu.sources)})


TARGET = make_target(os.environ.get("HWOPT_CUDA_ARCH", DEFAULT_ARCH))
