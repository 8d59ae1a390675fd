"""Grouped matmul: the rows of several experts' linear layers in one kernel (lower step).

``hwopt::grouped_mm(x [P, K], w [G, K, N], bias [G, N] | None, group int32 [P], tile)`` is what
the ``split`` pass (passes/split_experts.py) puts in place of the per-expert linear layers of a
mixture of experts: the host lays the rows routed to each expert out one after the other, each
expert's rows padded to a multiple of ``tile`` (hwopt.dynamic.grouped), so one compiled network
runs every expert instead of one padded network per expert.

Row ``p`` is multiplied by the weights of the group of its tile's first row,
``w[group[p // tile * tile]]``: within a register tile of ``tile`` rows the weights are the same,
so the kernel is a dense matmul whose B operand is picked per row tile (the `GroupedDense` rule
of hwopt.schedules.dense schedules it; block name `BLOCK`). `reference` is the PyTorch form (run
where TVM does not take the region); `CONVERTERS` joins the Relax import's custom converters.
"""
from __future__ import annotations

import torch

BLOCK = "hwopt_grouped_mm"  # the schedule rule finds the kernel by this block name prefix


def _tile_groups(group: torch.Tensor, tile: int) -> torch.Tensor:
    first = group.reshape(-1, tile)[:, 0].long()
    return first.repeat_interleave(tile)


def reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
              group: torch.Tensor, tile: int) -> torch.Tensor:
    """``y[p] = x[p] @ w[g] + bias[g]`` with ``g`` the group of row p's tile."""
    if x.shape[0] % tile:
        raise ValueError(f"grouped_mm: {x.shape[0]} rows are not a multiple of tile {tile}")
    out = x.new_empty((x.shape[0], w.shape[-1]))
    if x.shape[0] == 0:
        return out
    g = _tile_groups(group, tile)
    for e in torch.unique(g).tolist():
        rows = (g == e).nonzero().squeeze(-1)
        y = x.index_select(0, rows) @ w[e]
        out[rows] = y + bias[e] if bias is not None else y
    return out


@torch.library.custom_op("hwopt::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
               group: torch.Tensor, tile: int) -> torch.Tensor:
    return reference(x, w, bias, group, tile)


@grouped_mm.register_fake
def _(x, w, bias, group, tile):
    return x.new_empty((x.shape[0], w.shape[-1]))


def kernel(x, w, bias, group, tile: int):
    """TE: the grouped matmul; the weight index is constant over each tile of rows."""
    from tvm import te

    p, n = x.shape[0], w.shape[2]
    k = te.reduce_axis((0, x.shape[1]), name="k")
    acc = te.compute(
        (p, n), lambda i, j: te.sum(x[i, k] * w[group[i // tile * tile], k, j], axis=k),
        name=f"{BLOCK}_t{tile}")
    if bias is None:
        return acc
    return te.compute((p, n), lambda i, j: acc[i, j] + bias[group[i // tile * tile], j],
                      name=f"{BLOCK}_bias")


def _convert(node, imp):
    x, w, bias, group, tile = imp.retrieve_args(node)
    # op_pattern 4 (out-elementwise fusable): the activation after it fuses into its epilogue
    # (indirect indexing would otherwise make the PrimFunc opaque to FuseOps)
    return imp.block_builder.emit_te(kernel, x, w, bias, group, int(tile),
                                     primfunc_name_hint="hwopt_grouped_mm",
                                     primfunc_attrs={"op_pattern": 4})


CONVERTERS = {"grouped_mm.default": _convert}
