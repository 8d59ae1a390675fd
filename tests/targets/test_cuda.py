"""The cuda target: spec, TVM target, dlight schedules, CUDA/PTX/.so export; runs on a GPU only.

Without a GPU (the usual case here) the code is built and its files checked; the tests that run
it skip with the reason. PTX checks need nvcc.
"""
from __future__ import annotations

import importlib
import json
import re

import pytest
import torch
from hwopt.targets import cuda

import hwopt
from hwopt import zoo
from hwopt.errors import OptionError
from hwopt.lowering import gpu

needs_nvcc = pytest.mark.skipif(gpu.find_nvcc() is None, reason="nvcc not installed")
needs_gpu = pytest.mark.skipif(not cuda.runs_here(),
                               reason="no CUDA device usable by both PyTorch and TVM here")


def kernels(src: str) -> dict[str, str]:
    """Kernel name -> body of every __global__ definition in a CUDA source."""
    out = {}
    for part in src.split('extern "C" __global__ ')[1:]:
        head, _, body = part.partition("\n")
        if head.rstrip().endswith("{"):
            name = re.search(r"(\w+)\(", head).group(1)
            out[name] = body
    return out


def ptx_target(text: str) -> str:
    return re.search(r"^\.target\s+(\w+)", text, re.M).group(1)


# ---- spec and TVM target -------------------------------------------------------------------

@pytest.mark.parametrize("arch,fp32,sms", [("sm_80", 19.5e12, 108), ("sm_90", 67e12, 132)])
def test_spec_figures(arch, fp32, sms):
    t = cuda.make_target(arch)
    s = t.spec
    assert s.peak_flops["float32"] == pytest.approx(fp32)
    assert s.cores == sms
    # fp32 peak is SMs x FP32 lanes x 2 (FMA) x boost clock
    lanes = {"sm_80": 64, "sm_90": 128}[arch]
    assert sms * lanes * 2 * s.clock_hz == pytest.approx(fp32, rel=0.01)
    p = s.peak_flops
    assert p["float32"] < p["tfloat32"] < p["float16"] == p["bfloat16"] < p["int8"]
    assert set(s.energy_per_mac) <= set(s.dtypes) and set(p) <= set(s.dtypes)
    names = [lvl[0] for lvl in s.mem_levels]
    assert names[:3] == ["registers", "SMEM", "L2"] and names[-1].startswith("HBM")
    bws = [lvl[2] for lvl in s.mem_levels]
    energies = [lvl[3] for lvl in s.mem_levels]
    assert bws == sorted(bws, reverse=True) and energies == sorted(energies)
    assert bws[-1] == s.mem_bw and s.mem_levels[2][1] == s.on_chip_bytes
    assert t.cost_model.peak("float32") == fp32 and t.cost_model.mem_bw == s.mem_bw


def test_h100_is_faster_than_a100():
    a, h = cuda.make_target("sm_80").spec, cuda.make_target("sm_90").spec
    assert h.mem_bw / a.mem_bw == pytest.approx(3.35 / 2.039, rel=0.01)
    assert h.on_chip_bytes == 50 * 2**20 and a.on_chip_bytes == 40 * 2**20
    assert h.peak_flops["int8"] == pytest.approx(1979e12)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_tvm_target(arch):
    t = cuda.make_target(arch).tvm()
    assert t.kind.name == "cuda" and str(t.attrs["arch"]) == arch
    assert t.host is not None and t.host.kind.name == "llvm"
    assert int(t.attrs["max_num_threads"]) == 1024


def test_unknown_arch_lists_valid_ones():
    with pytest.raises(OptionError, match="sm_80, sm_90"):
        cuda.make_target("sm_75")


def test_arch_from_environment(monkeypatch):
    monkeypatch.setenv("HWOPT_CUDA_ARCH", "sm_90")
    try:
        mod = importlib.reload(cuda)
        assert mod.TARGET.extra["arch"] == "sm_90"
        assert mod.TARGET.tvm_target()["arch"] == "sm_90"
    finally:
        monkeypatch.delenv("HWOPT_CUDA_ARCH")
        importlib.reload(cuda)
    assert cuda.TARGET.extra["arch"] == "sm_80"


