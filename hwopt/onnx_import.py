"""ONNX in: an ONNX model -> an FX GraphModule of torch ops -> the usual hwopt pipeline.

Sits before capture (hwopt.capture): ``hwopt.compile("model.onnx", ...)`` converts the model here,
then torch.export captures the GraphModule like any nn.Module. hwopt's own converter (no
onnx2torch): initializers become buffers (``get_attr`` constants), each node maps to torch ops
(the op table is in hwopt.onnx_ops).

Shapes are static (hwopt compiles for static shapes): the converter tracks every value either as a
constant (a real tensor, known now) or as a graph node with a meta tensor (shape and dtype). Nodes
whose inputs are all constants are evaluated now, so ONNX shape arithmetic (Shape -> Gather ->
Concat -> Reshape) folds away and Reshape/Slice/Expand get constant arguments.
"""
from __future__ import annotations

import logging
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from hwopt.errors import HwoptError, did_you_mean

log = logging.getLogger("hwopt")

# ONNX TensorProto.DataType -> torch dtype (the ones torch has).
DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 4: torch.uint16, 5: torch.int16,
          6: torch.int32, 7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64,
          12: torch.uint32, 13: torch.uint64, 16: torch.bfloat16}


class OnnxImportError(HwoptError):
    """An ONNX model (or one of its nodes) cannot be converted to an FX graph."""


@dataclass
class Dyn:
    """A value computed at run time: its FX node and a meta tensor with its shape and dtype."""

    node: fx.Node
    meta: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.meta.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.meta.dtype


Value = Any  # torch.Tensor (a constant, known now) or Dyn


@dataclass
class InputSpec:
    name: str
    shape: tuple  # ints, or str/None for symbolic dims
    dtype: torch.dtype


def is_onnx_model(obj) -> bool:
    """An .onnx path or an onnx.ModelProto (checked without importing onnx)."""
    if isinstance(obj, (str, Path)):
        return str(obj).endswith(".onnx")
    return type(obj).__name__ == "ModelProto" and type(obj).__module__.startswith("onnx")


def load_model(model) -> Any:
    """An onnx.ModelProto from a path or a ModelProto (external data is loaded with it)."""
    try:
        import onnx
    except ImportError as e:
        raise OnnxImportError("reading ONNX models needs the onnx package: "
                              "pip install 'hwopt[onnx]'") from e
    if isinstance(model, (str, Path)):
        if not Path(model).exists():
            raise OnnxImportError(f"no ONNX file at {str(model)!r}")
        return onnx.load(str(model))
    if isinstance(model, onnx.ModelProto):
        return model
    raise OnnxImportError(f"expected an .onnx path or onnx.ModelProto, got {type(model).__name__}")


def tensor_from_proto(proto) -> torch.Tensor:
    from onnx import numpy_helper

    if proto.data_type not in DTYPES:
        raise OnnxImportError(f"initializer {proto.name!r} has ONNX data type {proto.data_type}, "
                              "which torch has no dtype for")
    arr = numpy_helper.to_array(proto)
    if DTYPES[proto.data_type] is torch.bfloat16:
        return torch.from_numpy(arr.astype("float32")).to(torch.bfloat16)
    return torch.from_numpy(arr.copy()).to(DTYPES[proto.data_type])


def opset_of(model) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


def input_specs(model) -> list[InputSpec]:
    """The model's real inputs (graph inputs that are not initializers)."""
    model = load_model(model)
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or tt.elem_type not in DTYPES:
            raise OnnxImportError(f"input {vi.name!r} is not a tensor of a supported dtype")
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dims, DTYPES[tt.elem_type]))
    return specs


