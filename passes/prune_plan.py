"""prune, planning half: the layers, their calibration statistics, and the density of each.

Used by ``hwopt.passes.prune`` (see its docstring for the pipeline position). Steps:
1. `find_prunable`: conv / linear layers with constant weights (``quantize.find_layers``), each
   with the reason a scheme cannot prune it (e.g. kernel patterns on a 1x1 conv);
2. `gather_stats`: run the graph on the calibration batches; per layer the Gram matrix ``X^T X``
   of its inputs (conv inputs unfolded to im2col rows);
3. `levels`: the densities a scheme offers for a layer, each with its mask and error proxy (the
   fraction of ``w**2 * diag(X^T X)`` it removes) and its latency predicted by the target's cost
   model (sparse kernels at ``sparse_efficiency`` of the dense kernel's FLOP rate);
4. `allocate`: greedy per-layer density to meet the sparsity or latency target, taking at each
   step the move with the most predicted latency saved per unit of error proxy.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from hwopt.errors import OptionError
from hwopt.graph import constant_value
from hwopt.sparse import layout, masks
from hwopt.sparse.reconstruct import gram, reconstruct

from .quantize import Layer, _module_path, find_layers

log = logging.getLogger("hwopt")
_ROWS_PER_BATCH = 4096  # calibration rows (pixels / tokens) per batch kept for the Gram matrix
PATTERN_KEEP = (1.0, 0.75, 0.5, 0.375, 0.25)  # connectivity: fraction of kernels kept per filter
BLOCK_DENSITY = (0.75, 0.5, 0.375, 0.25, 0.125)


@dataclass
class Prunable:
    layer: Layer
    weight: torch.Tensor  # [O, C, kh, kw] or [O, K]
    why_not: str | None = None  # None: the scheme applies
    h: torch.Tensor | None = None  # Gram matrix of the inputs (float64)
    rows: int = 0
    levels: list = field(default_factory=list)  # [Level], index 0 = dense
    choice: int = 0

    @property
    def name(self) -> str:
        return self.layer.node.name

    @property
    def path(self) -> str:
        return self.layer.path or _module_path(self.layer.node)


@dataclass
class Level:
    density: float
    mask: torch.Tensor | None  # None: dense
    error: float  # fraction of the importance removed
    latency_s: float
    label: str


def layer_weight(gm: fx.GraphModule, L: Layer) -> torch.Tensor:
    w = constant_value(gm, L.w).detach()
    return w if L.kind == "conv" else w.t().contiguous()  # addmm / mm read [K, N]


def conv_params(node: fx.Node) -> tuple[list, list, list, int]:
    stride, padding, dilation = node.args[3], node.args[4], node.args[5]
    groups = node.args[8] if len(node.args) > 8 else 1
    return list(stride), list(padding), list(dilation), int(groups)


def find_prunable(gm: fx.GraphModule, scheme: str, nm: tuple[int, int],
                  skip: tuple[str, ...]) -> list[Prunable]:
    out = []
    for L in find_layers(gm):
        w = layer_weight(gm, L)
        why = None
        if any(s in (L.node.name, L.kind) or (L.path and s in L.path) for s in skip):
            why = "skipped by PruneConfig.skip"
        elif L.kind == "conv" and conv_params(L.node)[3] != 1:
            why = "grouped/depthwise conv: left dense (few weights, no sparse kernel)"
        elif L.kind == "conv" and len(conv_params(L.node)[0]) != 2:
            why = "not a 2-D convolution"
        elif scheme != "detect":
            why = masks.applies(scheme, L.kind, tuple(w.shape), nm)
        out.append(Prunable(L, w, why))
    return out


def im2col(x: torch.Tensor, kh: int, kw: int, stride, padding, dilation) -> torch.Tensor:
    """``[N, C, kh*kw, Ho, Wo]``: the input under each kernel tap (F.unfold measured ~100x
    slower here on small maps)."""
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    ho = (xp.shape[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (xp.shape[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    taps = [xp[:, :, i * dilation[0]: i * dilation[0] + (ho - 1) * stride[0] + 1: stride[0],
               j * dilation[1]: j * dilation[1] + (wo - 1) * stride[1] + 1: stride[1]]
            for i in range(kh) for j in range(kw)]
    return torch.stack(taps, 2)


def _rows(L: Layer, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if L.kind == "linear":
        rows = x.reshape(-1, x.shape[-1])
    else:
        cols = im2col(x, w.shape[2], w.shape[3], *conv_params(L.node)[:3])
        rows = cols.permute(0, 3, 4, 1, 2).reshape(-1, cols.shape[1] * cols.shape[2])
    if rows.shape[0] > _ROWS_PER_BATCH:
        g = torch.Generator().manual_seed(rows.shape[0])
        rows = rows[torch.randperm(rows.shape[0], generator=g)[:_ROWS_PER_BATCH]]
    return rows


class _Grams(fx.Interpreter):
    def __init__(self, gm, by_input: dict):
        super().__init__(gm)
        self.by_input = by_input

    def run_node(self, n):
        value = super().run_node(n)
        for p in self.by_input.get(n, ()):
            rows = _rows(p.layer, value.detach().float(), p.weight)
            h = gram(rows)
            p.h = h if p.h is None else p.h + h
            p.rows += rows.shape[0]
        return value


class _Inputs(fx.Interpreter):
    def __init__(self, gm, name: str):
        super().__init__(gm)
        self.name, self.seen = name, []

    def run_node(self, n):
        value = super().run_node(n)
        if n.name == self.name:
            self.seen.append(value.detach().float())
        return value


def layer_rows(gm: fx.GraphModule, p: Prunable, input_name: str, batches) -> torch.Tensor:
    """The layer's input rows (im2col for convs) when ``gm`` runs the calibration batches."""
    rec = _Inputs(gm, input_name)
    with torch.no_grad():
        for batch in batches:
            rec.run(*batch)
    return torch.cat([_rows(p.layer, x, p.weight) for x in rec.seen])


