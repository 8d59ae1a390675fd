"""hwopt.rpc (DeviceFarm) and hwopt.device_farm (LocalFarm): measuring through a TVM RPC tracker.

One local farm (a tracker and two servers on 127.0.0.1, free ports) serves the module; it is
stopped, with every process it started, when the module ends, pass or fail. Timings are sanity
checks only (> 0), never thresholds.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hwopt.targets.cpu import TARGET as CPU

import hwopt
from hwopt.device_farm import LocalFarm, free_port
from hwopt.rpc import DeviceFarm, DeviceFarmError, Job, TrackerUnreachableError

KEY = "cpu-test"


@pytest.fixture(scope="module")
def local():
    with LocalFarm(servers=2, key=KEY, timeout_s=60) as farm:
        yield farm


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    """A small model compiled by hwopt for the cpu target, saved; its region library + model."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 8)).eval()
    x = torch.randn(4, 32)
    folder = tmp_path_factory.mktemp("art")
    art = hwopt.compile(model, (x,), target=CPU, executor="tvm", progress=False,
                        cache_dir=folder / "cache")
    assert [r.executor for r in art.compiled.regions] == ["tvm"]
    out = art.save(folder / "out")
    return out / f"{art.compiled.regions[0].name}.so", model


def _matmul(n: int = 64):
    from tvm import te

    a = te.placeholder((n, n), name="A")
    b = te.placeholder((n, n), name="B")
    k = te.reduce_axis((0, n), name="k")
    c = te.compute((n, n), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    return te.create_prim_func([a, b, c])


def test_parse_option_value():
    farm = DeviceFarm.parse("10.1.2.3:9190/rk3588", timeout_s=3)
    assert (farm.host, farm.port, farm.key, farm.timeout_s) == ("10.1.2.3", 9190, "rk3588", 3)
    assert farm.spec == "10.1.2.3:9190/rk3588"
    assert DeviceFarm.parse(farm) is farm
    for bad in ("10.1.2.3:9190", "10.1.2.3/key", "host:port/key"):
        with pytest.raises(DeviceFarmError, match="HOST:PORT"):
            DeviceFarm.parse(bad)


def test_unreachable_tracker_names_address_and_fix():
    port = free_port()
    farm = DeviceFarm(f"127.0.0.1:{port}", "k", timeout_s=2)
    with pytest.raises(TrackerUnreachableError) as info:
        farm.devices()
    msg = str(info.value)
    assert f"127.0.0.1:{port}" in msg and "tvm.exec.rpc_tracker" in msg and "--key k" in msg
    with pytest.raises(TrackerUnreachableError):
        farm.measure("missing.so", [])


def test_devices_lists_both_servers(local):
    devices = local.farm.devices(KEY)
    assert len(devices) == 2 and {d.key for d in devices} == {KEY}
    assert len({d.addr for d in devices}) == 2
    assert local.farm.queue()[KEY]["free"] == 2
    assert DeviceFarm.parse(local.spec).devices() == local.farm.devices()


def test_measure_region_matches_eager(local, region):
    lib, model = region
    x = torch.randn(4, 32)
    m = local.farm.measure(lib, [x], repeat=3)
    torch.testing.assert_close(m.outputs[0], model(x), rtol=1e-5, atol=1e-5)
    assert m.median_s > 0 and m.mean_s > 0 and len(m.results) == 3
    assert m.server in {d.addr for d in local.farm.devices(KEY)} and m.key == KEY


def test_measure_many_uses_both_servers(local, region):
    lib, model = region
    xs = [torch.randn(4, 32) for _ in range(4)]
    local.farm.wait_for_devices(2, timeout_s=30)  # a server re-registers after each session
    ms = local.farm.measure_many([Job(lib, [x], repeat=2) for x in xs])
    for m, x in zip(ms, xs):  # results come back in job order
        torch.testing.assert_close(m.outputs[0], model(x), rtol=1e-5, atol=1e-5)
        assert m.median_s > 0
    assert {m.server for m in ms} == {d.addr for d in local.farm.devices(KEY)}


def test_single_kernel_outputs_and_errors_name_the_job(local):
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": _matmul()}), target=CPU.tvm())
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((64, 64)).astype("float32") for _ in range(2))
    m = local.farm.measure(lib, [a, b, np.zeros((64, 64), "float32")])
    np.testing.assert_allclose(m.outputs[2].numpy(), a @ b, rtol=1e-4, atol=1e-4)
    assert m.median_s > 0
    with pytest.raises(DeviceFarmError, match="job 0 .* failed on 127.0.0.1:"):
        local.farm.measure(lib, [a, b])  # one buffer short


