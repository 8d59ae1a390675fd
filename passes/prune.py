"""prune: structured pruning at compile time, refitted without retraining, compiled sparsely.

Lossy; runs after ``fuse`` (BatchNorm folded into conv weights, linear weights constant) and
before ``quantize`` and lowering. Needs calibration batches (``calibration=[...]``).

Schemes (``PruneConfig.scheme``; `hwopt.sparse.masks`):
- ``"pattern"``: 3x3 convs; each kernel keeps one of a library of ``patterns`` 4-entry patterns
  (centre + 3) chosen from the weight distribution, plus connectivity pruning (whole kernels);
- ``"block_punched"``: the same positions pruned across blocks of filters x columns (convs of any
  kernel size and linear layers);
- ``"nm"``: N:M (2:4, 4:8, ...) on linear layers; ``"block"``: whole blocks of linear layers;
- ``"detect"``: no new pruning: layers already pruned (zeros in the weights) are compiled sparsely.

Steps (`passes.prune_plan` holds 1-4):
1. layers and why a scheme does not apply to one (it stays dense; the note says why);
2. the Gram matrix of each layer's inputs on the calibration data;
3. per layer the densities the scheme offers, their error proxy and predicted latency;
4. per-layer density from the target's cost model to meet ``sparsity`` or ``latency``;
5. kept weights refitted by least squares (`hwopt.sparse.reconstruct`), SQNR per layer;
6. each pruned layer rewritten into ``hwopt::sparse_conv2d`` / ``hwopt::sparse_linear`` with
   compact weights (`hwopt.sparse.layout`), which ``hwopt.lowering.sparse`` lowers to the sparse
   TVM kernel. `export_masks` gives the masks back (for fine-tuning elsewhere).

Masks are shared by blocks of ``share`` consecutive filters (default: the target's vector width):
each block keeps the same entries, so the kernel (``hwopt.lowering.sparse_block``) vectorizes over
the block's filters like a dense conv and its time falls with the density; ``share=1`` gives
one mask per filter (per-kernel patterns), compiled to a slower gather kernel.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass

import torch
import torch.fx as fx

import hwopt.sparse.ops  # noqa: F401  (registers torch.ops.hwopt.sparse_*)
from hwopt.errors import OptionError, PassError
from hwopt.graph import add_constant, constant_value, remove_unused_constants
from hwopt.pass_base import Pass, PassContext, PassResult, register_pass
from hwopt.quant import sqnr
from hwopt.sparse import layout, masks
from hwopt.sparse.reconstruct import gram, reconstruct

from . import prune_plan as plan

log = logging.getLogger("hwopt")
aten = torch.ops.aten
SPARSE_OPS = ("sparse_conv2d", "sparse_linear")
_DEFAULT_SPARSITY = {"pattern": 0.75, "block_punched": 0.5, "block": 0.5}


@dataclass(frozen=True)
class PruneConfig:
    scheme: str = "pattern"  # "pattern" | "block_punched" | "nm" | "block" | "detect"
    sparsity: float | None = None  # fraction of prunable weights removed (default per scheme)
    latency: float | None = None  # or: predicted latency of the layers, fraction of dense
    patterns: int = 8  # size of the kernel-pattern library
    nm: tuple[int, int] = (2, 4)
    # Consecutive filters (output rows) that share their mask: 0 = the target's vector width
    # (the kernel then vectorizes over them and runs at the dense FLOP rate); 1 = one mask per
    # filter (PatDNN's per-kernel patterns; a slower gather kernel).
    share: int = 0
    nm_rows: int = 0  # rows sharing one N:M choice; 0 = `share`
    block: tuple[int, int] = (0, 16)  # (filters, columns) per block; 0 filters = `share`
    reconstruct: bool = True  # refit kept weights by least squares on the calibration data
    use_cost_model: bool = True  # False: prune to the target even where no gain is predicted
    min_sqnr_db: float = 8.0  # no layer pruned below this output SQNR (after the refit)
    sparse_efficiency: float = 0.45  # per-row sparse kernel FLOP rate / dense (measured)
    shared_efficiency: float = 0.9  # ... when blocks of rows share their entries
    skip: tuple[str, ...] = ()  # node names, module paths (substring) or kinds ("conv", "linear")

    def __post_init__(self):
        if self.scheme not in (*masks.SCHEMES, "detect"):
            raise OptionError(f"prune: scheme must be one of {', '.join(masks.SCHEMES)}, detect;"
                              f" got {self.scheme!r}")
        for name in ("sparsity", "latency"):
            v = getattr(self, name)
            if v is not None and not 0 < v < 1:
                raise OptionError(f"prune: {name} must be in (0, 1), got {v!r}")
        if self.sparsity is not None and self.latency is not None:
            raise OptionError("prune: give sparsity or latency, not both")
        nm = tuple(int(v) for v in self.nm)
        if len(nm) != 2 or not 0 < nm[0] < nm[1]:
            raise OptionError(f"prune: nm must be (N, M) with 0 < N < M, got {self.nm!r}")
        if isinstance(self.skip, str):
            raise OptionError(f"prune: skip must be a list of names, got {self.skip!r}")
        if self.share < 0 or self.nm_rows < 0:
            raise OptionError(f"prune: share and nm_rows must be >= 0 (0 = automatic), got "
                              f"share={self.share!r}, nm_rows={self.nm_rows!r}")
        object.__setattr__(self, "nm", nm)
        object.__setattr__(self, "block", tuple(int(v) for v in self.block))
        object.__setattr__(self, "skip", tuple(self.skip))

    @property
    def target_sparsity(self) -> float:
        if self.sparsity is not None:
            return self.sparsity
        if self.scheme == "nm":
            return 1 - self.nm[0] / self.nm[1]
        return _DEFAULT_SPARSITY.get(self.scheme, 0.5)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PruneConfig:
        return cls(**json.loads(text))


@register_pass("prune", lossless=False, tolerance=0.3, after=("fuse",), before=("quantize",))
class Prune(Pass):
    """Structured pruning; config `PruneConfig` (``pass_config={"prune": {...}}``)."""

    def __init__(self, config: PruneConfig | None = None, **kwargs):
        self.config = config if config is not None else PruneConfig(**kwargs)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        cfg = self.config
        if cfg.scheme == "detect":
            return detect_and_rewrite(gm)
        batches = ctx.require_calibration("prune")
        layers = plan.find_prunable(gm, cfg.scheme, cfg.nm, cfg.skip)
        if not layers:
            return PassResult(gm, False, ["no conv/linear layer with constant weights"])
        plan.gather_stats(gm, layers, batches)
        for p in layers:
            if p.why_not is None:
                plan.build_levels(p, cfg, ctx.target)
        notes = [plan.allocate(layers, cfg)]
        dense = copy.deepcopy(gm)  # sequential refit: targets are the dense model's outputs
        inputs = {id(p): p.layer.x.name for p in layers}
        changed = 0
        for p in layers:
            old = p.layer.node
            notes.append(self._apply(gm, p, dense, inputs[id(p)], batches))
            if p.choice > 0:
                changed += 1
                new = next(n for n in gm.graph.nodes if n.meta.get("hwopt_prune_of") == old.name)
                for q in layers:  # a later layer reading this one's output reads the new node
                    if q.layer.x is old:
                        q.layer.x = new
        if changed:
            remove_unused_constants(gm)
            gm.recompile()
        log.info("hwopt: prune: %s", notes[0])
        return PassResult(gm, changed > 0, notes)

    def _apply(self, gm: fx.GraphModule, p: plan.Prunable, dense: fx.GraphModule,
               dense_input: str, batches) -> str:
        head = f"{p.name} ({p.layer.kind} {tuple(p.weight.shape)}{', ' + p.path if p.path else ''})"
        if p.why_not is not None:
            return f"{head}: dense - {p.why_not}"
        if p.choice == 0:
            why = "the cost model predicts no gain" if self.config.use_cost_model else \
                "not needed to reach the target"
            return f"{head}: dense - {why} (PruneConfig.use_cost_model=False prunes anyway)"
        lvl = p.levels[p.choice]
        rows = plan.layer_rows(gm, p, p.layer.x.name, batches)  # inputs after earlier pruning
        ref = plan.layer_rows(dense, p, dense_input, batches)
        w, bias = p.weight * lvl.mask, None
        if self.config.reconstruct:
            w = reconstruct(p.weight, lvl.mask, gram(rows), rows.double().t() @ ref.double())
            bias = _bias_correction(gm, p, w, rows, ref)
        db = _layer_sqnr(p, w, rows, ref, bias)
        rewrite(gm, p.layer, w, lvl.mask, {"scheme": self.config.scheme, "label": lvl.label,
                                          "density": lvl.density, "sqnr_db": db}, bias)
        return (f"{head}: {lvl.label}, density {lvl.density:.1%}, SQNR {db:.1f} dB on the "
                f"calibration data, predicted {lvl.latency_s * 1e6:.1f} us (dense "
                f"{p.levels[0].latency_s * 1e6:.1f} us)")

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        for node in gm.graph.nodes:
            if _is_sparse(node) and node.meta.get("hwopt_prune") is None:
                raise PassError(f"prune: sparse layer {node.name} lost its pruning record")


def _is_sparse(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "namespace", "") == "hwopt" \
        and node.target.__name__.split(".")[0] in SPARSE_OPS


def _old_bias(gm: fx.GraphModule, p: plan.Prunable) -> torch.Tensor:
    node = p.layer.node
    b = node.args[2] if p.layer.kind == "conv" else (
        node.args[0] if node.target is aten.addmm.default else None)
    return constant_value(gm, b).float() if b is not None else torch.zeros(p.weight.shape[0])


def _bias_correction(gm, p: plan.Prunable, w: torch.Tensor, rows, ref) -> torch.Tensor:
    """The bias that restores the mean of each output over the calibration data."""
    o = w.shape[0]
    shift = ref.mean(0) @ p.weight.reshape(o, -1).t() - rows.mean(0) @ w.reshape(o, -1).t()
    return _old_bias(gm, p) + shift


def _layer_sqnr(p: plan.Prunable, w, rows, ref, bias) -> float:
    """SQNR of the pruned layer's output (on the pruned model's inputs) vs the dense model's."""
    o = w.shape[0]
    want = ref @ p.weight.reshape(o, -1).t()
    got = rows @ w.reshape(o, -1).t()
    if bias is not None:
        got = got + (bias - _old_bias(p.layer.node.graph.owning_module, p))
    return sqnr(want.flatten(), got.flatten())