def gather_stats(gm: fx.GraphModule, layers: list[Prunable], batches) -> None:
    """Gram matrix of every prunable layer's inputs over the calibration batches."""
    by_input: dict = {}
    for p in layers:
        if p.why_not is None:
            by_input.setdefault(p.layer.x, []).append(p)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        for batch in batches:
            if len(batch) != len(placeholders):
                raise OptionError(f"prune: a calibration batch has {len(batch)} tensor(s) but the "
                                  f"graph takes {len(placeholders)}; give calibration batches "
                                  "shaped like the example inputs")
            _Grams(gm, by_input).run(*batch)


def importance(p: Prunable) -> torch.Tensor:
    """``w**2 * diag(X^T X)``: the output energy each weight carries on the calibration data."""
    d = torch.diagonal(p.h).float() if p.h is not None else torch.ones(p.weight[0].numel())
    return p.weight.float() ** 2 * d.reshape(p.weight.shape[1:]).unsqueeze(0)


def share_of(p: Prunable, cfg, target) -> int:
    """Filters sharing one mask in this layer: the configured (or the target's vector width,
    for ``share=0``), halved until it divides the layer's output channels."""
    want = cfg.share or max(int(getattr(target, "schedule_lanes", 1) or 1), 1)
    o = p.weight.shape[0]
    while want > 1 and o % want:
        want //= 2
    return want


def scheme_masks(p: Prunable, cfg, share: int = 1) -> list[tuple[float, torch.Tensor, str]]:
    """(density, mask, label) for every level the scheme offers this layer, densest first."""
    imp = importance(p)
    by = f", shared by {share} filters" if share > 1 else ""
    if cfg.scheme == "pattern":
        lib = masks.pattern_library(imp, cfg.patterns)
        return [(4 / 9 * f, masks.pattern_mask(imp, f, lib, share),
                 f"{cfg.patterns} patterns, {f:.0%} kernels kept{by}") for f in PATTERN_KEEP]
    if cfg.scheme == "nm":
        n, m = cfg.nm
        rows = cfg.nm_rows or share
        label = f"{n}:{m}" + (f", rows share it by {rows}" if rows > 1 else "")
        return [(n / m, masks.nm_mask(imp, n, m, rows), label)]
    r, c = cfg.block
    r = r or share
    if cfg.scheme == "block_punched":
        return [(d, masks.block_punched_mask(imp, d, r, c), f"block-punched {r}x{c}")
                for d in BLOCK_DENSITY]
    return [(d, masks.block_mask(imp, d, r, c), f"blocks {r}x{c}") for d in BLOCK_DENSITY]


