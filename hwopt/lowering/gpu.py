"""CUDA lowering: how the cuda target turns a Relax module into GPU kernels and files.

The GPU counterpart of `hwopt.lowering.llvm.LLVMLowering`, used by `hwopt.lowering.region`:
``prepare`` (Relax phases: decompose, legalize, fuse; conv2d stays NCHW) -> ``schedule`` (TVM's
dlight GPU rules; every kernel must get block/thread bindings) -> ``build`` -> ``export``
(``<name>.cu`` CUDA C++, ``<name>.ptx`` from nvcc, ``<name>.so`` host code + device module)
-> ``load`` / ``vm`` (a Relax VM on the GPU, only where one is present).

How device code is produced: TVM 0.27 keeps CUDA *source* in the built module when it has no
CUDA runtime (as here) and compiles it when the module is created on a machine with one, through
the global ``tvm_callback_cuda_compile``. hwopt registers that callback (`_device_code`): it
returns PTX compiled by nvcc for this lowering's arch, reusing the PTX written by ``export``.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from hwopt.errors import LoweringError

log = logging.getLogger("hwopt")

# dlight's default GPU rules, in the order TVM's own CUDA pipeline tries them.
RULE_NAMES = ("Matmul", "GEMV", "Reduction", "GeneralReduction", "Fallback")

# As TVM's nvcc driver (tvm.support.nvcc), but without --use_fast_math: results must match
# PyTorch to 1e-4 (fast math approximates exp, division and sqrt).
NVCC_FLAGS = ("-O3", "-w", "--expt-relaxed-constexpr",
              "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__")


def find_nvcc() -> str | None:
    """Path of nvcc: PATH, then $CUDA_HOME/bin, then /usr/local/cuda/bin."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and Path(root, "bin", "nvcc").is_file():
            return str(Path(root, "bin", "nvcc"))
    return None


