"""A local device farm: a TVM RPC tracker and N RPC servers on this machine, as subprocesses.

For tests and for a single development box; real devices run ``python -m tvm.exec.rpc_server
--tracker HOST:PORT --key KEY`` themselves and are reached through `hwopt.rpc.DeviceFarm`.

    with LocalFarm(servers=2, key="cpu") as local:
        local.farm.measure("out/hwopt_region_0.so", [x])   # local.spec == "127.0.0.1:PORT/cpu"

Each process runs in its own process group, which `close()` ends (the servers fork one child
per session; the group takes those too). `lean=True` (default) starts each process as a device
would run it: TVM's runtime library only (TVM_USE_RUNTIME_LIB=1) and no PyTorch, running the
state classes that `tvm.rpc.Tracker` / `tvm.rpc.Server` run in their PopenWorker
(`PopenTrackerServerState`, `PopenRPCServerState`) directly: one process each, ~0.7 s of CPU to
start instead of ~10 s. `lean=False` runs TVM 0.27's command-line tools ``python -m
tvm.exec.rpc_tracker`` and ``python -m tvm.exec.rpc_server`` (each imports TVM and PyTorch
twice: in the tool and in its PopenWorker). `server_python` runs the servers with another
Python, e.g. `hwopt.emulate.find_emulator().command()` (an aarch64 Python under
``qemu-aarch64 -L SYSROOT``): an emulated arm64 device for code the arm64 target
cross-compiled (timings under emulation mean nothing).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hwopt.rpc import DeviceFarm, DeviceFarmError

log = logging.getLogger("hwopt")

# The body of one lean process: `tracker HOST PORT` or `server HOST PORT TRACKER KEY`.
_LEAN_MAIN = r"""
import sys
sys.modules["torch"] = None  # a device has no PyTorch; tvm_ffi would import it (~3 s)
role, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if role == "tracker":
    from tvm.rpc import tracker  # needs tornado; a server does not
    state = tracker.PopenTrackerServerState(host, port, port + 1, silent=True)
else:
    from tvm.rpc import server
    t_host, t_port = sys.argv[4].rsplit(":", 1)
    state = server.PopenRPCServerState(host, port, min(port + 50, 65536), key=sys.argv[5],
                                       tracker_addr=(t_host, int(t_port)), silent=True)
state.thread.join()
"""


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on now (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _stop(procs: list[_Proc], grace_s: float = 2.0) -> None:
    """End each process group: SIGTERM, then SIGKILL for what is left after `grace_s`."""
    for p in procs:
        with _quiet():
            os.killpg(p.popen.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.popen.wait(max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            pass
        with _quiet():  # the leader may be gone while its forked session children live on
            os.killpg(p.popen.pid, signal.SIGKILL)
        with _quiet():
            p.popen.wait(1.0)


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, (ProcessLookupError, PermissionError,
                                                      subprocess.TimeoutExpired))


class LocalFarm:
    """A tracker and `servers` RPC servers with key `key` on `host`; a context manager.

    `start()` (or entering the block) waits until every server has registered, at most
    `timeout_s`; a process that dies on the way is reported with the end of its log.
    """

    def __init__(self, servers: int = 2, key: str = "local", *, host: str = "127.0.0.1",
                 port: int | None = None, lean: bool = True, timeout_s: float = 60.0,
                 farm_timeout_s: float = 10.0,
                 server_python: Sequence[str] | None = None, server_env: dict | None = None):
        self.n_servers, self.key, self.host, self.lean = servers, key, host, lean
        self.server_python = list(server_python or [sys.executable])
        self.server_env = dict(server_env or {})
        self.timeout_s = timeout_s
        self.port = port or 0  # the tracker's; 0: a free one, chosen at start()
        self.procs: list[_Proc] = []
        self._logs = tempfile.TemporaryDirectory(prefix="hwopt-farm-logs-")
        self._farm_timeout_s = farm_timeout_s
        self.farm: DeviceFarm | None = None
        # Processes are ended even if the owner forgets close() (or the interpreter exits).
        self._finalizer = weakref.finalize(self, _stop, self.procs)

    @property
    def tracker(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def spec(self) -> str:
        """The option value naming this farm: "host:port/key"."""
        return f"{self.tracker}/{self.key}"

    def __enter__(self) -> "LocalFarm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "LocalFarm":
        try:
            self.port = self.port or free_port(self.host)
            self._spawn("tracker", self._argv("tracker", self.port))
            self.farm = DeviceFarm(self.tracker, self.key, timeout_s=self._farm_timeout_s)
            self._wait_tracker()
            for _ in range(self.n_servers):
                self.add_server(wait=False)
            self.farm.wait_for_devices(self.n_servers, self.timeout_s, check=self.check)
        except BaseException:
            self.close()
            raise
        log.info("hwopt: local device farm %s with %d server(s)", self.spec, self.n_servers)
        return self

    def add_server(self, wait: bool = True) -> None:
        """Start one more server with this farm's key (waits until it has registered)."""
        before = self.farm.free() if wait else 0
        port = free_port(self.host)
        self._spawn(f"server{len(self.procs)}", self._argv("server", port))
        if wait:
            self.farm.wait_for_devices(before + 1, self.timeout_s, check=self.check)

    def _wait_tracker(self) -> None:
        # Servers retry a refused tracker only every 5 s: start them once it answers.
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                self.farm.summary()
                return
            except DeviceFarmError:
                self.check()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def check(self) -> None:
        """Raise if one of the farm's processes has exited, with the end of its log."""
        for p in self.procs:
            code = p.popen.poll()
            if code is not None:
                raise DeviceFarmError(f"local device farm: {p.name} (pid {p.popen.pid}) exited "
                                      f"with code {code}:\n{p.log_tail()}")

    def close(self) -> None:
        """Stop every process this farm started (and their session children)."""
        _stop(self.procs)
        self.procs.clear()
        self._logs.cleanup()

    def _argv(self, role: str, port: int) -> list[str]:
        py = sys.executable
        if self.lean:
            if role == "tracker":
                return [py, "-c", _LEAN_MAIN, role, self.host, str(port)]
            return [*self.server_python, "-c", _LEAN_MAIN, role, self.host, str(port),
                    self.tracker, self.key]
        if role == "tracker":
            return [py, "-m", "tvm.exec.rpc_tracker", "--host", self.host, "--port", str(port),
                    "--port-end", str(port + 1), "--silent"]
        return [py, "-m", "tvm.exec.rpc_server", "--host", self.host, "--port", str(port),
                "--port-end", str(min(port + 50, 65536)), "--tracker", self.tracker,
                "--key", self.key, "--silent"]

    def _spawn(self, name: str, argv: list[str]) -> None:
        env = dict(os.environ)
        if self.lean:
            env["TVM_USE_RUNTIME_LIB"] = "1"  # what a device ships: the runtime, no compiler
        if name != "tracker":
            env.update(self.server_env)
        path = Path(self._logs.name) / f"{name}.log"
        with open(path, "wb") as out:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(_Proc(name, popen, path))
        log.debug("hwopt: started %s (pid %d): %s", name, popen.pid, " ".join(argv[:3]))
