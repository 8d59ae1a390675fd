"""Loading a compiled library with TVM's runtime only: the cache-hit and artifact path.

``import tvm`` loads the compiler library (260 MB, about 1.6 s here); running a Relax VM needs
only ``libtvm_runtime`` (3 MB, 30 ms) through ``tvm_ffi``. Regions loaded from the compile cache
or from a saved artifact use this; building still imports TVM. Both share one runtime library,
so a process can load some regions this way and build others.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
import threading
from pathlib import Path

# Relax VM allocator kinds (tvm.runtime.vm.VirtualMachine.POOLED_ALLOCATOR)
POOLED_ALLOCATOR = 2
KDL_CPU = 1
_FD_LOCK = threading.RLock()  # one redirect of fd 2 at a time


@functools.lru_cache(maxsize=None)
def _runtime():
    import tvm_ffi

    if "tvm" not in sys.modules:
        from tvm_ffi.libinfo import load_lib_ctypes

        libdir = _tvm_lib_dir()
        load_lib_ctypes("tvm", "tvm_runtime", "RTLD_GLOBAL",
                        extra_lib_paths=[libdir] if libdir else None)
    return tvm_ffi


def _tvm_lib_dir() -> Path | None:
    from importlib.util import find_spec

    spec = find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(list(spec.submodule_search_locations)[0]) / "lib"
    return lib if lib.is_dir() else None


@contextlib.contextmanager
def quiet_scope_logs():
    """TVM 0.27 logs ``Warning: Scope Saving:`` / ``Scope Loaded:`` to stderr for every constant
    when it saves or loads an executable; those lines are dropped, anything else written
    meanwhile is passed on."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    with _FD_LOCK, tempfile.TemporaryFile() as tmp:
        saved = os.dup(fd)
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode(errors="replace").splitlines(True)
                    if "Warning: Scope " not in ln]
            if kept:
                sys.stderr.write("".join(kept))


class RuntimeVM:
    """A Relax VM over an exported library, on the CPU: ``vm["main"](*tensors)``."""

    def __init__(self, path: str | Path):
        ffi = _runtime()
        with quiet_scope_logs():
            lib = ffi.load_module(str(path))
            self.module = lib["vm_load_executable"]()
        self.module["vm_initialization"](KDL_CPU, 0, POOLED_ALLOCATOR)
        self.lib = lib  # the VM's code lives in it: keep it loaded

    def __getitem__(self, name: str):
        return self.module[name]


def from_dlpack():
    """The DLPack import TVMRegion uses (no ``import tvm``)."""
    return _runtime().from_dlpack