# -- rewrite -----------------------------------------------------------------------------------

def rewrite(gm: fx.GraphModule, L, w: torch.Tensor, mask: torch.Tensor | None, record: dict,
            new_bias: torch.Tensor | None = None):
    """Replace a conv / addmm / mm by the sparse op over the compact form of ``w`` (``mask``:
    the kept entries; None = the nonzeros of ``w``), with ``new_bias`` when given."""
    c = layout.compact(w, mask)
    node = L.node
    cw = add_constant(gm, c.w, node, "sp_w")
    cc = add_constant(gm, c.chan, node, "sp_chan")
    nb = add_constant(gm, new_bias.float().contiguous(), node, "sp_b") \
        if new_bias is not None else None
    if L.kind == "conv":
        bias = nb if nb is not None else node.args[2]
        stride, padding, dilation, _ = plan.conv_params(node)
        ct = add_constant(gm, c.tap, node, "sp_tap")
        args = (L.x, cw, cc, ct, bias, list(w.shape[2:]), stride, padding, dilation)
        op = torch.ops.hwopt.sparse_conv2d.default
    else:
        bias = node.args[0] if node.target is aten.addmm.default else None
        bias = nb if nb is not None else bias
        args, op = (L.x, cw, cc, bias), torch.ops.hwopt.sparse_linear.default
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(op, args)
    new.meta = dict(node.meta)
    new.meta["hwopt_prune_of"] = node.name
    record = dict(record, mask=(mask if mask is not None else w != 0).bool(),
                  shape=tuple(w.shape), path=L.path)
    new.meta["hwopt_prune"] = record
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def detect_and_rewrite(gm: fx.GraphModule) -> PassResult:
    """scheme="detect": compile already-pruned layers sparsely, changing no value."""
    notes, changed = [], 0
    for p in plan.find_prunable(gm, "detect", (2, 4), ()):
        head = f"{p.name} ({p.layer.kind} {tuple(p.weight.shape)})"
        found = layout.detect(p.weight) if p.why_not is None else None
        if found is None:
            notes.append(f"{head}: dense - {p.why_not or 'fewer than 30% zeros'}")
            continue
        density = float((p.weight != 0).float().mean())
        rewrite(gm, p.layer, p.weight, None, {"scheme": f"detected {found}", "label": found,
                                               "density": density, "sqnr_db": float("inf")})
        notes.append(f"{head}: detected {found}, density {density:.1%}: compiled sparsely")
        changed += 1
    if changed:
        remove_unused_constants(gm)
        gm.recompile()
    return PassResult(gm, changed > 0, notes or ["no conv/linear layer with constant weights"])


