"""Files the ``fpga`` target writes for one int8 layer (``art.save(dir)``).

Called by `hwopt.fpga.lowering.FPGALayerRegion.export` from `hwopt.aot.Artifact.save`. Per layer:
``<name>.c`` (TVM's C kernel + the plain entry point), ``<name>.h`` (prototype, sizes, where the
parameters lie in the .bin, the cycle estimate) and ``<name>.bin`` (int8 weights, int32 bias,
multiplier and shift, little-endian). Shared by all layers: ``hwopt_fpga.h``, ``hwopt_fpga_rt.c``
and a ``Makefile`` that builds every kernel into a shared library for host simulation.
"""
from __future__ import annotations

from pathlib import Path

from hwopt.fpga.cbuild import include_dirs, write_support
from hwopt.fpga.codegen import Kernel, c_name
from hwopt.fpga.int8layer import Int8Layer
from hwopt.fpga.systolic import FPGAConfig, LayerCycles

MAKEFILE = """\
# Builds each hwopt fpga kernel into lib<name>.so for host simulation (gcc, no TVM library).
# The kernels include TVM-FFI / DLPack headers: point these at a TVM-FFI checkout elsewhere.
TVM_FFI_INC ?= {ffi}
TVM_INC ?= {tvm}
CFLAGS ?= -O2 -fPIC -Wno-unknown-pragmas
KERNELS := $(filter-out hwopt_fpga_rt.c,$(wildcard *.c))
all: $(KERNELS:%.c=lib%.so)
lib%.so: %.c hwopt_fpga_rt.c hwopt_fpga.h
\t$(CC) $(CFLAGS) -shared -I$(TVM_FFI_INC) -I$(TVM_INC) -I. $< hwopt_fpga_rt.c -o $@
clean:
\trm -f lib*.so
"""


def export_layer(layer: Int8Layer, kernel: Kernel, lc: LayerCycles, cfg: FPGAConfig,
                 folder: Path, name: str) -> list[str]:
    """Write `layer`'s kernel files into `folder` under `name`; returns the file names."""
    folder.mkdir(parents=True, exist_ok=True)
    files = write_support(folder)
    dirs = list(include_dirs()) + ["", ""]
    (folder / "Makefile").write_text(MAKEFILE.format(ffi=dirs[0], tvm=dirs[1]))
    (folder / f"{name}.c").write_text(kernel.source)
    params = [layer.weight, layer.bias, layer.mult, layer.shift]
    blob = b"".join(t.contiguous().numpy().astype(t.numpy().dtype.newbyteorder("<")).tobytes()
                    for t in params)
    (folder / f"{name}.bin").write_bytes(blob)
    (folder / f"{name}.h").write_text(_header(layer, kernel, lc, cfg, name))
    return [f"{name}.c", f"{name}.h", f"{name}.bin", *files, "Makefile"]


def _header(layer: Int8Layer, kernel: Kernel, lc: LayerCycles, cfg: FPGAConfig,
            name: str) -> str:
    guard = f"HWOPT_FPGA_{c_name(name).upper()}_H"
    macro = f"HWOPT_FPGA_{c_name(layer.name).upper()}"
    sizes = [int(_numel(s)) for s in kernel.arg_shapes]
    o = layer.out_channels
    offsets = [0, sizes[1], sizes[1] + 4 * o, sizes[1] + 8 * o]
    lines = [
        f"/* hwopt fpga layer {layer.name}: int8 {layer.kind}, GEMM m={layer.gemm.m} "
        f"n={layer.gemm.n} k={layer.gemm.k} groups={layer.gemm.groups}.",
        f" * Estimate on a {cfg.rows}x{cfg.cols} {cfg.dataflow} array at "
        f"{cfg.clock_hz / 1e6:.0f} MHz: {lc.cycles} cycles ({lc.compute_cycles} compute, "
        f"{lc.stall_cycles} stall), utilization {lc.utilization:.3f}.",
        f" * Requantization: y = clamp(zp_out + ((acc + bias) * mult + 2^(shift-1)) >> shift, "
        f"lo, hi), zp_in={layer.zp_in} (padding value), zp_out={layer.zp_out}, "
        f"lo={layer.lo}, hi={layer.hi}.",
        f" * {name}.bin: weight int8[{sizes[1]}] at {offsets[0]}, bias int32[{o}] at "
        f"{offsets[1]}, mult int32[{o}] at {offsets[2]}, shift int32[{o}] at {offsets[3]}. */",
        f"#ifndef {guard}", f"#define {guard}", '#include "hwopt_fpga.h"',
        f"#define {macro}_IN_ELEMS {sizes[0]}", f"#define {macro}_OUT_ELEMS {sizes[5]}",
        f"#define {macro}_CYCLES {lc.cycles}",
        f"int32_t {kernel.symbol}(const int8_t* x, const int8_t* w, const int32_t* bias, "
        "const int32_t* mult, const int32_t* shift, int8_t* y);",
        "#endif", ""]
    return "\n".join(lines)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