def predicted_latency(node: fx.Node, target, density: float, efficiency: float) -> float:
    """Seconds the target's cost model predicts for the layer at ``density`` (1 = dense)."""
    from hwopt.cost import node_bytes, node_flops, op_class

    flops, nbytes = float(node_flops(node)), float(node_bytes(node))
    model = getattr(target, "cost_model", None)
    if density < 1:
        flops *= density / efficiency  # the sparse kernel does fewer FLOPs, less efficiently
    try:
        return float(model.cost_of(flops, nbytes, op_class(node)).latency_s)
    except Exception as e:  # noqa: BLE001 - without a model, FLOPs stand in for time
        log.debug("hwopt: prune: cost model failed on %s: %s", node.name, e)
        return flops * 1e-11


def output_error(p: Prunable, w: torch.Tensor) -> float:
    """``||X (w - v)||^2 / ||X w||^2`` on the calibration inputs (from the Gram matrix)."""
    o = w.shape[0]
    a, d = p.weight.reshape(o, -1).double(), (p.weight - w).reshape(o, -1).double()
    sig = float(torch.einsum("ok,kl,ol->", a, p.h, a))
    return float(torch.einsum("ok,kl,ol->", d, p.h, d)) / max(sig, 1e-30)


def build_levels(p: Prunable, cfg, target) -> None:
    """Each level's mask, its output error (after the least-squares refit when the config
    refits) and its predicted latency."""
    dense_lat = predicted_latency(p.layer.node, target, 1.0, cfg.sparse_efficiency)
    p.levels = [Level(1.0, None, 0.0, dense_lat, "dense")]
    for density, mask, label in scheme_masks(p, cfg, share_of(p, cfg, target)):
        w = reconstruct(p.weight, mask, p.h) if cfg.reconstruct else p.weight * mask
        eff = cfg.shared_efficiency if layout.shared_rows(mask) >= 4 else cfg.sparse_efficiency
        lat = predicted_latency(p.layer.node, target, density, eff)
        p.levels.append(Level(float(mask.float().mean()), mask, output_error(p, w), lat, label))


def allocate(layers: list[Prunable], cfg) -> str:
    """Choose each layer's level; returns a note on the target and what was reached."""
    live = [p for p in layers if p.why_not is None and p.levels]
    weights = sum(p.weight.numel() for p in live) or 1
    lat0 = sum(p.levels[0].latency_s for p in layers if p.levels) or 1e-12

    def reached() -> bool:
        if cfg.latency is not None:
            lat = sum(p.levels[p.choice].latency_s for p in layers if p.levels)
            return lat <= cfg.latency * lat0
        removed = sum(p.weight.numel() * (1 - p.levels[p.choice].density) for p in live)
        return removed / weights >= cfg.target_sparsity

    while not reached():
        best = None
        for p in live:
            cur = p.levels[p.choice]
            for i in range(p.choice + 1, len(p.levels)):  # next level that saves time
                nxt = p.levels[i]
                if nxt.error > 10 ** (-cfg.min_sqnr_db / 10):
                    break  # denser levels only from here: this one loses too much
                gain = cur.latency_s - nxt.latency_s if cfg.use_cost_model else \
                    p.weight.numel() * (cur.density - nxt.density)
                if gain > 0:
                    score = gain / (nxt.error - cur.error + 1e-6)
                    if best is None or score > best[0]:
                        best = (score, p, i)
                    break
        if best is None:
            break
        best[1].choice = best[2]
    lat = sum(p.levels[p.choice].latency_s for p in layers if p.levels)
    removed = sum(p.weight.numel() * (1 - p.levels[p.choice].density) for p in live)
    goal = (f"latency {cfg.latency:.0%} of dense" if cfg.latency is not None
            else f"sparsity {cfg.target_sparsity:.0%}")
    return (f"target {goal}: predicted layer latency {lat / lat0:.0%} of dense, "
            f"{removed / weights:.0%} of prunable weights removed"
            + ("" if reached() else " (target not reachable: no further level pays or keeps "
                                    f"the layer SQNR >= {cfg.min_sqnr_db:g} dB)"))