def test_registered_and_runs_here_only_with_a_gpu():
    from hwopt.target import get_target

    t = get_target("cuda")
    assert t.name == "cuda"
    if not torch.cuda.is_available():
        assert not t.runs_here()


# ---- schedule, build, export on a tiny module -----------------------------------------------

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 32)

    def forward(self, x):
        return torch.softmax(torch.relu(self.fc(x)) + 1.0, dim=-1)


@pytest.fixture(scope="module")
def tiny_built():
    from hwopt.lowering.canonicalize import canonicalize
    from hwopt.lowering.relax_import import to_relax

    x = torch.randn(8, 64)
    gm = torch.export.export(Tiny().eval(), (x,)).run_decompositions().module()
    t = cuda.make_target("sm_90")
    low, tt = t.lowering, t.tvm()
    mod = low.prepare(to_relax(canonicalize(gm), (x,)), tt)
    scheduled, choices = low.schedule(mod, tt)
    return low, scheduled, choices, low.build(scheduled, tt)


def test_every_kernel_gets_a_dlight_rule_and_thread_bindings(tiny_built):
    from tvm import tirx

    _, mod, choices, _ = tiny_built
    funcs = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}
    assert funcs and set(choices) == set(funcs)
    for name, f in funcs.items():
        assert choices[name].rule.startswith("dlight."), (name, choices[name])
        assert gpu.thread_bound(f), name
    assert any(c.rule == "dlight.Matmul" or c.rule == "dlight.GEMV" for c in choices.values())


def test_unscheduled_func_is_not_thread_bound(tiny_built):
    from tvm import tirx

    from hwopt.lowering.relax_import import to_relax

    low = tiny_built[0]
    x = torch.randn(4, 4)
    gm = torch.export.export(torch.nn.ReLU(), (x,)).module()
    raw = low.prepare(to_relax(gm, (x,)), cuda.make_target("sm_90").tvm())
    f = next(f for f in raw.functions.values() if isinstance(f, tirx.PrimFunc))
    assert not gpu.thread_bound(f)


@needs_nvcc
def test_export_writes_source_ptx_and_library(tiny_built, tmp_path):
    low, _, _, ex = tiny_built
    files = low.export(ex, tmp_path, "tiny")
    assert files == ["tiny.so", "tiny.cu", "tiny.ptx"]
    src = (tmp_path / "tiny.cu").read_text()
    assert kernels(src)
    assert ptx_target((tmp_path / "tiny.ptx").read_text()) == "sm_90"
    assert (tmp_path / "tiny.so").stat().st_size > 0


def test_export_without_nvcc_keeps_source_and_library(tiny_built, tmp_path, monkeypatch):
    low, _, _, ex = tiny_built
    monkeypatch.setattr(gpu, "find_nvcc", lambda: None)
    assert low.export(ex, tmp_path, "t") == ["t.so", "t.cu"]
    assert not (tmp_path / "t.ptx").exists()


@needs_nvcc
def test_compile_callback_serves_ptx_for_the_active_arch():
    import tvm_ffi

    src = 'extern "C" __global__ void k(float* a) { a[threadIdx.x] += 1.0f; }\n'
    gpu._device_code.install()
    fn = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
    with gpu._device_code.for_arch("sm_80"):
        ptx = bytes(fn(src))
    assert ptx.startswith(b"//") and ptx.endswith(b"\0")  # '/' makes TVM load it as PTX
    assert ptx_target(ptx.rstrip(b"\0").decode()) == "sm_80"


# ---- the model zoo, compiled for cuda here --------------------------------------------------

