"""Compile and call the ``fpga`` target's generated C on the host (gcc + ctypes).

Used by `hwopt.fpga.lowering` (``run="c"``: the artifact calls the compiled kernels) and by the
tests that check the C against the simulator bit for bit. Also holds the two support files every
export writes next to the kernels: the header ``hwopt_fpga.h`` and ``hwopt_fpga_rt.c``, which
provides the two TVM runtime symbols the kernels reference (error reporting, workspace memory),
so no TVM library is needed to link or run them.
"""
from __future__ import annotations

import ctypes
import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from hwopt.errors import LoweringError

HEADER_TEXT = """\
/* hwopt fpga target: shared declarations of the generated int8 kernels. */
#ifndef HWOPT_FPGA_H
#define HWOPT_FPGA_H
#include <stdint.h>
#include <stddef.h>
#include "tvm/ffi/c_api.h"

/* Wrap a dense int tensor as the packed-call argument TVM's kernels take. */
static inline void hwopt_fpga_arg(TVMFFIAny* a, DLTensor* t, void* data, int64_t* shape,
                                  int32_t ndim, uint8_t bits) {
  t->data = data; t->device.device_type = kDLCPU; t->device.device_id = 0; t->ndim = ndim;
  t->dtype.code = kDLInt; t->dtype.bits = bits; t->dtype.lanes = 1; t->shape = shape;
  t->strides = NULL; t->byte_offset = 0;
  a->type_index = kTVMFFIDLTensorPtr; a->zero_padding = 0; a->v_ptr = t;
}

/* The message of the last failed kernel call (argument checks), or "". */
const char* hwopt_fpga_last_error(void);
#endif
"""

RUNTIME_TEXT = """\
/* hwopt fpga target: the TVM runtime symbols the generated kernels reference. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>

static char hwopt_fpga_error[512];

const char* hwopt_fpga_last_error(void) { return hwopt_fpga_error; }

void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t n) {
  size_t used = (size_t)snprintf(hwopt_fpga_error, sizeof(hwopt_fpga_error), "%s: ", kind);
  for (int32_t i = 0; i < n && used < sizeof(hwopt_fpga_error); ++i) {
    used += (size_t)snprintf(hwopt_fpga_error + used, sizeof(hwopt_fpga_error) - used, "%s",
                             parts[i]);
  }
}

void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* msg) {
  snprintf(hwopt_fpga_error, sizeof(hwopt_fpga_error), "%s: %s", kind, msg);
}

void* TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes,
                               int dtype_code_hint, int dtype_bits_hint) {
  (void)device_type; (void)device_id; (void)dtype_code_hint; (void)dtype_bits_hint;
  return malloc(nbytes ? nbytes : 1);
}

int TVMBackendFreeWorkspace(int device_type, int device_id, void* ptr) {
  (void)device_type; (void)device_id;
  free(ptr);
  return 0;
}
"""


@functools.lru_cache(maxsize=None)
def include_dirs() -> tuple[str, ...]:
    """Header folders the generated C includes (TVM-FFI, DLPack, TVM runtime)."""
    import tvm
    import tvm_ffi

    dirs = [Path(tvm_ffi.__file__).parent / "include", Path(tvm.__file__).parent / "include"]
    return tuple(str(d) for d in dirs if d.is_dir())


def compiler() -> str:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise LoweringError("no C compiler found to build the fpga kernels for simulation; "
                            "install gcc or use the simulator (run='sim')", target="fpga")
    return cc


def write_support(folder: Path) -> list[str]:
    (folder / "hwopt_fpga.h").write_text(HEADER_TEXT)
    (folder / "hwopt_fpga_rt.c").write_text(RUNTIME_TEXT)
    return ["hwopt_fpga.h", "hwopt_fpga_rt.c"]


def compile_so(source: str, folder: Path, name: str) -> Path:
    """Build `source` (one kernel's C) with the runtime shim into ``folder/lib<name>.so``."""
    folder.mkdir(parents=True, exist_ok=True)
    write_support(folder)
    src = folder / f"{name}.c"
    src.write_text(source)
    out = folder / f"lib{name}.so"
    cmd = [compiler(), "-O2", "-shared", "-fPIC", "-Wno-unknown-pragmas", "-Wl,-Bsymbolic",
           *(f"-I{d}" for d in include_dirs()), f"-I{folder}", str(src),
           str(folder / "hwopt_fpga_rt.c"), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LoweringError(f"gcc could not build the kernel of layer {name}: "
                            f"{proc.stderr.strip()[-800:]}", target="fpga")
    return out


class CKernel:
    """A compiled kernel called through ctypes on torch tensors (no copies)."""

    def __init__(self, kernel, folder: Path | None = None):
        self.kernel = kernel
        self._tmp = None
        if folder is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="hwopt-fpga-")
            folder = Path(self._tmp.name)
        self.lib = ctypes.CDLL(str(compile_so(kernel.source, Path(folder), kernel.layer)))
        self.fn = getattr(self.lib, kernel.symbol)
        self.fn.restype = ctypes.c_int32
        self.fn.argtypes = [ctypes.c_void_p] * 6
        self.lib.hwopt_fpga_last_error.restype = ctypes.c_char_p

    def __call__(self, x, w, bias, mult, shift) -> torch.Tensor:
        args = [t.contiguous() for t in (x, w, bias, mult, shift)]
        y = torch.empty(self.kernel.arg_shapes[5], dtype=torch.int8)
        rc = self.fn(*(t.data_ptr() for t in args), y.data_ptr())
        if rc != 0:
            msg = self.lib.hwopt_fpga_last_error().decode(errors="replace")
            raise LoweringError(f"fpga kernel {self.kernel.symbol} failed: {msg}", target="fpga")
        return y
