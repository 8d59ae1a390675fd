"""Costs as sympy expressions in the dynamic dimensions of a graph, evaluated per shape bucket.

For a graph captured by ``torch.export`` with ``Dim`` dynamic shapes, ``node.meta['val']`` holds
fake tensors whose sizes are SymInts (``.node.expr`` is sympy). The analytical model
(``hwopt.cost.RooflineModel``) runs unchanged on them and returns a `Cost` of expressions:
latency is a sum of ``Max(compute, traffic/bandwidth per level) + overhead`` terms, with
``Piecewise`` choosing the memory level a tensor of symbolic size fits in. `Cost.evaluate` or
`evaluate_buckets` give the concrete cost for a shape, equal to what the concrete-shape model
computes for that shape (tested).

    ep = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch")},))
    cost = symbolic_cost(ep.run_decompositions().module())
    cost.latency_s                          # sympy expression in s0 (the batch symbol)
    evaluate_buckets(cost, {"s0": [1, 2, 4, 8]})
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from hwopt.cost import Cost


def _roofline(model):
    if model is None:
        from hwopt.target import get_target

        model = get_target("cpu").cost_model
    return model.roofline() if hasattr(model, "roofline") else model


def symbolic_cost(gm: fx.GraphModule, model=None) -> Cost:
    """Cost of `gm` (compiled as one region) as sympy expressions in its dynamic dimensions.

    `model` is a RooflineModel or a target's cost model (its calibrated roofline is used; the
    learned refinement is not symbolic). Default: the cpu target's.
    """
    from hwopt.cost_fusion import graph_kernels

    return _roofline(model).kernels_cost(graph_kernels(gm))


def symbols(gm: fx.GraphModule) -> dict[str, Any]:
    """{"input.dim" name: sympy symbol} for every symbolic input dimension, e.g. {"x.0": s0}."""
    out = {}
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if n.op == "placeholder" and isinstance(v, torch.Tensor):
            for i, s in enumerate(v.shape):
                if isinstance(s, torch.SymInt) and getattr(s.node.expr, "is_Symbol", False):
                    out[f"{n.name}.{i}"] = s.node.expr
    return out


def bind_shapes(gm: fx.GraphModule, inputs) -> dict:
    """{symbol: size} read off concrete `inputs` (in placeholder order)."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = {}
    for n, x in zip(phs, inputs):
        v = n.meta.get("val")
        if not isinstance(v, torch.Tensor) or not isinstance(x, torch.Tensor):
            continue
        for s, size in zip(v.shape, x.shape):
            if isinstance(s, torch.SymInt) and getattr(s.node.expr, "is_Symbol", False):
                values[s.node.expr] = int(size)
    return values


def evaluate_buckets(cost: Cost, buckets: dict) -> dict:
    """Concrete costs for shape buckets: ``{sym or name: [values]}`` (one symbol) -> {value: Cost};
    several symbols -> {tuple of values: Cost} over the zipped lists."""
    import sympy

    by_name = {s.name: s for s in cost.symbols}
    syms = [by_name.get(k, k) if isinstance(k, str) else k for k in buckets]
    unknown = [str(s) for s in syms if not isinstance(s, sympy.Symbol)]
    if unknown:
        raise ValueError(f"evaluate_buckets: unknown symbol(s) {', '.join(unknown)}; the cost's "
                         f"symbols are {', '.join(sorted(by_name))}")
    fns = [sympy.lambdify(syms, getattr(cost, f), modules=["math", "sympy"])
           for f in ("latency_s", "energy_j", "bytes_moved", "flops")]
    rows = list(zip(*buckets.values()))
    out = {}
    for row in rows:
        key = row[0] if len(row) == 1 else row
        out[key] = Cost(*(float(fn(*row)) for fn in fns))
    return out
