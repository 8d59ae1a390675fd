"""ONNX out: write hwopt's rewritten graph (``Artifact.compiled.graph``) to an ONNX file.

Sits after the rewrite phase: the graph that passes produced (BatchNorm folded by fuse, int8 layers
in the Q/DQ form of /work/notes/qdq.md by quantize, pruned weights) is ATen-level with get_attr
constants; torch.onnx.export (dynamo=True, via onnxscript) re-exports it. Quantized layers come
out as QuantizeLinear / DequantizeLinear pairs (``quantized_decomposed`` ops have torchlib
translations), which ONNX Runtime and other int8 runtimes fuse into integer kernels.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch
import torch.fx as fx

from hwopt.errors import HwoptError

log = logging.getLogger("hwopt")
_EXTERNAL_DATA_BYTES = 1 << 30  # ONNX protobufs stop at 2 GiB; keep a margin


def _example_inputs(gm: fx.GraphModule) -> tuple[torch.Tensor, ...]:
    out = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise HwoptError(f"graph input {n.name!r} has no shape metadata (meta['val']); run "
                             "hwopt.graph.propagate_meta(gm, inputs) before exporting")
        out.append(torch.zeros(val.shape, dtype=val.dtype))
    return tuple(out)


def _constant_bytes(gm: fx.GraphModule) -> int:
    return sum(t.numel() * t.element_size() for t in gm.state_dict().values())


@contextlib.contextmanager
def _quiet_registry():
    """The exporter logs a warning per torchvision op it cannot register; hwopt needs none."""
    reg = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = reg.level
    reg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        reg.setLevel(level)


def export_graph(gm: fx.GraphModule, path, *, opset: int | None = None,
                 inputs: tuple[torch.Tensor, ...] | None = None) -> Path:
    """Export an ATen-level GraphModule (flat tensors in, tuple out) to ONNX at `path`.

    `inputs` default to zeros shaped like the graph's placeholders. Weights go into the .onnx
    file, or next to it (path + ".data") when over 1 GiB.
    """
    from hwopt.lowering.attention import decompose

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gm = decompose(gm)  # fused hwopt::attention -> the ATen ops ONNX knows
    inputs = _example_inputs(gm) if inputs is None else tuple(inputs)
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    external = _constant_bytes(gm) > _EXTERNAL_DATA_BYTES
    try:
        import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the Q/DQ ops)

        with torch.no_grad(), warnings.catch_warnings(), _quiet_registry():
            warnings.simplefilter("ignore")
            torch.onnx.export(gm, inputs, str(path), dynamo=True, opset_version=opset,
                              input_names=names, external_data=external, verbose=False,
                              optimize=True)
    except ImportError as e:
        raise HwoptError(f"ONNX export needs onnx and onnxscript: pip install 'hwopt[onnx]' "
                         f"({e})") from e
    except Exception as e:
        ops = sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        raise HwoptError(f"torch.onnx.export could not export the rewritten graph: "
                         f"{type(e).__name__}: {str(e)[:2000]}\nops in the graph: "
                         f"{', '.join(ops)}") from e
    log.info("hwopt: wrote ONNX model %s (%d graph nodes)", path, len(gm.graph.nodes))
    return path


def run_onnxruntime(path, inputs, *, optimize: bool = True) -> list[torch.Tensor]:
    """Run an ONNX file with ONNX Runtime on CPU (a reference for tests and checks).

    ``optimize=False`` disables graph optimisations: ORT then runs Q/DQ graphs as written
    (fake-quantized fp32). With them on it fuses Q/DQ into integer kernels, which on x86 without
    VNNI may saturate (u8s8 VPMADDUBSW) and differ from the reference by many LSBs.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {i.name: x.detach().cpu().numpy() for i, x in zip(sess.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in sess.run(None, feed)]