def test_measure_func_hook_times_tile_candidates(local):
    from hwopt.schedules.dense import Dense

    func, rule = _matmul(), Dense()
    assert rule.match(func)
    lanes = CPU.spec.vector_lanes
    scheduled = [rule.apply(func, p, lanes) for p in rule.candidates(func, lanes)[:2]]
    measure = local.farm.measure_hook(CPU.lowering)  # what target.lowering.measure would be
    assert measure(scheduled[0], CPU.tvm()) > 0
    times = local.farm.measure_funcs(scheduled, CPU.tvm(), repeat=2)
    assert len(times) == len(scheduled) and all(isinstance(t, float) and t > 0 for t in times)


def test_unknown_key_lists_the_keys_there(local, region):
    farm = DeviceFarm(local.tracker, "no-such-key", timeout_s=2)
    with pytest.raises(DeviceFarmError, match=f"no-such-key.*keys there: {KEY}"):
        farm.measure(region[0], [torch.randn(4, 32)])


def test_close_ends_every_process():
    farm = LocalFarm(servers=1, key="close-test", timeout_s=60).start()
    try:
        with farm.farm.session() as s:  # a live session: the server has forked a child
            assert s.server == farm.farm.devices("close-test")[0].addr
            groups = [p.popen.pid for p in farm.procs]
            farm.close()
    finally:
        farm.close()
    assert groups and not _running_in_groups(groups)


def _running_in_groups(groups: list[int]) -> list[int]:
    """Pids of processes in those process groups that still run (zombies wait for init)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:  # not a pid, or it just exited
            continue
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) in groups and state != "Z":
            found.append(int(entry))
    return found


@pytest.mark.slow
def test_arm64_device_under_qemu(tmp_path):
    """An emulated aarch64 RPC server runs code the arm64 target cross-compiled (~1 min)."""
    from hwopt.emulate import emulator_status, find_emulator
    from hwopt.schedules.dense import Dense

    ok, why = emulator_status()
    if not ok:
        pytest.skip(why)
    arm64 = hwopt.get_target("arm64")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU()).eval()
    x = torch.randn(4, 32)
    art = hwopt.compile(model, (x,), target=arm64, executor="tvm", progress=False,
                        cache_dir=tmp_path / "cache")
    out = art.save(tmp_path / "out")
    with LocalFarm(servers=1, key="arm64", server_python=find_emulator().command(),
                   timeout_s=180) as local:
        m = local.farm.measure(out / f"{art.compiled.regions[0].name}.so", [x], repeat=2)
        torch.testing.assert_close(m.outputs[0], model(x).detach(), rtol=1e-5, atol=1e-5)
        func, rule = _matmul(32), Dense()
        tiled = rule.apply(func, rule.candidates(func, 4)[0], 4)
        assert local.farm.measure_hook(arm64.lowering)(tiled, arm64.tvm()) > 0


def test_devices_option_tunes_on_the_farm(local, tmp_path):
    """options devices="host:port/key" + tune="measure": tile candidates are timed remotely."""
    from hwopt.errors import OptionError
    from hwopt.tuning_db import TuningDB

    with pytest.raises(OptionError, match="devices"):
        hwopt.compile(torch.nn.Linear(4, 4), (torch.randn(1, 4),), devices="nokey")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU()).eval()
    x = torch.randn(8, 64)
    cache = tmp_path / "cache"
    art = hwopt.compile(model, (x,), devices=local.spec, tune="measure", executor="tvm",
                        progress=False, cache_dir=cache)
    torch.testing.assert_close(art(x), model(x), rtol=1e-4, atol=1e-5)
    db = TuningDB(cache / "tuning.json")
    assert len(db.records) >= 1  # the dense kernel's pick, measured through the farm
