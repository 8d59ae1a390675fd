"""FX graph helpers shared by passes and lowering: constants, metadata, op names."""
from __future__ import annotations

import itertools

import torch
import torch.fx as fx

aten = torch.ops.aten


def op_name(node: fx.Node) -> str:
    """'aten.convolution.default'-style name of a node's target."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return str(t)
    if node.op == "call_function":
        return getattr(t, "__module__", "") + "." + getattr(t, "__name__", str(t))
    return f"{node.op}:{t}"


def is_constant(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def constant_value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


def add_constant(gm: fx.GraphModule, value: torch.Tensor, before: fx.Node,
                 hint: str = "folded") -> fx.Node:
    """Register `value` as a buffer and insert a get_attr node for it before `before`."""
    # Deterministic names (first free index) keep the graph's code, and so its cache key, stable.
    name = next(n for n in (f"_hwopt_{hint}{i}" for i in itertools.count())
                if not hasattr(gm, n))
    gm.register_buffer(name, value.detach().contiguous())
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = _fake_like(value)
    return node


def _fake_like(value: torch.Tensor):
    # A meta tensor carries shape/dtype for cost models without holding data twice.
    return torch.empty(value.shape, dtype=value.dtype, device="meta")


def remove_unused_constants(gm: fx.GraphModule) -> None:
    """Drop get_attr nodes without users and buffers no node refers to."""
    gm.graph.eliminate_dead_code()
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name in list(gm._buffers):
        if name not in used:
            del gm._buffers[name]
    for name, _ in list(gm.named_parameters(recurse=False)):
        if name not in used:
            delattr(gm, name)


def propagate_meta(gm: fx.GraphModule, example_inputs) -> None:
    """Fill ``meta['val']`` on every node (shapes, dtypes) by running it on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x
                   for x in example_inputs]
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake_inputs)


def tensor_meta(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None
