"""ONNX in and out: hwopt.onnx_import (+ onnx_ops, onnx_ops_nn), hwopt.onnx_export, the CLI path.

References are ONNX Runtime (for imported models) and eager PyTorch (for exported graphs).
"""
import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import hwopt  # noqa: E402
from hwopt import cli, zoo  # noqa: E402
from hwopt.onnx_export import export_graph, run_onnxruntime  # noqa: E402
from hwopt.onnx_import import OnnxImportError, example_inputs, to_graph_module  # noqa: E402


def _export(model, args, path, opset=17, **kw):
    """TorchScript-based exporter: fast, and it keeps shape arithmetic (Shape/Gather/Concat)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=opset, **kw)
    return path


def _rel(got, want) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def _ops(path) -> set:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


class OpsNet(nn.Module):
    """Many ONNX ops in one small net: pads, pools, norms, activations, shape and index ops."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.ln = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 6)
        zoo._init(self)

    def forward(self, x):
        y = F.relu6(self.conv(F.pad(x, (1, 0, 1, 0))))  # asymmetric Pad, Clip
        y = self.bn(F.hardswish(self.dw(y)))  # BatchNorm not after a conv: stays in the graph
        y = F.max_pool2d(y, 3, 2, 1) + F.avg_pool2d(y, 3, 2, 1)
        a, b = torch.split(y, [3, 5], dim=1)  # Split, Slice
        y = torch.cat([torch.sigmoid(a), F.leaky_relu(b[:, 1:, :, ::2].repeat(1, 1, 1, 2))], 1)
        y = y.flatten(2).reshape(1, -1, 16)  # [1, 28, 16]: Shape/Gather/Concat -> Reshape
        y = F.gelu(self.ln(y.transpose(1, 2).transpose(1, 2)))
        s = torch.softmax(self.fc(y), -1)
        w = torch.where(s > 0.1, s, torch.zeros_like(s)).mean(1, keepdim=True)
        last = s[:, -1].unsqueeze(1)  # Gather with a negative index, Unsqueeze
        return w.expand(2, -1, -1) * torch.tanh(last).sum(), s.amax(-1).squeeze(0)


def test_ops_net_imports_and_matches_onnxruntime(tmp_path):
    m, x = OpsNet().eval(), torch.randn(1, 3, 30, 30)
    for opset in (11, 13, 18):  # attribute vs input forms of axes/split/pads, Softmax semantics
        path = _export(m, (x,), tmp_path / f"ops{opset}.onnx", opset=opset)
        gm, inputs = to_graph_module(str(path), (x,))
        refs = run_onnxruntime(path, inputs)
        outs = gm(*inputs)
        assert len(outs) == len(refs) == 2
        for got, ref, want in zip(outs, refs, m(x)):
            assert _rel(got, ref) <= 1e-5 and _rel(got, want) <= 1e-5, opset
        ops = {n.target for n in gm.graph.nodes if n.op == "call_function"}
        assert F.batch_norm in ops and torch.softmax in ops


@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory):
    m, args = zoo.cnn(small=True)
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    _export(m, args, path, do_constant_folding=False)  # keeps the 6 BatchNormalization nodes
    assert "BatchNormalization" in _ops(path)
    return m, args, path


@pytest.fixture(scope="module")
def cnn_art(cnn_onnx, tmp_path_factory):
    _, _, path = cnn_onnx
    cache = tmp_path_factory.mktemp("cache")
    return hwopt.compile(str(path), cache_dir=str(cache), executor="tvm", progress=False)


def test_onnx_cnn_compiles_for_cpu_and_matches_onnxruntime(cnn_onnx, cnn_art):
    m, args, path = cnn_onnx
    assert all(r.executor == "tvm" for r in cnn_art.compiled.regions), cnn_art.compiled.regions
    fuse = next(r for r in cnn_art.compiled.pass_records if r.name == "fuse")
    assert fuse.modified and "folded 6 BatchNorm(s) into conv/linear" in fuse.notes, fuse.notes
    got = cnn_art(*args)
    got = got[0] if isinstance(got, (tuple, list)) else got
    assert _rel(got, run_onnxruntime(path, args)[0]) <= 1e-4
    assert _rel(got, m(*args)) <= 1e-4


