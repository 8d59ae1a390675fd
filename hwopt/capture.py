"""Capture: turn what the user gives (a Dynamo graph or an nn.Module) into hwopt's canonical form.

First step of the pipeline. The canonical form is an ATen-level (core ATen decomposition) FX
GraphModule that takes flat tensor inputs and returns a flat tuple of tensors; parameters and
buffers are frozen into ``get_attr`` constants (hwopt compiles for inference, like Inductor's
``freezing``), and every node carries ``meta['val']`` (a fake tensor with shape and dtype).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .errors import HwoptError


class CaptureError(HwoptError):
    """The graph cannot be captured into hwopt's canonical form (e.g. symbolic shapes)."""


@dataclass
class Captured:
    gm: fx.GraphModule  # flat tensors in, flat tuple of tensors out
    example_inputs: tuple  # flat tensors
    input_indices: tuple = ()  # which of the caller's inputs feed the graph (Dynamo path)
    frozen: tuple = ()  # (tensor, version) of frozen weights, to detect later mutation
    in_spec: Any = None  # pytree spec of the user's (args, kwargs), AOT path only
    out_spec: Any = None  # pytree spec of the user's outputs, AOT path only


def is_weight(t: Any) -> bool:
    # Dynamo marks parameters and buffers of nn.Modules it inlines as static inputs.
    return isinstance(t, torch.nn.Parameter) or bool(getattr(t, "_dynamo_static_input_type", None))


def has_symbolic(xs) -> bool:
    for x in xs:
        if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return True
        if isinstance(x, torch.Tensor) and any(not isinstance(s, int) for s in x.shape):
            return True
    return False


def freeze_weights(gm: fx.GraphModule, example_inputs) -> tuple[fx.GraphModule, list, list]:
    """Replace placeholders fed with parameters/buffers by get_attr constants.

    Returns the module, the indices of the inputs that remain real inputs, and the frozen tensors.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise CaptureError(f"graph has {len(placeholders)} inputs but {len(example_inputs)} "
                           "example inputs were given")
    user, frozen = [], []
    for i, (node, val) in enumerate(zip(placeholders, example_inputs)):
        if isinstance(val, torch.Tensor) and is_weight(val):
            name = f"_hwopt_const{i}"
            gm.register_buffer(name, val.detach())
            with gm.graph.inserting_before(node):
                attr = gm.graph.get_attr(name)
            attr.meta = dict(node.meta)
            node.replace_all_uses_with(attr)
            gm.graph.erase_node(node)
            frozen.append((val, val._version))
        elif isinstance(val, (int, float, bool)):
            _bake_scalar(node, val)  # a concrete value for a symbolic size: specialise on it
            gm.graph.erase_node(node)
        else:
            user.append(i)
    gm.recompile()
    return gm, user, frozen


def _bake_scalar(node: fx.Node, value) -> None:
    for user in list(node.users):
        user.args = fx.node.map_arg(user.args, lambda a: value if a is node else a)
        user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)


def _flatten_exported(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """`ep.module()` without pytree codegen and export's guard call: a plain flat GraphModule."""
    mod = ep.module()
    graph = mod.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
        elif node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)  # an export-time dtype check; shapes are static here
    graph._codegen = fx.graph.CodeGen()
    out = next(n for n in graph.nodes if n.op == "output")
    vals = out.args[0]
    out.args = (tuple(vals) if isinstance(vals, (list, tuple)) else (vals,),)
    flat = fx.GraphModule(mod, graph)
    for name in list(flat._modules):
        if name.startswith("_guards"):
            delattr(flat, name)
    graph.eliminate_dead_code()
    _contiguous_inputs(graph)
    flat.recompile()
    return flat


# Ops whose CPU kernels require a contiguous input, which core-ATen decompositions do not always
# give them (diffusers' UNet2DModel: a cat of channels-last-strided tensors feeds group_norm, and
# the decomposed program fails to run at all in PyTorch 2.13).
_NEEDS_CONTIGUOUS = (torch.ops.aten.native_group_norm.default,)


def _contiguous_inputs(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _NEEDS_CONTIGUOUS:
            continue
        x = node.args[0]
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if not isinstance(val, torch.Tensor) or val.is_contiguous():
            continue
        with graph.inserting_before(node):
            copy_ = graph.call_function(torch.ops.aten.clone.default, (x,),
                                        {"memory_format": torch.contiguous_format})
        copy_.meta = {**x.meta, "val": val.contiguous()}
        node.replace_input_with(x, copy_)


def _export(module: torch.nn.Module, args: tuple, kwargs: dict | None = None):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(module, args, kwargs=kwargs or {}, strict=False)
        return ep.run_decompositions()


def from_dynamo(gm: fx.GraphModule, example_inputs: list) -> Captured:
    """Canonical form of the graph Dynamo hands to a backend."""
    if has_symbolic(example_inputs):
        raise CaptureError("the graph has symbolic (dynamic) shapes; hwopt compiles static "
                           "shapes here (use torch.compile(..., dynamic=False))")
    # A new module over a copied graph: the caller's graph stays intact for the eager fallback.
    gm = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    gm, indices, frozen = freeze_weights(gm, list(example_inputs))
    user = [example_inputs[i] for i in indices]
    if not all(isinstance(x, torch.Tensor) for x in user):
        kinds = sorted({type(x).__name__ for x in user if not isinstance(x, torch.Tensor)})
        raise CaptureError(f"non-tensor graph inputs ({', '.join(kinds)}) are not supported")
    ep = _export(gm, tuple(user))
    return Captured(_flatten_exported(ep), tuple(user), tuple(indices), tuple(frozen))


def from_module(model: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> Captured:
    """Canonical form of a whole model, via torch.export (ahead-of-time path)."""
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"hwopt.compile expects a torch.nn.Module, got {type(model).__name__}")
    ep = _export(model, tuple(args), kwargs)
    flat_args, in_spec = pytree.tree_flatten((tuple(args), dict(kwargs or {})))
    out_spec = ep.call_spec.out_spec
    user = tuple(a for a in flat_args if isinstance(a, torch.Tensor))
    return Captured(_flatten_exported(ep), user, in_spec=in_spec, out_spec=out_spec)
