"""Runs one saved TVM region in the *device's* Python (e.g. aarch64 under qemu-user).

Started by ``hwopt.emulate.run_saved`` as ``python3.11 emulate_runner.py ARTIFACT WORKDIR``; it
must not import hwopt or torch (the emulated Python has only numpy and the TVM runtime). It reads
ARTIFACT/manifest.json, loads the region library into the Relax VM, runs ``main`` on
WORKDIR/in_<i>.npy `repeat` times and writes WORKDIR/out_<i>.npy plus WORKDIR/result.json
(load and run seconds).
"""
import json
import os
import sys
import time

# Only the TVM runtime library: loading the compiler (~240 MB) takes ~10 s under emulation.
os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
t_start = time.perf_counter()

import numpy as np  # noqa: E402
import tvm  # noqa: E402
from tvm.runtime.vm import VirtualMachine  # noqa: E402


def _flatten(value):
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return [value]
    return [t for v in value for t in _flatten(v)]


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def main(artifact: str, work: str) -> None:
    manifest = _read_json(os.path.join(artifact, "manifest.json"))
    job = _read_json(os.path.join(work, "job.json"))
    region = next(r for r in manifest["regions"] if r["name"] == job["region"])
    t0 = time.perf_counter()
    lib = tvm.runtime.load_module(os.path.join(artifact, region["files"][0]))
    vm = VirtualMachine(lib, tvm.cpu())
    ins = [tvm.runtime.tensor(np.load(os.path.join(work, f"in_{i}.npy")))
           for i in range(job["n_inputs"])]
    t1 = time.perf_counter()
    runs = []
    for _ in range(max(1, job.get("repeat", 1))):
        t = time.perf_counter()
        outs = _flatten(vm["main"](*ins))
        runs.append(time.perf_counter() - t)
    for i, o in enumerate(outs):
        np.save(os.path.join(work, f"out_{i}.npy"), o.numpy())
    result = {"import_s": t0 - t_start, "load_s": t1 - t0, "run_s": runs,
              "n_outputs": len(outs), "machine": os.uname().machine}
    with open(os.path.join(work, "result.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
