"""Run a saved cross-compiled artifact (``Artifact.save``) under user-mode emulation.

After the *lower* step has written an aarch64 library (target ``arm64``), this runs it here: the
device's Python (an aarch64 python3.11 with the TVM runtime, installed by
``scripts/setup_arm64.sh``) is started under ``qemu-aarch64 -L <sysroot>`` on
``hwopt/emulate_runner.py``, which loads the region library into the Relax VM and runs it; inputs
and outputs cross as .npy files. The host plan (host_plan.py) needs PyTorch, which the emulated
Python lacks, so only artifacts whose whole graph is one TVM region can run this way.
Timings under emulation say nothing about the device's speed.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hwopt.errors import HwoptError

log = logging.getLogger("hwopt")
RUNNER = Path(__file__).with_name("emulate_runner.py")
SETUP = "bash scripts/setup_arm64.sh"


class EmulatorUnavailable(HwoptError):
    """qemu-user or the device sysroot is missing; the message says what and how to install it."""


@dataclass(frozen=True)
class Emulator:
    """How to start the device's Python: ``qemu -L sysroot python`` (or natively)."""

    python: str
    qemu: str | None = None  # None: the host is the device's architecture
    sysroot: Path | None = None
    site: Path | None = None

    def command(self, *args: str) -> list[str]:
        env = ["TVM_USE_RUNTIME_LIB=1"] + ([f"PYTHONPATH={self.site}"] if self.site else [])
        if self.qemu is None:
            return ["env", *env, self.python, *args]
        flags = [f for e in env for f in ("-E", e)]
        return [self.qemu, "-L", str(self.sysroot), *flags, self.python, *args]


@dataclass
class EmulatedRun:
    outputs: list[np.ndarray]
    import_s: float = 0.0  # starting the device's Python and importing the TVM runtime
    load_s: float = 0.0  # loading the library into the Relax VM
    run_s: list[float] = field(default_factory=list)  # each call of main
    wall_s: float = 0.0  # the whole subprocess


def emulator_root() -> Path:
    """Where setup_arm64.sh put the sysroot and site dir ($HWOPT_ARM64_ROOT to override)."""
    env = os.environ.get("HWOPT_ARM64_ROOT")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hwopt-arm64"


def find_emulator(arch: str = "aarch64") -> Emulator:
    """The `Emulator` for `arch`; raises EmulatorUnavailable naming what is missing."""
    if arch != "aarch64":
        raise EmulatorUnavailable(f"no emulator for {arch!r}: only aarch64 (target 'arm64') is "
                                  "supported")
    if platform.machine().lower() in ("aarch64", "arm64"):
        return Emulator(python=sys.executable)
    qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    root = emulator_root()
    python, site = root / "sysroot" / "usr" / "bin" / "python3.11", root / "site"
    missing = [what for what, ok in (("qemu-aarch64 (Debian package qemu-user)", qemu),
                                     (f"the aarch64 Python {python}", python.exists()),
                                     (f"the aarch64 TVM runtime in {site}",
                                      (site / "tvm").is_dir())) if not ok]
    if missing:
        raise EmulatorUnavailable(f"cannot emulate aarch64: missing {', '.join(missing)}; run "
                                  f"`{SETUP}` (as root) to install them")
    return Emulator(python=str(python), qemu=qemu, sysroot=root / "sysroot", site=site)


def emulator_status(arch: str = "aarch64") -> tuple[bool, str]:
    """(available, reason) without raising: for skips and ``hwopt targets``."""
    try:
        find_emulator(arch)
        return True, ""
    except EmulatorUnavailable as e:
        return False, str(e)


def _arch_of(manifest: dict) -> str:
    triple = (manifest.get("tvm_target") or {}).get("mtriple") or platform.machine()
    return triple.split("-")[0]