def nvcc_ptx(source: str, arch: str) -> bytes:
    """PTX for `arch` (e.g. ``sm_80``) of a CUDA C++ source, compiled by nvcc."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise LoweringError("nvcc not found: install the CUDA toolkit or put nvcc on PATH "
                            "(or set CUDA_HOME)", target="cuda")
    with tempfile.TemporaryDirectory(prefix="hwopt-nvcc-") as tmp:
        cu, ptx = Path(tmp, "kernels.cu"), Path(tmp, "kernels.ptx")
        cu.write_text(source)
        cmd = [nvcc, "-ptx", f"-arch={arch}", *NVCC_FLAGS, "-o", str(ptx), str(cu)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise LoweringError(f"nvcc -ptx -arch={arch} failed on TVM's CUDA source:\n{tail}",
                                target="cuda")
        return ptx.read_bytes()


class _DeviceCode:
    """PTX by (source digest, arch), and the ``tvm_callback_cuda_compile`` that serves it.

    The callback receives only the source; the arch comes from `for_arch` (the lowering that is
    building or loading), or TVM's own callback handles it when none is active.
    """

    def __init__(self):
        self.ptx: dict[tuple[str, str], bytes] = {}
        self.local = threading.local()
        self.previous = None
        self.installed = False
        self.lock = threading.Lock()

    @staticmethod
    def digest(source: str) -> str:
        return hashlib.sha256(source.encode()).hexdigest()

    def get(self, source: str, arch: str) -> bytes:
        key = (self.digest(source), arch)
        if key not in self.ptx:
            self.ptx[key] = nvcc_ptx(source, arch)
        return self.ptx[key]

    def put(self, source: str, arch: str, ptx: bytes) -> None:
        self.ptx[(self.digest(source), arch)] = ptx

    @contextlib.contextmanager
    def for_arch(self, arch: str):
        self.install()
        stack = self.local.__dict__.setdefault("archs", [])
        stack.append(arch)
        try:
            yield
        finally:
            stack.pop()

    def _compile(self, source: str) -> bytes:
        archs = self.local.__dict__.get("archs")
        known = archs and (self.digest(source), archs[-1]) in self.ptx
        if not archs or (not known and find_nvcc() is None):
            # Not an hwopt build or load, or no nvcc here: TVM's own compiler (nvrtc or nvcc).
            if self.previous is None:
                raise LoweringError("no CUDA compiler for TVM's kernels: install the CUDA "
                                    "toolkit (nvcc) or cuda-bindings (NVRTC)", target="cuda")
            return self.previous(source)
        # A trailing NUL: the driver reads PTX as a C string.
        return self.get(source, archs[-1]) + b"\0"

    def install(self) -> None:
        import tvm_ffi

        with self.lock:
            if self.installed:
                return
            self.previous = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", self._compile, override=True)
            self.installed = True


_device_code = _DeviceCode()


def cuda_source(executable) -> str:
    """The CUDA C++ of a built executable (its module of kind ``cuda``)."""
    stack = [executable.mod]
    while stack:
        mod = stack.pop()
        if mod.kind == "cuda":
            src = mod.inspect_source("cuda") or mod.inspect_source()
            if src:
                return src
        stack.extend(mod.imports)
    raise LoweringError("the built module has no CUDA device module (no kernels?)", target="cuda")


def thread_bound(func) -> bool:
    """True when a PrimFunc launches GPU threads (a loop bound to blockIdx/threadIdx)."""
    import tvm_ffi
    from tvm import tirx

    found = False

    def visit_for(node):
        nonlocal found
        if node.kind == tirx.ForKind.THREAD_BINDING:
            found = True

    def visit_attr(node):
        nonlocal found
        if node.attr_key == "thread_extent":
            found = True

    tvm_ffi.structural_walk(func.body, [(tirx.For, visit_for), (tirx.AttrStmt, visit_attr)],
                            order="post")
    return found


def _apply_rules(name: str, func, tvm_target):
    """(scheduled func, rule name) from the first dlight rule that applies."""
    from tvm.s_tir import dlight as dl

    errors = []
    for rule_name in RULE_NAMES:
        rule = getattr(dl.gpu, rule_name)()
        try:
            space = rule.apply(func, tvm_target, False)
        except Exception as err:  # noqa: BLE001 - an unsupported pattern: try the next rule
            errors.append(f"{rule_name}: {str(err).splitlines()[0][:160]}")
            continue
        if space is None:
            continue
        sch = space[0] if isinstance(space, list) else space
        out = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        if thread_bound(out):
            return out, f"dlight.{rule_name}"
        errors.append(f"{rule_name}: left the kernel without thread bindings")
    why = "; ".join(errors) or "no rule matched"
    raise LoweringError(f"no dlight GPU rule scheduled kernel {name} ({why}); it cannot be built "
                        "without thread bindings. Keep the op in PyTorch (strict=False does) or "
                        "add a GPU schedule rule for it", node=name, target="cuda")


class CUDALowering:
    """dlight GPU schedules for `arch` (``sm_80``/``sm_90``), CUDA code built by TVM."""

    torch_device = "cuda"  # TVMRegion moves inputs there and outputs back

    def __init__(self, arch: str = "sm_80"):
        self.arch = arch

    def prepare(self, mod, tvm_target):
        """Decompose, canonicalise, legalize, fuse. No NHWC: dlight's rules take NCHW conv2d."""
        from hwopt.lowering.relax_import import prepare

        return prepare(mod, tvm_target, conv_layout="NCHW")

    def schedule(self, mod, tvm_target, pick=None):
        """Every PrimFunc scheduled by dlight: ``(mod, {func name: Choice(rule, ())})``.

        `pick` (tile choice by measurement) is not used: dlight rules have no candidates.
        """
        import tvm
        from tvm import tirx

        from hwopt.schedules import Choice

        out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        choices = {}
        with tvm_target:
            for gv, func in list(mod.functions.items()):
                if not isinstance(func, tirx.PrimFunc):
                    continue
                attrs = func.attrs
                if attrs is not None and int(attrs.get("tirx.is_scheduled", 0)):
                    choices[gv.name_hint] = Choice("prescheduled", ())
                    continue
                out[gv], rule = _apply_rules(gv.name_hint, func, tvm_target)
                choices[gv.name_hint] = Choice(rule, ())
        return out, choices

    def build(self, mod, tvm_target):
        from hwopt.lowering.relax_import import build

        with _device_code.for_arch(self.arch):  # a CUDA runtime compiles the kernels now
            return build(mod, tvm_target)

    def export(self, executable, folder: Path, name: str) -> list[str]:
        """Write ``<name>.so``, ``<name>.cu`` and ``<name>.ptx`` (when nvcc is found)."""
        folder = Path(folder)
        src = cuda_source(executable)
        (folder / f"{name}.cu").write_text(src)
        files = [f"{name}.so", f"{name}.cu"]
        if find_nvcc() is not None:
            (folder / f"{name}.ptx").write_bytes(_device_code.get(src, self.arch))
            files.append(f"{name}.ptx")
        else:
            log.warning("hwopt: nvcc not found, %s.ptx not written; the library compiles its "
                        "CUDA source when it is loaded on a GPU machine", name)
        from hwopt.lowering.runtime import quiet_scope_logs

        with quiet_scope_logs():
            executable.export_library(str(folder / f"{name}.so"))
        return files

    def device(self):
        import tvm

        return tvm.cuda(0)

    def load(self, folder: Path, files: list[str]):
        """A Relax VM over files written by `export` (only where a GPU is present)."""
        import tvm
        from tvm import relax

        folder = Path(folder)
        cu = [f for f in files if f.endswith(".cu")]
        ptx = [f for f in files if f.endswith(".ptx")]
        if cu and ptx:  # the library carries the source: serve the PTX compiled at export
            _device_code.put((folder / cu[0]).read_text(), self.arch,
                             (folder / ptx[0]).read_bytes())
        with _device_code.for_arch(self.arch):
            lib = tvm.runtime.load_module(str(folder / next(f for f in files if f.endswith(".so"))))
        return relax.VirtualMachine(lib, self.device())

    def vm(self, executable):
        from tvm import relax

        return relax.VirtualMachine(executable, self.device())