def _compile_and_save(model_fn, target, tmp_path):
    model, inputs = model_fn(small=True)
    art = hwopt.compile(model, inputs, target=target, strict=True, cache_dir=False)
    out = art.save(tmp_path / "art")
    return art, out, json.loads((out / "manifest.json").read_text())


def _check_saved(out, manifest, arch):
    assert manifest["target"] == "cuda" and manifest["tvm_target"]["arch"] == arch
    regions = [r for r in manifest["regions"] if r["executor"] == "tvm"]
    assert regions
    for r in regions:
        assert all(v[0].startswith("dlight.") for v in r["kernels"].values()), r["kernels"]
        cu = next(f for f in r["files"] if f.endswith(".cu"))
        ks = kernels((out / cu).read_text())
        assert ks, "no __global__ kernels in the CUDA source"
        for name, body in ks.items():  # every kernel is launched over blocks/threads
            assert "threadIdx" in body or "blockIdx" in body, name
        assert any(f.endswith(".so") for f in r["files"])
        if gpu.find_nvcc() is not None:
            ptx = next(f for f in r["files"] if f.endswith(".ptx"))
            assert ptx_target((out / ptx).read_text()) == arch


def test_cnn_compiles_for_sm80(tmp_path):
    _, out, manifest = _compile_and_save(zoo.cnn, cuda.make_target("sm_80"), tmp_path)
    _check_saved(out, manifest, "sm_80")


def test_transformer_compiles_for_sm90(tmp_path):
    _, out, manifest = _compile_and_save(zoo.bert, cuda.make_target("sm_90"), tmp_path)
    _check_saved(out, manifest, "sm_90")
    rules = {v[0] for r in manifest["regions"] for v in r["kernels"].values()}
    assert {"dlight.Matmul", "dlight.GeneralReduction"} <= rules  # GEMMs, softmax/layer norm


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet", "vit", "gpt2"])
def test_zoo_compiles(name, tmp_path):
    _, out, manifest = _compile_and_save(getattr(zoo, name), cuda.make_target("sm_80"), tmp_path)
    _check_saved(out, manifest, "sm_80")


# ---- on a GPU: the artifact runs and matches eager ------------------------------------------

def _max_rel_err(got, want) -> float:
    import torch.utils._pytree as pytree

    gs, ws = pytree.tree_leaves(got), pytree.tree_leaves(want)
    assert len(gs) == len(ws)
    return max(float((g.cpu() - w).abs().max()) / max(float(w.abs().max()), 1e-6)
               for g, w in zip(gs, ws))


@needs_gpu
@pytest.mark.parametrize("name", ["cnn", "bert"])
def test_runs_and_matches_eager_on_gpu(name, tmp_path):
    model, inputs = getattr(zoo, name)(small=True)
    art, _, _ = _compile_and_save(getattr(zoo, name), cuda.TARGET, tmp_path)
    with torch.no_grad():
        want, got = model(*inputs), art(*inputs)
    assert _max_rel_err(got, want) <= 1e-4


@needs_gpu
def test_outputs_come_back_where_the_inputs_were():
    model, (x,) = zoo.cnn(small=True)
    art = hwopt.compile(model, (x,), target=cuda.TARGET, strict=True, cache_dir=False)
    assert art(x).device.type == "cpu"
    assert art(x.cuda()).device.type == "cuda"


@needs_gpu
def test_exported_library_loads_and_runs_on_gpu(tmp_path):
    """The receiver path: the saved .so (+ .ptx) loaded on its own, run on the GPU."""
    import tvm

    model, (x,) = zoo.cnn(small=True)
    _, out, manifest = _compile_and_save(zoo.cnn, cuda.TARGET, tmp_path)
    region = next(r for r in manifest["regions"] if r["executor"] == "tvm")
    vm = cuda.TARGET.lowering.load(out, region["files"])
    got = vm["main"](tvm.runtime.from_dlpack(x.cuda()))
    got = torch.from_dlpack(got if hasattr(got, "shape") else got[0])
    with torch.no_grad():
        assert _max_rel_err(got, model(x)) <= 1e-4
