"""quantize, attention step (passes/quantize_attention.py): fused attention on int8 q/k/v."""
import pytest
import torch
from hwopt.passes.quantize import QuantizeConfig, quantize_attention
from hwopt.targets.cpu import TARGET as CPU

import hwopt.lowering.attention  # noqa: F401  (registers the attention ops)
import hwopt.lowering.qattention  # noqa: F401
from hwopt import zoo
from hwopt.capture import from_module
from hwopt.pass_base import PassContext, get_pass
from hwopt.quant import sqnr

QATT, ATT = torch.ops.hwopt.qattention.default, torch.ops.hwopt.attention.default


def _calib(x, n=3):
    g = torch.Generator().manual_seed(1)
    if x.is_floating_point():
        return [(torch.randn(x.shape, generator=g),) for _ in range(n)]
    return [(torch.randint(0, 1000, x.shape, generator=g),) for _ in range(n)]


def _quantize(name, **config):
    model, (x,) = zoo.MODELS[name](small=True)
    cap = from_module(model, (x,))
    ctx = PassContext(target=CPU, example_inputs=cap.example_inputs, calibration=_calib(x))
    gm = get_pass("fuse")(cap.gm, ctx).graph_module
    return model, x, ctx, get_pass("quantize", config)(gm, ctx)


def _nodes(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


@pytest.mark.parametrize("name", ["bert", "vit"])  # bert: an additive mask
def test_attention_on_int8_projections_becomes_qattention(name):
    model, x, _, res = _quantize(name, use_cost_model=False)
    gm = res.graph_module
    att = _nodes(gm, QATT)
    assert len(att) == 2 and not _nodes(gm, ATT)  # one per layer
    for n in att:
        assert all(a.meta["val"].dtype == torch.int8 for a in n.args[:3])
        assert n.meta["hwopt_quant"]["dtype"] == "int8"
    assert sum("(attention): int8 - SQNR" in note for note in res.notes) == 2
    with torch.no_grad():
        assert sqnr(model(x)[0], gm(x)[0]) >= 20.0


def test_attention_option_keeps_fp32_attention():
    _, _, _, res = _quantize("bert", use_cost_model=False, attention=False)
    assert len(_nodes(res.graph_module, ATT)) == 2 and not _nodes(res.graph_module, QATT)


def test_low_sqnr_attention_stays_fp32_with_reason():
    _, x, ctx, res = _quantize("bert", use_cost_model=False, attention=False)
    gm = res.graph_module
    notes = quantize_attention(gm, QuantizeConfig(use_cost_model=False, min_sqnr_db=90.0),
                               ctx.calibration, CPU)
    assert len(notes) == 2 and all("fp32 - SQNR" in n and "min_sqnr_db 90" in n for n in notes)
    assert len(_nodes(gm, ATT)) == 2 and not _nodes(gm, QATT)