def single_region(folder: Path, manifest: dict) -> dict:
    """The manifest entry of the one TVM region that is the whole graph, or a clear error."""
    regions = manifest.get("regions", [])
    tvm_regions = [r for r in regions if r.get("executor") == "tvm" and r.get("files")]
    plan = folder / "host_plan.py"
    # A partitioned graph calls its regions from the host plan (self.hwopt_region_N(...)).
    partitioned = plan.exists() and "self.hwopt_region_" in plan.read_text()
    if len(regions) == 1 and len(tvm_regions) == 1 and not partitioned:
        return tvm_regions[0]
    desc = ", ".join(f"{r.get('name')}: {r.get('executor')}" for r in regions) or "none"
    raise HwoptError(
        f"artifact {folder} (target {manifest.get('target')!r}) is not one TVM region "
        f"(regions: {desc}{'; PyTorch ops run between them' if partitioned else ''}); the "
        "emulated Python has no PyTorch to run host_plan.py, so only artifacts whose whole graph "
        "is one TVM region run under emulation. Compile with strict=True to see which ops stay "
        "in PyTorch, or run the artifact on the device")


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor (torch is not needed otherwise)
        x = x.detach().cpu().contiguous().numpy()
    return np.ascontiguousarray(np.asarray(x))


def emulate(folder, inputs, *, repeat: int = 1, timeout_s: float = 600.0,
            emulator: Emulator | None = None) -> EmulatedRun:
    """Run a saved single-region artifact on `inputs` in the device's Python (see module doc)."""
    folder = Path(folder).resolve()
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise HwoptError(f"{folder} has no manifest.json: save an artifact there with "
                         "hwopt.compile(model, inputs, target='arm64').save(folder)")
    manifest = json.loads(manifest_path.read_text())
    region = single_region(folder, manifest)
    arrays = [_to_numpy(x) for x in (inputs if isinstance(inputs, (list, tuple)) else [inputs])]
    want = [tuple(s) for s in manifest.get("inputs", [])]
    got = [tuple(a.shape) for a in arrays]
    if want and got != want:
        raise HwoptError(f"inputs of shapes {got} do not match the shapes the artifact in "
                         f"{folder} was compiled for, {want}")
    emulator = emulator or find_emulator(_arch_of(manifest))
    t0 = time.perf_counter()
    res, outs = _invoke(emulator, folder, region["name"], arrays, repeat, timeout_s)
    wall = time.perf_counter() - t0
    log.info("hwopt: emulated %s on %s: import %.1fs, load %.1fs, run %s s (emulated; not the "
             "device's speed)", region["name"], res["machine"], res["import_s"], res["load_s"],
             [round(t, 2) for t in res["run_s"]])
    return EmulatedRun(outs, res["import_s"], res["load_s"], res["run_s"], wall)


def _invoke(emulator: Emulator, folder: Path, region: str, arrays: list[np.ndarray], repeat: int,
            timeout_s: float) -> tuple[dict, list[np.ndarray]]:
    """Start the runner in the device's Python; (its result.json, the outputs)."""
    with tempfile.TemporaryDirectory(prefix="hwopt-emulate-") as work:
        for i, a in enumerate(arrays):
            np.save(os.path.join(work, f"in_{i}.npy"), a)
        job = {"region": region, "n_inputs": len(arrays), "repeat": repeat}
        Path(work, "job.json").write_text(json.dumps(job))
        cmd = emulator.command(str(RUNNER), str(folder), work)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            raise HwoptError(f"emulated run of {folder} took over {timeout_s:.0f} s; pass a larger "
                             "timeout_s (emulation is 10-100x slower than the device)") from e
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise HwoptError(f"emulated run of {folder} (region {region}) failed with exit code "
                             f"{proc.returncode}:\n{tail}")
        res = json.loads(Path(work, "result.json").read_text())
        outs = [np.load(os.path.join(work, f"out_{i}.npy")) for i in range(res["n_outputs"])]
    return res, outs


def run_saved(folder, inputs, *, timeout_s: float = 600.0) -> list[np.ndarray]:
    """Outputs (flat list) of the saved artifact in `folder` on `inputs`, run under emulation."""
    return emulate(folder, inputs, timeout_s=timeout_s).outputs
