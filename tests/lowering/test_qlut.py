"""int8 activations as lookup tables (hwopt.lowering.qlut)."""
import copy

import torch
import torch.nn as nn
import tvm
from hwopt.targets.cpu import TARGET as CPU

import hwopt
from hwopt.capture import from_module
from hwopt.lowering.qdq import fuse_int8_layers, max_output_lsb
from hwopt.lowering.qlut import fold_tables
from hwopt.pass_base import PassContext, get_pass
from hwopt.schedules.lookup import has_vbmi

LUT = torch.ops.hwopt.int8_lut.default


def _mlp(act):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), act, nn.Linear(64, 16)).eval()


def _calib():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 32, generator=g),) for _ in range(4)]


def _quantized(model, x):
    cap = from_module(model, (x,))
    ctx = PassContext(target=CPU, example_inputs=(x,), calibration=_calib())
    gm = get_pass("fuse")(cap.gm, ctx).graph_module
    return get_pass("quantize", {"use_cost_model": False})(gm, ctx).graph_module


def test_activation_between_int8_layers_becomes_an_exact_table():
    x = torch.randn(8, 32)
    for act in (nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Tanh()):
        gm = _quantized(_mlp(act), x)
        fuse_int8_layers(gm)
        before = copy.deepcopy(gm)
        assert fold_tables(gm) == 1
        assert sum(n.target is LUT for n in gm.graph.nodes) == 1
        with torch.no_grad():
            for batch in (x, torch.randn(8, 32) * 3):
                assert torch.equal(gm(batch)[0], before(batch)[0]), act  # bit-exact


def test_compiled_table_matches_fake_quant():
    x = torch.randn(8, 32)
    model = _mlp(nn.GELU())
    art = hwopt.compile(model, (x,), target=CPU, passes=["fuse", "quantize"],
                        pass_config={"quantize": {"use_cost_model": False}},
                        calibration=_calib(), executor="tvm", strict=True, cache_dir=False,
                        progress=False)
    (region,) = art.compiled.regions
    assert region.executor == "tvm"
    assert not any("gelu" in k or "erf" in k for k in region.kernels), list(region.kernels)
    lut = [c[0] for k, c in region.kernels.items() if "int8_lut" in k]
    assert lut == (["lookup_vbmi"] if has_vbmi(tvm.target.Target(CPU.tvm())) else ["injective"])
    fake = art.compiled.graph
    with torch.no_grad():
        for batch in (x, torch.randn(8, 32)):
            got, want = art(batch), fake(batch)[0]
            got = got if isinstance(got, torch.Tensor) else got[0]
            assert float((got - want).abs().max()) <= max_output_lsb(fake) + 1e-6