def export_masks(graph) -> dict[str, torch.Tensor]:
    """Masks of the pruned layers (True = kept), by module path (node name when unknown).

    ``graph``: an Artifact from ``hwopt.compile`` or the GraphModule the pass rewrote. Each
    mask has the shape of the layer's weight as PyTorch stores it (``[out, in, kh, kw]``,
    ``[out, in]``), ready for ``torch.nn.utils.prune.custom_from_mask``.
    """
    gm = getattr(getattr(graph, "compiled", None), "graph", graph)
    if not isinstance(gm, fx.GraphModule):
        raise OptionError(f"export_masks takes an Artifact or a GraphModule, got "
                          f"{type(graph).__name__}")
    out = {}
    for node in gm.graph.nodes:
        rec = node.meta.get("hwopt_prune") if _is_sparse(node) else None
        if rec is not None:
            out[rec.get("path") or node.name] = rec["mask"].reshape(rec["shape"]).clone()
    return out


def sparse_weights(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The dense weight ``[out, ...]`` a sparse op node computes with (for checks)."""
    w, chan = constant_value(gm, node.args[1]), constant_value(gm, node.args[2])
    tap = constant_value(gm, node.args[3]) if len(node.args) > 4 else torch.zeros_like(chan)
    c = layout.Compact(w, chan, tap, w.shape[0] // chan.shape[0])
    return layout.expand(c, node.meta["hwopt_prune"]["shape"])