def example_inputs(model, shapes: list[tuple[int, ...]] | None = None,
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs for `model`: shapes from the model, or `shapes` (one per input) where given.

    Floats are standard normal, integers zeros (safe as token ids and indices), bools False.
    """
    specs = input_specs(model)
    if shapes is not None and len(shapes) != len(specs):
        raise OnnxImportError(f"the model has {len(specs)} input(s) "
                              f"({', '.join(s.name for s in specs)}), got {len(shapes)} shape(s)")
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, spec in enumerate(specs):
        shape = tuple(shapes[i]) if shapes is not None else spec.shape
        if any(not isinstance(d, int) for d in shape):
            raise OnnxImportError(f"input {spec.name!r} has symbolic shape {spec.shape}: give "
                                  "example inputs (API) or --input (CLI), e.g. --input 1x3x224x224")
        if spec.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=g).to(spec.dtype))
        else:
            out.append(torch.zeros(shape, dtype=spec.dtype))
    return tuple(out)


class Converter:
    """Walks an ONNX graph in order and builds the FX graph; handlers call `emit`."""

    def __init__(self, model, inputs: tuple[torch.Tensor, ...]):
        self.model, self.opset = model, opset_of(model)
        self.graph, self.root = fx.Graph(), torch.nn.Module()
        self.env: dict[str, Value] = {}
        self._const_nodes: dict[int, tuple[torch.Tensor, fx.Node]] = {}
        self._init_names: dict[int, str] = {}  # id(initializer tensor) -> its ONNX name
        self._names: set[str] = set()
        self.onnx_node = None  # the node being converted, for error messages
        self._add_inputs(inputs)
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        self._anchor = placeholders[-1] if placeholders else self.graph._root  # consts go after

    def _add_inputs(self, inputs) -> None:
        for spec, x in zip(input_specs(self.model), inputs):
            node = self.graph.placeholder(self._unique(spec.name))
            meta = torch.empty(x.shape, dtype=x.dtype, device="meta")
            node.meta["val"] = meta
            self.env[spec.name] = Dyn(node, meta)

    def _unique(self, name: str) -> str:
        base = re.sub(r"\W", "_", name) or "v"
        base = base if not base[0].isdigit() else f"v_{base}"
        cand, i = base, 0
        while cand in self._names or hasattr(self.root, cand):
            i += 1
            cand = f"{base}_{i}"
        self._names.add(cand)
        return cand

    # -- used by handlers ------------------------------------------------------------------------

    def fail(self, message: str) -> OnnxImportError:
        n = self.onnx_node
        where = f"node {n.name or '?'!r} (op {n.op_type}, opset {self.opset})" if n else "model"
        return OnnxImportError(f"ONNX {where}: {message}")

    def const(self, v: Value, what: str) -> torch.Tensor:
        """The value of an input that must be known at compile time (a shape, axes, ...)."""
        if isinstance(v, Dyn):
            raise self.fail(f"{what} must be a constant (computable from initializers and static "
                            "shapes), but it depends on the model's inputs; hwopt compiles "
                            "static shapes: export the model with fixed shapes")
        return v

    def emit(self, fn: Callable, *args, **kwargs) -> Value:
        """Apply `fn`: folded now when every input is a constant, else a call_function node."""
        leaves = pytree.tree_leaves((args, kwargs))
        if not any(isinstance(a, Dyn) for a in leaves):
            with torch.no_grad():
                return fn(*args, **kwargs)
        meta_args, meta_kwargs = pytree.tree_map(self._to_meta, (args, kwargs))
        try:
            meta = fn(*meta_args, **meta_kwargs)
        except Exception as e:
            raise self.fail(f"{getattr(fn, '__name__', fn)} failed on the input shapes "
                            f"{[tuple(a.shape) for a in leaves if hasattr(a, 'shape')]}: "
                            f"{type(e).__name__}: {e}") from e
        fx_args, fx_kwargs = pytree.tree_map(self._to_fx, (args, kwargs))
        node = self.graph.call_function(fn, tuple(fx_args), dict(fx_kwargs))
        if isinstance(meta, (tuple, list)):
            outs = []
            for i, m in enumerate(meta):
                item = self.graph.call_function(operator.getitem, (node, i))
                item.meta["val"] = m
                outs.append(Dyn(item, m))
            return outs
        node.meta["val"] = meta
        return Dyn(node, meta)

    def _to_meta(self, a):
        if isinstance(a, Dyn):
            return a.meta
        return a.to("meta") if isinstance(a, torch.Tensor) else a

    def _to_fx(self, a):
        if isinstance(a, Dyn):
            return a.node
        return self.const_node(a) if isinstance(a, torch.Tensor) else a

    def const_node(self, t: torch.Tensor) -> fx.Node:
        if id(t) not in self._const_nodes:  # the tensor is kept with its node: ids stay unique
            name = self._unique(self._init_names.get(id(t), "_onnx_const"))
            self.root.register_buffer(name, t.detach().contiguous())
            with self.graph.inserting_after(self._anchor):
                node = self.graph.get_attr(name)
            node.meta["val"] = torch.empty(t.shape, dtype=t.dtype, device="meta")
            self._const_nodes[id(t)] = (t, node)
        return self._const_nodes[id(t)][1]

    # -- the walk ------------------------------------------------------------------------------

    def run(self) -> fx.GraphModule:
        results = self.inline(self.model.graph)
        self.graph.output(tuple(self._to_fx(v) for v in results))
        gm = fx.GraphModule(self.root, self.graph, class_name="OnnxGraph")
        gm.graph.lint()
        return gm

    def inline(self, graph) -> list[Value]:
        """Convert the nodes of `graph` (the model's, or a branch of an If) into the FX graph."""
        from hwopt.onnx_ops import HANDLERS, attributes

        outer = self.onnx_node
        for proto in graph.initializer:
            self.env[proto.name] = t = tensor_from_proto(proto)
            self._init_names[id(t)] = proto.name
        for node in graph.node:
            self.onnx_node = node
            if node.domain not in ("", "ai.onnx"):
                raise self._unsupported(node, f"domain {node.domain!r}")
            handler = HANDLERS.get(node.op_type)
            if handler is None:
                raise self._unsupported(node)
            ins = [self.env[i] if i else None for i in node.input]
            try:
                outs = handler(self, ins, attributes(self, node))
            except OnnxImportError:
                raise
            except Exception as e:  # a malformed node, or a case the handler did not foresee
                raise self.fail(f"conversion failed: {type(e).__name__}: {e}") from e
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            for name, val in zip(node.output, outs):
                if name:
                    self.env[name] = val
        self.onnx_node = outer
        return [self.env[o.name] for o in graph.output]

    def _unsupported(self, node, why: str = "") -> OnnxImportError:
        from hwopt.onnx_ops import HANDLERS

        ops = sorted(HANDLERS)
        what = f"{node.op_type} ({why})" if why else node.op_type
        return OnnxImportError(
            f"ONNX op {what} in node {node.name or '?'!r} (opset {self.opset}) is not supported "
            f"by hwopt's ONNX importer.{did_you_mean(node.op_type, ops)} Supported ops (default "
            f"domain): {', '.join(ops)}. Fix: re-export the model so that this op is decomposed "
            "into supported ones, or compile the PyTorch model directly.")


def to_graph_module(model, inputs=None) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    """Convert an ONNX model (path or ModelProto) to a GraphModule of torch ops.

    `inputs`: example tensors (their shapes are compiled for); default: from the model's shapes.
    Returns the module (flat tensors in, tuple out) and the example inputs.
    """
    model = load_model(model)
    if inputs is None:
        inputs = example_inputs(model)
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    specs = input_specs(model)
    if len(inputs) != len(specs):
        raise OnnxImportError(f"the model has {len(specs)} input(s) "
                              f"({', '.join(s.name for s in specs)}), got {len(inputs)}")
    for spec, x in zip(specs, inputs):
        fixed = [(i, d) for i, d in enumerate(spec.shape) if isinstance(d, int) and d > 0]
        if len(spec.shape) != x.dim() or any(x.shape[i] != d for i, d in fixed):
            raise OnnxImportError(f"input {spec.name!r} has shape {tuple(x.shape)}, the model "
                                  f"declares {spec.shape}")
    gm = Converter(model, inputs).run()
    log.info("hwopt: imported ONNX graph (opset %d, %d nodes) as %d FX nodes", opset_of(model),
             len(model.graph.node), len(gm.graph.nodes))
    return gm, inputs


def compile_onnx(model, example_inputs=None, **options):
    """``hwopt.compile`` for an ONNX model: convert, then compile the GraphModule."""
    from hwopt.aot import compile as aot_compile

    gm, inputs = to_graph_module(model, example_inputs)
    return aot_compile(gm, inputs, **options)
