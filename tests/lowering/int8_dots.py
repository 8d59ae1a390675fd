"""Test helper: the integer dot-product forms this host runs, and the cpu target for each."""
from __future__ import annotations

import dataclasses

import pytest
from hwopt.targets.cpu import TARGET as CPU

from hwopt.lowering.llvm import LLVMLowering

LANES = CPU.schedule_lanes
# schedule rule names of the integer (conv, matmul) kernels per form
RULE = {"i16": ("conv2d_nhwc_int16", "dense_int16"), "vnni": ("conv2d_nhwc_vnni", "dense_vnni")}


def dots():
    """pytest params: int16 pairs on any AVX2/AVX-512 x86, VNNI where present."""
    out = [pytest.param("i16", marks=pytest.mark.skipif(
        LANES not in (8, 16), reason="vpmaddwd kernels are for x86 AVX2/AVX-512"))]
    out.append(pytest.param("vnni", marks=pytest.mark.skipif(
        CPU.lowering.int8_dot != "vnni", reason="this CPU has no AVX-512 VNNI")))
    return out


def target(dot: str):
    """The cpu target with quantized layers imported for `dot`."""
    return dataclasses.replace(CPU, lowering=LLVMLowering(LANES, int8_dot=dot))
