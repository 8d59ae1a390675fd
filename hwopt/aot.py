"""Ahead-of-time compilation: ``hwopt.compile(model, example_inputs, target=..., **options)``.

Captures the whole model with torch.export (hwopt.capture.from_module), runs the same pipeline as
the backend (hwopt.compiler) and returns an `Artifact`: callable here when the target runs here,
savable to a folder (TVM libraries, manifest.json, host plan), with a report of what was done.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from hwopt.capture import from_module
from hwopt.compiler import Compiled, compile_captured
from hwopt.errors import HwoptError, OptionError
from hwopt.options import Options


def compile(model: torch.nn.Module, example_inputs=None, *, example_kwargs: dict | None = None,
            **options) -> "Artifact":
    """Compile `model` for `target` ahead of time. Options as for the torch.compile backend.

    ``dynamic_shapes`` (torch.export style, e.g. ``({1: Dim("seq", min=16, max=128)},)`` or
    ``({1: (16, 128)},)``) compiles a few shape buckets instead of one shape and returns a
    hwopt.dynamic.variants.ShapeArtifact (same call / save / report interface).

    `model` may also be an ONNX model (an .onnx path or onnx.ModelProto): it is converted by
    hwopt.onnx_import; `example_inputs` then default to the model's declared input shapes.
    """
    from hwopt.onnx_import import is_onnx_model, to_graph_module

    if is_onnx_model(model):
        model, example_inputs = to_graph_module(model, example_inputs)
    elif example_inputs is None:
        raise OptionError("example_inputs are required (a tensor or a tuple of tensors)")
    opts = Options.from_dict(options)
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise OptionError("example_inputs must be a tensor or a tuple of tensors")
    if opts.dynamic_shapes is not None:  # one static variant per shape bucket
        from hwopt.dynamic.variants import compile_dynamic

        static = {k: v for k, v in options.items() if k != "dynamic_shapes"}
        return compile_dynamic(model, args, example_kwargs, opts, lambda a, k: compile(
            model, a, example_kwargs=k, **static))
    try:
        cap = from_module(model, args, example_kwargs)
    except Exception as e:
        from hwopt.dynamic.hints import capture_hint

        raise HwoptError(f"torch.export could not capture {type(model).__name__}: "
                         f"{type(e).__name__}: {e}{capture_hint(e)}") from e
    compiled = compile_captured(cap, opts)
    if opts.report:
        from hwopt.report import write_report

        write_report(compiled, opts.report)
    shapes = [tuple(a.shape) for a in cap.example_inputs]
    return Artifact(compiled, cap.in_spec, cap.out_spec, shapes)


class Artifact:
    """The result of `hwopt.compile`."""

    def __init__(self, compiled: Compiled, in_spec, out_spec, input_shapes):
        self.compiled, self.in_spec, self.out_spec = compiled, in_spec, out_spec
        self.input_shapes = input_shapes
        self.target = compiled.options.target
        # Inputs that are just positional tensors (the usual case) skip pytree's flatten, which
        # costs ~5 us a call: a tenth of a small int8 CNN's whole run.
        n = len(input_shapes)
        self._positional = n if in_spec == pytree.tree_flatten((tuple(range(n)), {}))[1] else -1

    def __call__(self, *args, **kwargs):
        if not self.target.runs_here():
            raise HwoptError(f"code for target {self.target.name!r} cannot run on this machine; "
                             "use art.save(dir) and run it on the device")
        if not kwargs and len(args) == self._positional and all(
                isinstance(a, torch.Tensor) for a in args):
            tensors = args
        else:
            flat, spec = pytree.tree_flatten((args, kwargs))
            if spec != self.in_spec:
                raise HwoptError(f"inputs do not match the structure compiled for: expected "
                                 f"{self.in_spec}, got {spec}")
            tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        for i, (t, shape) in enumerate(zip(tensors, self.input_shapes)):
            if tuple(t.shape) != shape:
                raise HwoptError(f"input {i} has shape {tuple(t.shape)}, compiled for {shape}; "
                                 "compile again for this shape")
        out = self.compiled(*tensors)
        return pytree.tree_unflatten(list(out), self.out_spec)

    def save(self, path) -> Path:
        """Write the target code, manifest.json and the host plan to folder `path`."""
        from hwopt.cache import versions

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        regions = []
        for info in self.compiled.regions:
            entry = {"name": info.name, "executor": info.executor, "reason": info.reason,
                     "kernels": info.kernels}
            region = _region_of(self.compiled.module, info.name)
            if region is not None:
                entry["files"] = region.export(out, info.name)
                entry["index_checks"] = region.index_checks
            regions.append(entry)
        (out / "host_plan.py").write_text(self.compiled.graph.code)
        from hwopt.dynamic.plan import save_plan  # the plan as data, run by hwopt.dynamic.load

        host_files = save_plan(self, out)
        manifest = {"target": self.target.name, "tvm_target": self.target.tvm_target(),
                    "spec": self.target.spec.describe(),
                    "inputs": [list(s) for s in self.input_shapes], "regions": regions,
                    "passes": [r.name for r in self.compiled.pass_records if not r.skipped],
                    "host_plan": host_files,
                    "versions": versions()}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
        return out

    def export_onnx(self, path, *, opset: int | None = None) -> Path:
        """Write the rewritten graph (after fuse / quantize / prune) to an ONNX file.

        Quantized layers become QuantizeLinear/DequantizeLinear pairs; see hwopt.onnx_export.
        """
        from hwopt.onnx_export import export_graph

        return export_graph(self.compiled.graph, path, opset=opset)

    def report(self):
        from hwopt.report import Report

        return Report(self.compiled)


def _region_of(module, name):
    from hwopt.lowering.region import TVMRegion

    if isinstance(module, TVMRegion):
        region = module
    else:  # dotted: a region nested in a module that stays in PyTorch (a lazy_cache block)
        try:
            region = module.get_submodule(name)
        except AttributeError:
            region = None
    return region if isinstance(region, TVMRegion) else None
