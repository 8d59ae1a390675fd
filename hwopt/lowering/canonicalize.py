"""Rewrites of the ATen graph that help TVM's Relax phases, applied to a copy of each region
just before Relax import (lower step). They do not change results.

- ``hardtanh(x, 0, hi)`` (ReLU6) -> ``minimum(relu(x), hi)``: Relax's ConvertLayout has no layout
  rule for ``clip`` (what hardtanh and clamp import as), so a clip between two NHWC convs gets
  wrapped in transposes and stays out of the conv's fused epilogue; relu and minimum with a
  scalar follow the conv's layout.
- ``pow(x, n)`` for integral n in 2..4 (GPT-2's tanh GELU has ``x ** 3``) -> ``x * x [* x ...]``:
  TVM lowers a float power through exp/log, warns on every such op (it is wrong for x < 0 in
  some backends), and a product is cheaper and exact for negative x.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx

from hwopt.graph import add_constant

aten = torch.ops.aten


def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    out = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    changed = False
    for node in list(out.graph.nodes):
        if node.target is aten.hardtanh.default and _relu6_like(node):
            x = node.args[0]
            hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
            bound = add_constant(out, torch.tensor(float(hi), dtype=torch.float32), node, "hi")
            with out.graph.inserting_before(node):
                relu = out.graph.call_function(aten.relu.default, (x,))
                new = out.graph.call_function(aten.minimum.default, (relu, bound))
            node.replace_all_uses_with(new)
            out.graph.erase_node(node)
            changed = True
        elif node.target is aten.pow.Tensor_Scalar and _small_power(node) is not None:
            x, n = node.args[0], _small_power(node)
            with out.graph.inserting_before(node):
                new = x
                for _ in range(n - 1):
                    new = out.graph.call_function(aten.mul.Tensor, (new, x))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            out.graph.erase_node(node)
            changed = True
    if changed:
        out.recompile()
    return out


def _small_power(node: fx.Node) -> int | None:
    """The exponent of ``pow(x, n)`` when it is an integral 2..4, else None."""
    n = node.args[1] if len(node.args) > 1 else node.kwargs.get("exponent")
    if isinstance(n, bool) or not isinstance(n, (int, float)) or float(n) != int(n):
        return None
    return int(n) if 2 <= int(n) <= 4 else None


def _relu6_like(node: fx.Node) -> bool:
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
    return lo == 0