def test_exported_artifact_graph_is_fused_and_matches(cnn_onnx, cnn_art, tmp_path):
    m, args, _ = cnn_onnx
    out = cnn_art.export_onnx(tmp_path / "fused.onnx")
    ops = _ops(out)
    assert "BatchNormalization" not in ops and "Conv" in ops, ops
    assert not (tmp_path / "fused.onnx.data").exists()  # small weights stay in the file
    ref = run_onnxruntime(out, args)[0]
    assert _rel(ref, m(*args)) <= 1e-4


class Attention(nn.Module):
    """A pre-LN transformer block with token + position embeddings and a causal mask."""

    def __init__(self, vocab=50, d=32, heads=4, seq=16):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.heads = heads

    def forward(self, ids):
        b, t = ids.shape
        x = self.tok(ids) + self.pos(torch.arange(t))
        q, k, v = self.qkv(self.ln1(x)).split(x.shape[-1], dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        att = q @ k.transpose(-2, -1) / (q.shape[-1] ** 0.5)
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
        att = torch.softmax(att.masked_fill(mask, float("-inf")), -1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, -1))
        return x + self.mlp(self.ln2(x))


def test_transformer_block_compiles_for_cpu_and_matches_onnxruntime(tmp_path):
    torch.manual_seed(0)
    m, ids = Attention().eval(), torch.randint(0, 50, (2, 16))
    path = _export(m, (ids,), tmp_path / "attn.onnx")
    assert {"Gather", "Split", "Softmax", "Trilu", "Where", "LayerNormalization", "Erf"} \
        <= _ops(path)
    proto = onnx.load(str(path))  # a ModelProto works as well as a path
    art = hwopt.compile(proto, (ids,), cache_dir=str(tmp_path / "cache"), executor="tvm",
                        progress=False)
    assert all(r.executor == "tvm" for r in art.compiled.regions), art.compiled.regions
    got = art(ids)
    got = got[0] if isinstance(got, (tuple, list)) else got
    assert _rel(got, run_onnxruntime(path, (ids,))[0]) <= 1e-4
    assert _rel(got, m(ids)) <= 1e-4


