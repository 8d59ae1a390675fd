"""A device farm: time a target's compiled code on remote devices registered with a TVM RPC tracker.

Sits beside the *lower* step. A region's exported Relax VM library (``Artifact.save`` writes one
``.so`` per region) or a single scheduled PrimFunc is uploaded to a device that registered with a
TVM RPC tracker (``python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY``), loaded there,
run once (the outputs come back, to check against eager PyTorch) and timed with TVM's remote
``time_evaluator``. `DeviceFarm.measure_func` has the signature of
``hwopt.schedules.measure.measure_func``, so tile search can time its candidates on a device.
`hwopt.device_farm.LocalFarm` starts a tracker and servers on this machine (tests, one dev box).

    farm = DeviceFarm.parse("10.0.0.5:9190/rk3588")      # or DeviceFarm("10.0.0.5:9190", "rk3588")
    farm.devices()                                       # servers registered, per key
    m = farm.measure("out/hwopt_region_0.so", [x])       # Measurement: median_s, server, outputs
    ms = farm.measure_many([Job(lib, [x]), Job(lib, [y])])  # spread over the free servers
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import queue
import socket
import struct
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from hwopt.errors import HwoptError

log = logging.getLogger("hwopt")

DEFAULT_PORT = 9190


class DeviceFarmError(HwoptError):
    """A device farm request failed: no device for the key, a remote load or run failed, ..."""


class TrackerUnreachableError(DeviceFarmError, ConnectionError):
    """The TVM RPC tracker did not answer at the address given."""


@dataclass(frozen=True)
class DeviceInfo:
    """One RPC server registered with the tracker."""

    key: str
    host: str
    port: int

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Measurement:
    """Seconds per call measured on a device, with the outputs of one call.

    `results` holds one figure per repeat (each the mean of `number` calls). `outputs` are CPU
    torch tensors: a Relax VM function's results, or for a single kernel (destination-passing
    style) all of its arguments after one call, outputs included.
    """

    median_s: float
    mean_s: float
    results: tuple[float, ...]
    server: str  # "host:port" of the RPC server that ran it
    key: str
    device: str
    outputs: tuple = ()


@dataclass
class Job:
    """One thing to measure: a library (path, Executable or runtime Module) and its inputs."""

    lib: Any
    inputs: Sequence = ()
    device: str | int = "cpu"
    repeat: int = 5
    number: int = 1
    min_repeat_ms: int = 0
    func: str = "main"
    fetch_outputs: bool = True


@dataclass
class DeviceFarm:
    """Devices of one kind (`key`) behind a TVM RPC tracker at `tracker` ("host:port").

    `timeout_s` bounds connecting to the tracker and waiting for a free device;
    `session_timeout_s` is how long a server lets one session run before it kills it.
    `cross_compiler` (e.g. "aarch64-linux-gnu-g++") links libraries this class builds or exports
    itself (`measure_func`, an Executable passed to `measure`) for devices of another ISA.
    """

    tracker: str
    key: str
    timeout_s: float = 10.0
    session_timeout_s: float = 600.0
    cross_compiler: str | None = None
    host: str = field(init=False)
    port: int = field(init=False)

    def __post_init__(self):
        host, _, port = str(self.tracker).rpartition(":")
        if not host or not port.isdigit():
            raise DeviceFarmError(f"bad tracker address {self.tracker!r}: expected HOST:PORT, "
                                  f"e.g. '127.0.0.1:{DEFAULT_PORT}'")
        if not self.key:
            raise DeviceFarmError(f"no device key given for tracker {self.tracker}: devices "
                                  "register under a key (rpc_server --key KEY); pass key=KEY")
        self.host, self.port = host, int(port)

    @classmethod
    def parse(cls, spec: "str | DeviceFarm", **kwargs) -> "DeviceFarm":
        """A farm from an option value "host:port/key" (e.g. "127.0.0.1:9190/cpu-key")."""
        if isinstance(spec, DeviceFarm):
            return spec
        addr, sep, key = str(spec).partition("/")
        if not sep or not key:
            raise DeviceFarmError(f"bad device farm {spec!r}: expected 'HOST:PORT/KEY', e.g. "
                                  f"'127.0.0.1:{DEFAULT_PORT}/cpu-key' (KEY is the rpc_server "
                                  "--key the devices registered with)")
        return cls(addr, key, **kwargs)

    @property
    def spec(self) -> str:
        return f"{self.host}:{self.port}/{self.key}"

    # ---- the tracker protocol: [int32 size][json] messages after a magic handshake ----------
    def _tracker_call(self, message: list, wait_s: float | None = None) -> Any:
        from tvm.rpc import base

        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        except OSError as e:
            raise TrackerUnreachableError(
                f"cannot reach the TVM RPC tracker at {self.host}:{self.port} ({e}). Start one "
                f"there (python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {self.port}) and "
                f"register devices (python -m tvm.exec.rpc_server --tracker "
                f"{self.host}:{self.port} --key {self.key}), or fix the address: "
                f"'HOST:PORT/KEY'") from None
        with sock:
            try:
                sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
                if struct.unpack("<i", base.recvall(sock, 4))[0] != base.RPC_TRACKER_MAGIC:
                    raise DeviceFarmError(f"{self.host}:{self.port} answered but is not a TVM "
                                          "RPC tracker; check the port")
                sock.settimeout(wait_s if wait_s is not None else self.timeout_s)
                data = json.dumps(message).encode()
                sock.sendall(struct.pack("<i", len(data)) + data)
                size = struct.unpack("<i", base.recvall(sock, 4))[0]
                return json.loads(base.recvall(sock, size))
            except socket.timeout:
                if wait_s is not None:
                    raise
                raise TrackerUnreachableError(f"the TVM RPC tracker at {self.host}:{self.port} "
                                              f"did not answer within {self.timeout_s:g} s"
                                              ) from None
            except OSError as e:
                raise TrackerUnreachableError(f"the TVM RPC tracker at {self.host}:{self.port} "
                                              f"dropped the connection ({e}); is it a tracker?"
                                              ) from None

    def summary(self) -> dict:
        """The tracker's summary: {"queue_info": {key: {free, pending}}, "server_info": [...]}."""
        from tvm.rpc.base import TrackerCode

        reply = self._tracker_call([TrackerCode.SUMMARY])
        if reply[0] != TrackerCode.SUCCESS:
            raise DeviceFarmError(f"tracker {self.host}:{self.port} refused SUMMARY: {reply}")
        return reply[1]

    def devices(self, key: str | None = None) -> list[DeviceInfo]:
        """Servers registered with the tracker (all keys, or only `key`), sorted by key and port."""
        out = []
        for info in self.summary()["server_info"]:
            k = info.get("key", "").split(":", 1)[-1]  # "server:KEY"
            host, port = info.get("addr", (None, 0))
            if key is None or k == key:
                out.append(DeviceInfo(k, str(host), int(port)))
        return sorted(out, key=lambda d: (d.key, d.port))

    def queue(self) -> dict[str, dict]:
        """Per key: {"free": servers idle now, "pending": requests waiting for one}."""
        return dict(self.summary()["queue_info"])

    def free(self) -> int:
        return int(self.queue().get(self.key, {}).get("free", 0))

    def wait_for_devices(self, count: int, timeout_s: float = 30.0, check=None) -> None:
        """Block until `count` servers of this key are free; `check()` may raise to stop early."""
        import time

        deadline, last = time.monotonic() + timeout_s, None
        while True:
            try:
                if self.free() >= count:
                    return
            except TrackerUnreachableError as e:
                last = e
            if check is not None:
                check()
            if time.monotonic() > deadline:
                have = "tracker unreachable" if last else f"{self.free()} free"
                raise DeviceFarmError(f"{count} device(s) with key {self.key!r} did not register "
                                      f"with {self.host}:{self.port} within {timeout_s:.0f} s "
                                      f"({have}); check the rpc_server --tracker/--key options")
            time.sleep(0.1)

    def _request(self, wait_s: float) -> tuple[str, int, str]:
        from tvm.rpc.base import TrackerCode

        queue_info = self.queue()
        if self.key not in queue_info or not self.devices(self.key):
            known = ", ".join(sorted(queue_info)) or "none"
            raise DeviceFarmError(f"no device registered with key {self.key!r} at tracker "
                                  f"{self.host}:{self.port} (keys there: {known}); start one "
                                  f"with rpc_server --tracker {self.host}:{self.port} "
                                  f"--key {self.key}")
        try:
            reply = self._tracker_call([TrackerCode.REQUEST, self.key, "", 1], wait_s=wait_s)
        except socket.timeout:
            raise DeviceFarmError(f"no device with key {self.key!r} became free within "
                                  f"{wait_s:.0f} s at {self.host}:{self.port}; raise timeout_s or "
                                  "add servers") from None
        if reply[0] != TrackerCode.SUCCESS:
            raise DeviceFarmError(f"tracker {self.host}:{self.port} refused a request: {reply}")
        host, port, matchkey = reply[1]
        return str(host), int(port), matchkey

    @contextlib.contextmanager
    def session(self, wait_s: float | None = None) -> Iterator["RemoteSession"]:
        """A session on one free device of this key (held until the block ends)."""
        from tvm import rpc

        host, port, matchkey = self._request(self.timeout_s if wait_s is None else wait_s)
        try:
            sess = rpc.connect(host, port, matchkey, session_timeout=self.session_timeout_s)
        except Exception as e:
            raise DeviceFarmError(f"the tracker sent device {host}:{port} (key {self.key!r}) but "
                                  f"connecting to it failed: {e}") from e
        remote = RemoteSession(sess, f"{host}:{port}", self.key)
        log.debug("device farm: session on %s (key %s)", remote.server, self.key)
        try:
            yield remote
        finally:
            remote.close()

    # ---- measuring ----------------------------------------------------------------------------
    def measure(self, lib, inputs: Sequence = (), *, device: str | int = "cpu", repeat: int = 5,
                number: int = 1, min_repeat_ms: int = 0, func: str = "main",
                fetch_outputs: bool = True) -> Measurement:
        """Time `lib` (a library path, an Executable or a runtime Module) on one device.

        A library holding a Relax VM executable runs ``func`` in the VM; otherwise ``func`` is a
        PrimFunc called in destination-passing style (`inputs` include the output buffers).
        """
        job = Job(lib, inputs, device, repeat, number, min_repeat_ms, func, fetch_outputs)
        return self.measure_many([job], workers=1)[0]

    def measure_many(self, jobs: Sequence["Job | dict"], *, workers: int | None = None,
                     return_exceptions: bool = False) -> list:
        """Measure every job, spread over the free servers of this key (one thread each).

        Results come back in job order. A failed job raises DeviceFarmError (naming the job and
        the server) once all jobs ran, or with `return_exceptions` is returned in its place.
        """
        jobs = [j if isinstance(j, Job) else Job(**j) for j in jobs]
        if not jobs:
            return []
        n = min(len(jobs), workers or len(jobs), max(len(self.devices(self.key)), 1))
        with tempfile.TemporaryDirectory(prefix="hwopt-farm-") as tmp:
            prepared = [_prepared(j, Path(tmp), i, self.cross_compiler) for i, j in enumerate(jobs)]
            results = self._run_parallel(prepared, n)
        errors = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
        if errors and not return_exceptions:
            raise errors[0][1]
        return results

    def _run_parallel(self, jobs: list[Job], n: int) -> list:
        todo: queue.Queue = queue.Queue()
        for i in range(len(jobs)):
            todo.put(i)
        results: list = [None] * len(jobs)
        with contextlib.ExitStack() as stack:
            # Sessions are opened up front, one per server, so that every worker holds a
            # different device before any job starts; extra ones that find no device are dropped.
            sessions = [stack.enter_context(self.session())]
            for _ in range(n - 1):
                try:
                    wait = min(2.0, self.timeout_s)  # a server re-registers after a session
                    sessions.append(stack.enter_context(self.session(wait_s=wait)))
                except DeviceFarmError as e:
                    log.debug("device farm: fewer workers than planned: %s", e)
                    break

            def work(remote: RemoteSession):
                while True:
                    try:
                        i = todo.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        results[i] = remote.run(jobs[i])
                    except Exception as e:  # reported per job, with the server that failed
                        # Its frames hold the remote module: kept, they keep the server busy.
                        e.__traceback__ = None
                        err = DeviceFarmError(f"job {i} ({_describe(jobs[i].lib)}) failed on "
                                              f"{remote.server} (key {self.key!r}): {e}")
                        err.__cause__ = e
                        results[i] = err

            threads = [threading.Thread(target=work, args=(s,), daemon=True) for s in sessions]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        return results

    def measure_func(self, func, target, repeat: int = 5) -> float:
        """Median seconds of one call of a scheduled PrimFunc on random inputs, on a device.

        Same signature as ``hwopt.schedules.measure.measure_func``: a drop-in ``measure`` for
        tile search (built here for `target`, linked with `cross_compiler`, timed remotely).
        """
        result = self.measure_funcs([func], target, repeat)[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def for_lowering(self, lowering) -> "DeviceFarm":
        """This farm linking with `lowering`'s cross compiler (``LLVMLowering.cross_compiler``,
        e.g. aarch64-linux-gnu-g++ for arm64); where it has none, this farm's own setting."""
        cc = getattr(lowering, "cross_compiler", None) or self.cross_compiler
        return dataclasses.replace(self, cross_compiler=cc)

    def measure_hook(self, lowering=None):
        """A ``lowering.measure``-style ``(func, target) -> seconds`` timed on this farm."""
        return self.for_lowering(lowering).measure_func

    def measure_funcs(self, funcs: Sequence, target, repeat: int = 5) -> list:
        """`measure_func` for many PrimFuncs (e.g. all tile candidates), timed in parallel.

        Returns seconds per func, or the exception where a candidate failed to build or run.
        """
        import tvm

        from hwopt.schedules.measure import _random_args

        target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
        dev = int(target.get_target_device_type())
        out: list = [None] * len(funcs)
        jobs, where = [], []
        for i, f in enumerate(funcs):
            try:
                mod = tvm.IRModule({"main": f.with_attr("global_symbol", "main")})
                lib = tvm.compile(mod, target=target)
                args = [a.numpy() for a in _random_args(f)]
            except Exception as e:  # a candidate that does not build is reported, not fatal
                out[i] = e
                continue
            jobs.append(Job(lib, args, dev, repeat, 1, 20, "main", fetch_outputs=False))
            where.append(i)
        for i, m in zip(where, self.measure_many(jobs, return_exceptions=True)):
            out[i] = m if isinstance(m, BaseException) else m.median_s
        return out


class RemoteSession:
    """One RPC session on one server; remembers what it uploaded so a library goes up once."""

    def __init__(self, sess, server: str, key: str):
        self.sess, self.server, self.key = sess, server, key
        self._modules: dict[str, Any] = {}

    def close(self) -> None:
        self._modules.clear()
        self.sess = None  # the server ends the session when the last reference goes

    def load(self, path: Path):
        """The remote module of a library file, uploaded once per session."""
        digest = hashlib.sha1(Path(path).read_bytes()).hexdigest()[:12]
        if digest not in self._modules:
            name = f"{Path(path).stem}-{digest}{Path(path).suffix}"
            self.sess.upload(str(path), target=name)
            self._modules[digest] = self.sess.load_module(name)
        return self._modules[digest]

    def run(self, job: Job) -> Measurement:
        """Run `job` once (outputs) and time it with the remote time_evaluator."""
        import tvm

        dev = self.sess.device(job.device)
        rmod = self.load(job.lib)
        args = [tvm.runtime.tensor(_to_numpy(x), dev) for x in job.inputs]
        timing = dict(number=job.number, repeat=job.repeat, min_repeat_ms=job.min_repeat_ms)
        if rmod.implements_function("vm_load_executable"):
            from tvm import relax

            vm = relax.VirtualMachine(rmod, dev)
            vm.set_input(job.func, *args)  # the RPC-safe way: inputs stay on the device
            vm.invoke_stateful(job.func)
            outputs = _fetch(_vm_outputs(vm, job.func)) if job.fetch_outputs else ()
            bench = vm.time_evaluator("invoke_stateful", dev, **timing)(job.func)
        else:
            rmod[job.func](*args)
            outputs = _fetch(args) if job.fetch_outputs else ()
            bench = rmod.time_evaluator(job.func, dev, **timing)(*args)
        results = tuple(float(r) for r in bench.results)
        return Measurement(float(np.median(results)), float(np.mean(results)), results,
                           self.server, self.key, str(job.device), outputs)


def _prepared(job: Job, tmp: Path, i: int, cross_compiler: str | None) -> Job:
    """`job` with its library as a file (an Executable or Module is exported into `tmp`)."""
    lib = job.lib
    if isinstance(lib, (str, Path)):
        if not Path(lib).is_file():
            raise DeviceFarmError(f"job {i}: library {lib} does not exist; export it first "
                                  "(Artifact.save or executable.export_library)")
        return job
    kwargs = {}
    if cross_compiler:
        from tvm.support import cc

        kwargs["fcompile"] = cc.cross_compiler(cross_compiler)
    path = tmp / f"job{i}.so"
    lib.export_library(str(path), **kwargs)
    return dataclasses.replace(job, lib=path)


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor: the bytes go over the socket anyway
        return x.detach().cpu().contiguous().numpy()
    if hasattr(x, "numpy") and not isinstance(x, np.ndarray):
        return x.numpy()
    return np.ascontiguousarray(x)


def _vm_outputs(vm, func: str, *index: int) -> list:
    """The tensors `func` returned after ``invoke_stateful``, nested tuples flattened.

    Not ``VirtualMachine.get_outputs``: its recursive closure is a reference cycle that keeps
    the RPC session, and so the server, busy until the garbage collector runs.
    """
    arity = vm["get_output_arity"](func, *index)
    if arity == -1:
        return [vm["get_output"](func, *index)]
    return [t for i in range(arity) for t in _vm_outputs(vm, func, *index, i)]


def _fetch(tensors) -> tuple:
    import torch

    return tuple(torch.from_numpy(t.numpy()) for t in tensors)


def _describe(lib) -> str:
    return Path(lib).name if isinstance(lib, (str, Path)) else type(lib).__name__
