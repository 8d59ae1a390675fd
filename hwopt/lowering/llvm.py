"""LLVM lowering: how CPU-class targets (cpu, arm64) turn a Relax module into a shared library.

A target's ``lowering`` object is the *lower* step's per-target part (see hwopt.lowering.region):
``prepare`` (Relax phases) -> ``schedule`` (the target's schedule rules) -> ``build`` -> ``export``
(files for the cache and for ``Artifact.save``) -> ``load`` (a runnable VM, where the code runs
here). Targets that are not LLVM CPUs (cuda, fpga) provide their own object with the same methods.
"""
from __future__ import annotations

from pathlib import Path


class LLVMLowering:
    """hwopt's CPU schedule rules (``hwopt.schedules``) at `lanes` fp32 lanes, built by LLVM.

    `cross_compiler` names a C++ compiler driver (e.g. ``aarch64-linux-gnu-g++``) used to link the
    shared library when the code is for another machine; None links with the host's compiler.
    `int8_dot` is the integer dot product quantized layers are imported for ("i16" or "vnni",
    see ``hwopt.lowering.qdq.converters``).
    """

    def __init__(self, lanes: int, cross_compiler: str | None = None, conv_layout: str = "NHWC",
                 int8_dot: str = "i16"):
        self.lanes, self.cross_compiler, self.conv_layout = lanes, cross_compiler, conv_layout
        self.int8_dot = int8_dot

    def prepare(self, mod, tvm_target):
        from hwopt.lowering.relax_import import prepare

        return prepare(mod, tvm_target, self.conv_layout)

    def schedule(self, mod, tvm_target, pick=None, override=None):
        from hwopt.schedules import schedule_module
        from hwopt.schedules.lookup import use_vbmi_lookups

        mod, choices = schedule_module(mod, lanes=self.lanes, pick=pick, override=override)
        return use_vbmi_lookups(mod, tvm_target, choices)  # int8 table lookups (AVX-512 VBMI)

    def measure(self, func, tvm_target) -> float:
        """Seconds of one call of a scheduled PrimFunc (only where the code runs here)."""
        from hwopt.schedules import measure_func

        return measure_func(func, tvm_target)

    def build(self, mod, tvm_target):
        from hwopt.lowering.relax_import import build

        return build(mod, tvm_target)

    def export(self, executable, folder: Path, name: str) -> list[str]:
        """Write ``<name>.so`` (linked for the target) into `folder`; returns the file names."""
        kwargs = {}
        if self.cross_compiler:
            from tvm.support import cc

            kwargs["fcompile"] = cc.cross_compiler(self.cross_compiler)
        from hwopt.lowering.runtime import quiet_scope_logs

        with quiet_scope_logs():
            executable.export_library(str(Path(folder) / f"{name}.so"), **kwargs)
        return [f"{name}.so"]

    def device(self):
        import tvm

        return tvm.cpu()

    def load(self, folder: Path, files: list[str]):
        """A Relax VM over a library written by `export` (only where the code runs here),
        loaded with TVM's runtime only (hwopt.lowering.runtime)."""
        from hwopt.lowering.runtime import RuntimeVM

        return RuntimeVM(Path(folder) / files[0])

    def vm(self, executable):
        from tvm import relax

        return relax.VirtualMachine(executable, self.device())