def _qdq_graph():
    """One int8 conv layer in the quantized-graph contract (/work/notes/qdq.md)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401

    from hwopt.graph import propagate_meta

    qd, aten = torch.ops.quantized_decomposed, torch.ops.aten
    torch.manual_seed(0)
    root, g = nn.Module(), torch.fx.Graph()
    w = torch.randn(8, 4, 3, 3)
    scale = w.abs().amax((1, 2, 3)) / 127
    root.register_buffer("w_q", torch.round(w / scale[:, None, None, None]).to(torch.int8))
    root.register_buffer("w_s", scale)
    root.register_buffer("w_z", torch.zeros(8, dtype=torch.int64))
    root.register_buffer("b", torch.randn(8) * 0.1)
    x = g.placeholder("x")
    a = g.call_function(qd.quantize_per_tensor.default, (x, 0.03, 2, -128, 127, torch.int8))
    a = g.call_function(qd.dequantize_per_tensor.default, (a, 0.03, 2, -128, 127, torch.int8))
    wd = g.call_function(qd.dequantize_per_channel.default,
                         (g.get_attr("w_q"), g.get_attr("w_s"), g.get_attr("w_z"), 0, -127, 127,
                          torch.int8))
    y = g.call_function(aten.convolution.default,
                        (a, wd, g.get_attr("b"), [1, 1], [1, 1], [1, 1], False, [0, 0], 1))
    y = g.call_function(aten.relu.default, (y,))
    y = g.call_function(qd.quantize_per_tensor.default, (y, 0.05, -128, -128, 127, torch.int8))
    y = g.call_function(qd.dequantize_per_tensor.default, (y, 0.05, -128, -128, 127, torch.int8))
    g.output((y,))
    gm, inputs = torch.fx.GraphModule(root, g), (torch.randn(1, 4, 8, 8),)
    propagate_meta(gm, inputs)
    return gm, inputs


def test_export_quantized_graph_as_qdq(tmp_path):
    gm, inputs = _qdq_graph()
    path = export_graph(gm, tmp_path / "q.onnx")
    nodes = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert nodes.count("QuantizeLinear") == 2 and nodes.count("DequantizeLinear") == 3, nodes
    # Unoptimised ORT runs the Q/DQ graph as written: the same fake-quantized values as eager.
    ref = run_onnxruntime(path, inputs, optimize=False)[0]
    assert float((ref - gm(*inputs)[0]).abs().max()) <= 1e-5


def _onnx_model(op_type, opset=17, domain=""):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    node = helper.make_node(op_type, ["x"], ["y"], name="the_node", domain=domain)
    imports = [helper.make_opsetid("", opset)]
    imports += [helper.make_opsetid(domain, 1)] if domain else []
    return helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=imports)


def test_unsupported_op_is_a_clear_error():
    with pytest.raises(OnnxImportError) as e:
        hwopt.compile(_onnx_model("Hardmax", opset=13))
    msg = str(e.value)
    assert "Hardmax" in msg and "'the_node'" in msg and "opset 13" in msg
    assert "Supported ops" in msg and "Conv" in msg and "Fix:" in msg
    with pytest.raises(hwopt.HwoptError, match="Did you mean 'Relu'"):
        to_graph_module(_onnx_model("Relu6"))
    with pytest.raises(hwopt.HwoptError, match="domain 'com.microsoft'"):
        to_graph_module(_onnx_model("FusedGelu", domain="com.microsoft"))


def test_cli_compiles_onnx_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HWOPT_CACHE_DIR", str(tmp_path / "cache"))
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    m(torch.randn(1, 3, 10, 10))
    path = _export(m.eval(), (torch.randn(1, 3, 10, 10),), tmp_path / "m.onnx")
    out = tmp_path / "out"
    assert cli.main(["compile", str(path), "-o", str(out), "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"] == [[1, 3, 10, 10]] and manifest["passes"] == ["fuse"]


def test_symbolic_input_shape_needs_input_shapes(tmp_path, monkeypatch):
    monkeypatch.setenv("HWOPT_CACHE_DIR", str(tmp_path / "cache"))
    m = nn.Sequential(nn.Linear(6, 4), nn.Tanh()).eval()
    path = _export(m, (torch.randn(2, 6),), tmp_path / "dyn.onnx",
                   input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    with pytest.raises(OnnxImportError, match="symbolic shape"):
        example_inputs(str(path))
    assert cli.main(["compile", str(path), "--input", "3x6", "-o", str(tmp_path / "o"), "-q"]) == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["inputs"] == [[3, 6]]
    assert cli.main(["compile", str(path), "-o", str(tmp_path / "o2"), "-q"]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "gpt2", "vit", "mobilenet"])
def test_zoo_dynamo_export_compiles_and_matches_onnxruntime(name, tmp_path):
    m, args = zoo.MODELS[name](small=True)
    path = tmp_path / f"{name}.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, args, str(path), dynamo=True, verbose=False)
    art = hwopt.compile(str(path), args, cache_dir=str(tmp_path / "cache"), executor="tvm",
                        progress=False)
    got = art(*args)
    got = got[0] if isinstance(got, (tuple, list)) else got
    want = m(*args)
    want = want if isinstance(want, torch.Tensor) else want[0]
    assert _rel(got, run_onnxruntime(path, args)[0]) <= 1e-4
    assert _rel(got, want) <= 1e-4


@pytest.mark.slow
def test_quantized_artifact_exports_qdq(cnn_onnx, tmp_path):
    """The quantize pass's int8 layers come out as QuantizeLinear/DequantizeLinear pairs."""
    _, args, path = cnn_onnx
    cal = [(torch.randn_like(args[0]),) for _ in range(4)]
    art = hwopt.compile(str(path), args, passes=["fuse", "quantize"], calibration=cal,
                        cache_dir=str(tmp_path / "cache"), progress=False)
    out = art.export_onnx(tmp_path / "q.onnx")
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("QuantizeLinear") >= 7 and "BatchNormalization" not in ops, ops
    graph = art.compiled.graph(*args)[0]
    # Up to one LSB of the output scale: ORT's conv and torch's may round a value differently.
    assert _rel(run_onnxruntime(out, args, optimize=False)[0], graph) <= 1e-2
