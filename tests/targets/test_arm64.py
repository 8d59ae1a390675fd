"""The arm64 target: spec, TVM target, cross-compiled aarch64 libraries (ELF, NEON code) and their
outputs under qemu-user against eager PyTorch (hwopt.emulate). Tests that need the cross
toolchain or the emulated aarch64 Python skip with the reason when `scripts/setup_arm64.sh` has not
been run."""
from __future__ import annotations

import json
import platform
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import hwopt
from hwopt import zoo
from hwopt.emulate import EmulatorUnavailable, emulator_status, find_emulator, run_saved
from hwopt.errors import HwoptError, LoweringError, OptionError
from hwopt.target import get_target

ON_ARM = platform.machine().lower() in ("aarch64", "arm64")
EM_AARCH64 = 183  # ELF e_machine
needs_cxx = pytest.mark.skipif(
    not ON_ARM and shutil.which("aarch64-linux-gnu-g++") is None,
    reason="aarch64-linux-gnu-g++ not found: run `bash scripts/setup_arm64.sh` (as root)")
_EMU_OK, _EMU_WHY = emulator_status()
needs_emulator = pytest.mark.skipif(not _EMU_OK, reason=_EMU_WHY)


@pytest.fixture(scope="module")
def arm64():
    return get_target("arm64")


# -- spec and TVM target --------------------------------------------------------------------------

def test_spec_figures(arm64):
    s = arm64.spec
    assert (s.cores, s.vector_lanes) == (4, 4)
    # 4 cores x 2 FMA pipes x 4 fp32 lanes x 2 FLOPs x clock
    assert s.peak_flops["float32"] == pytest.approx(4 * 2 * 4 * 2 * s.clock_hz)
    assert 2.0e9 <= s.clock_hz <= 3.5e9
    assert s.peak_flops["int8"] == pytest.approx(4 * s.peak_flops["float32"])  # SDOT
    assert {"float32", "int8"} <= set(s.dtypes) == set(s.peak_flops)
    assert 10e9 <= s.mem_bw <= 70e9  # LPDDR4X/5, shared by the cluster
    names = [lv[0] for lv in s.mem_levels]
    assert names == ["L1", "L2", "L3", "DRAM"]
    sizes = [lv[1] for lv in s.mem_levels[:-1]]
    bws = [lv[2] for lv in s.mem_levels]
    pj = [lv[3] for lv in s.mem_levels]
    assert sizes == sorted(sizes) and bws == sorted(bws, reverse=True) and pj == sorted(pj)
    assert s.mem_levels[-1][2] == s.mem_bw and s.on_chip_bytes == s.mem_levels[2][1]
    assert 0 < s.energy_per_mac["int8"] < s.energy_per_mac["float32"] < pj[-1] * 4
    json.dumps(s.describe())


def test_tvm_target_is_aarch64_with_dotprod(arm64):
    from tvm.target.codegen import llvm_is_valid_cpu

    t = arm64.tvm()
    assert str(t.attrs["mtriple"]).startswith("aarch64")
    assert llvm_is_valid_cpu(str(t.attrs["mcpu"]), str(t.attrs["mtriple"]))
    assert t.attrs["feature.has_asimd"] and t.attrs["feature.has_dotprod"]
    assert int(t.attrs["num-cores"]) == arm64.spec.cores
    assert arm64.lowering.lanes == arm64.spec.vector_lanes == 4
    assert arm64.runs_here() == ON_ARM


def test_cost_model_is_the_spec_roofline(arm64):
    from hwopt.graph import propagate_meta

    def addmm(b, x, w):
        return torch.ops.aten.addmm.default(b, x, w)

    gm = torch.fx.symbolic_trace(addmm)
    propagate_meta(gm, (torch.randn(512), torch.randn(256, 512), torch.randn(512, 512)))
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    cost = arm64.cost(node)
    from hwopt.cost import node_flops

    flops = node_flops(node)  # 2*M*N*K (+ the bias, where the model counts it)
    assert flops >= 2 * 256 * 512 * 512
    assert cost.flops == pytest.approx(flops)
    # compute-bound: at least flops / peak, and not absurdly more
    peak = arm64.spec.peak_flops["float32"]
    assert flops / peak < cost.latency_s < 10 * flops / peak
    assert cost.energy_j > 0


def test_torch_compile_rejects_arm64_with_option_error():
    if ON_ARM:
        pytest.skip("arm64 runs here: torch.compile may use it")
    fast = torch.compile(nn.Linear(4, 4), backend="hwopt", options={"target": "arm64"})
    with pytest.raises(Exception) as err:
        fast(torch.randn(2, 4))
    inner = getattr(err.value, "inner_exception", err.value)
    assert isinstance(inner, OptionError)
    assert "does not run on this machine" in str(inner) and "hwopt.compile" in str(inner)


def test_missing_emulator_names_the_setup_script(tmp_path, monkeypatch):
    if ON_ARM:
        pytest.skip("no emulator needed on an aarch64 host")
    monkeypatch.setenv("HWOPT_ARM64_ROOT", str(tmp_path))
    with pytest.raises(EmulatorUnavailable, match="setup_arm64.sh"):
        find_emulator()
    assert not emulator_status()[0]


def test_missing_cross_compiler_names_the_fix(arm64, monkeypatch, cache_dir):
    if ON_ARM:
        pytest.skip("an aarch64 host links natively")
    monkeypatch.setattr(arm64.lowering, "cross_compiler", "hwopt-no-such-g++")
    m, x = nn.Linear(8, 4).eval(), torch.randn(2, 8)
    with pytest.raises(LoweringError, match=r"hwopt-no-such-g\+\+ is not on PATH.*setup_arm64"):
        hwopt.compile(m, (x,), target="arm64", cache_dir=str(cache_dir), strict=True)


# -- cross-compiled code --------------------------------------------------------------------------

def elf_machine(path: Path) -> int:
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and head[4] == 2, f"{path} is not a 64-bit ELF"
    return struct.unpack("<H", head[18:20])[0]


def neon_kernels(asm: str, kernels) -> dict[str, bool]:
    """Per kernel: does its code (the compute function and its parallel lambdas) use 128-bit
    NEON registers (or call memcpy, which is how LLVM writes a plain copy)?"""
    found, cur = {k: False for k in kernels}, None
    for seg in re.split(r"^\s*\.type\s+", asm, flags=re.M)[1:]:
        name = seg.split(",")[0]
        if name.endswith("_compute_") and name[:-len("_compute_")] in found:
            cur = name[:-len("_compute_")]
        elif not name.startswith(".L__tvm_parallel_lambda"):
            cur = None
        if cur and re.search(r"\bv\d+\.(?:4s|2d|8h|16b)\b|\b(?:ldr|str|ldp|stp|ldur|stur)\s+q\d+"
                             r"|\bb(?:l)?\s+memcpy", seg):
            found[cur] = True
    return found


def _compile_save(model, inputs, folder: Path, cache_dir):
    art = hwopt.compile(model, inputs, target="arm64", cache_dir=str(cache_dir), strict=True)
    art.save(folder)
    return art


def _check_saved(art, folder: Path):
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["target"] == "arm64"
    assert manifest["tvm_target"]["mtriple"].startswith("aarch64")
    [region] = manifest["regions"]
    assert region["executor"] == "tvm"
    for name in region["files"]:
        assert elf_machine(folder / name) == EM_AARCH64
    asm = art.compiled.module.executable.mod.imports[0].inspect_source("asm")
    scalar_only = [k for k, ok in neon_kernels(asm, region["kernels"]).items() if not ok]
    assert not scalar_only, f"kernels without NEON code at lanes=4: {scalar_only}"
    assert all(rule != "none" for rule, _ in region["kernels"].values())


def _check_emulated(model, inputs, folder: Path):
    with torch.no_grad():
        want = torch.utils._pytree.tree_leaves(model(*inputs))
    got = run_saved(folder, inputs)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        w = w.numpy()
        assert g.shape == w.shape and g.dtype == w.dtype
        err = float(np.abs(g - w).max()) / max(float(np.abs(w).max()), 1e-6)
        assert err <= 1e-4, f"emulated arm64 output differs from eager: rel err {err:.2e}"


@needs_cxx
def test_cnn_builds_aarch64_neon_and_matches_eager_under_qemu(tmp_path, cache_dir):
    model, inputs = zoo.cnn(small=True)
    art = _compile_save(model, inputs, tmp_path / "cnn", cache_dir)
    _check_saved(art, tmp_path / "cnn")
    if not _EMU_OK:
        pytest.skip(f"built and checked the aarch64 library; not run: {_EMU_WHY}")
    _check_emulated(model, inputs, tmp_path / "cnn")


@needs_cxx
@needs_emulator
def test_small_bert_matches_eager_under_qemu(tmp_path, cache_dir):
    model, inputs = zoo.bert(small=True)  # int64 token ids in, two outputs
    art = _compile_save(model, inputs, tmp_path / "bert", cache_dir)
    _check_saved(art, tmp_path / "bert")
    _check_emulated(model, inputs, tmp_path / "bert")


@pytest.mark.slow
@needs_cxx
@needs_emulator
@pytest.mark.parametrize("name", ["vit", "gpt2", "mobilenet"])
def test_small_zoo_matches_eager_under_qemu(name, tmp_path, cache_dir):
    model, inputs = zoo.MODELS[name](small=True)
    art = _compile_save(model, inputs, tmp_path / name, cache_dir)
    _check_saved(art, tmp_path / name)
    _check_emulated(model, inputs, tmp_path / name)


@needs_cxx
def test_partitioned_artifact_is_refused_clearly(tmp_path, cache_dir):
    class WithHostOp(nn.Module):  # hypot has no TVM lowering: two regions around a torch op
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.b(torch.hypot(self.a(x), x))

    x = torch.randn(2, 8)
    with pytest.warns(UserWarning, match="hypot"):
        art = hwopt.compile(WithHostOp().eval(), (x,), target="arm64", cache_dir=str(cache_dir))
    art.save(tmp_path / "two")
    with pytest.raises(HwoptError, match="not one TVM region.*PyTorch ops run between"):
        run_saved(tmp_path / "two", (x,))


@needs_cxx
def test_wrong_input_shape_is_refused(tmp_path, cache_dir):
    m, x = nn.Linear(8, 4).eval(), torch.randn(2, 8)
    _compile_save(m, (x,), tmp_path / "lin", cache_dir)
    with pytest.raises(HwoptError, match=r"compiled for, \[\(2, 8\)\]"):
        run_saved(tmp_path / "lin", (torch.randn(3, 8),))
