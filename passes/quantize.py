"""quantize: post-training int8 quantization (or simulated fp8 weights) from calibration data.

Lossy; runs after ``fuse`` (BatchNorm folded, linear weights folded to constants) on the canonical
ATen graph, before lowering. Needs calibration batches (``calibration=[...]``).

Steps, each a plain function:
1. find the layers: ``convolution`` (2-D, constant weight) and ``addmm`` / ``mm`` with a constant
   weight, each with the ``relu`` that follows it when that relu is its only user;
2. calibrate: run the graph on the calibration batches (an ``fx.Interpreter``) and let one
   observer (min-max / percentile / MSE) per activation see every layer's input and output;
3. decide per layer: int8 unless the config skips it, the target has no int8 or its cost model
   predicts no gain, the layer is a depthwise conv (off by default), or the layer's output SQNR
   on the calibration data is below ``min_sqnr_db``. The decision and its reason go into
   ``node.meta["hwopt_quant"]`` and the pass notes;
4. rewrite each int8 layer into the quantized-graph contract (``torch.ops.quantized_decomposed``
   Q/DQ around the unchanged fp32 op; per-tensor affine activations, per-channel symmetric
   weights), which eager PyTorch runs as fake quantization and ``hwopt.lowering.qdq`` lowers to
   integer kernels. With ``weight_dtype="fp8_*"`` weights are rounded through float8 instead
   (simulated: the graph stays fp32), activations stay fp32.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from hwopt.errors import OptionError, PassError
from hwopt.graph import add_constant, constant_value, is_constant, remove_unused_constants
from hwopt.pass_base import Pass, PassContext, PassResult, register_pass
from hwopt.quant import (
    FP8_DTYPES,
    OBSERVERS,
    QMAX,
    QMIN,
    WMAX,
    fake_quant_per_tensor,
    fake_quant_weight,
    fp8_round_trip,
    make_observer,
    quantize_weight_per_channel,
    sqnr,
)

log = logging.getLogger("hwopt")
aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
WEIGHT_DTYPES = ("int8", *FP8_DTYPES)
_SQNR_BATCHES = 4  # calibration batches kept per layer to measure its SQNR


@dataclass(frozen=True)
class QuantizeConfig:
    observer: str = "minmax"  # "minmax" | "percentile" | "mse": how activation ranges are chosen
    weight_dtype: str = "int8"  # "int8" | "fp8_e4m3" | "fp8_e5m2" (fp8: weight-only, simulated)
    min_sqnr_db: float = 20.0  # a layer whose output SQNR is lower stays fp32
    skip: tuple[str, ...] = ()  # node names, module paths (substring) or kinds ("conv", "linear")
    percentile: float = 99.99  # for observer="percentile"
    depthwise: bool = False  # quantize depthwise/grouped convs too
    use_cost_model: bool = True  # keep a layer fp32 when the target's cost model predicts no gain
    attention: bool = True  # fused attention on int8 q/k/v -> integer matmuls (qattention)
    min_gain: float = 0.1  # ... i.e. int8 is not predicted at least this fraction faster

    def __post_init__(self):
        if self.observer not in OBSERVERS:
            raise OptionError(f"quantize: observer must be one of {', '.join(OBSERVERS)}, got "
                              f"{self.observer!r}")
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise OptionError(f"quantize: weight_dtype must be one of {', '.join(WEIGHT_DTYPES)},"
                              f" got {self.weight_dtype!r}")
        if isinstance(self.skip, str) or not all(isinstance(s, str) for s in self.skip):
            raise OptionError("quantize: skip must be a list of node names, module paths or "
                              f"kinds, got {self.skip!r}")
        object.__setattr__(self, "skip", tuple(self.skip))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> QuantizeConfig:
        return cls(**json.loads(text))


@dataclass
class Layer:
    node: fx.Node  # convolution / addmm / mm
    kind: str  # "conv" | "linear"
    x: fx.Node  # activation input
    w: fx.Node  # constant weight (conv: [O, I, kh, kw]; linear: [K, N] as addmm reads it)
    out: fx.Node  # the node whose value is the layer's output (the relu when fused)
    path: str = ""


@register_pass("quantize", lossless=False, tolerance=0.1, after=("fuse",))
class Quantize(Pass):
    """Post-training quantization; config `QuantizeConfig` (``pass_config={"quantize": {}}``)."""

    def __init__(self, config: QuantizeConfig | None = None, **kwargs):
        self.config = config if config is not None else QuantizeConfig(**kwargs)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        batches = ctx.require_calibration("quantize")
        cfg = self.config
        layers = find_layers(gm)
        if not layers:
            return PassResult(gm, False, ["no conv/linear layer with constant weights"])
        stats = calibrate(gm, layers, batches, cfg)
        decisions = {id(L): decide(gm, L, stats, cfg, ctx.target) for L in layers}
        notes, changed = [], 0
        for L in layers:
            dec = decisions[id(L)]
            L.node.meta["hwopt_quant"] = dec
            notes.append(f"{L.node.name} ({L.kind}{', ' + L.path if L.path else ''}): "
                         f"{dec['dtype']} - {dec['reason']}")
            if dec["dtype"] == "int8":
                rewrite_int8(gm, L, stats)
                changed += 1
            elif dec["dtype"] in FP8_DTYPES:
                rewrite_fp8(gm, L, dec["dtype"])
                changed += 1
        if changed and cfg.attention:
            notes += quantize_attention(gm, cfg, batches, ctx.target)
        if changed:
            remove_unused_constants(gm)
            gm.recompile()
            notes.append(f"whole graph: SQNR {_graph_sqnr(gm, batches, stats):.1f} dB on the "
                         f"calibration data ({changed}/{len(layers)} layers quantized)")
        log.info("hwopt: quantize: %s", notes[-1])
        return PassResult(gm, changed > 0, notes)

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        for node in gm.graph.nodes:
            meta = node.meta.get("hwopt_quant")
            if not meta or meta["dtype"] != "int8":
                continue
            if node.target is torch.ops.hwopt.qattention.default:
                bad = [a for a in node.args[:3] if a.meta.get("val") is not None
                       and a.meta["val"].dtype != torch.int8]
                if bad:
                    raise PassError(f"quantize: int8 attention {node.name} reads non-int8 "
                                    f"{', '.join(a.name for a in bad)}")
                continue
            ins = [a for a in node.args[:3] if isinstance(a, fx.Node)]
            if not any(a.target is qd.dequantize_per_tensor.default for a in ins):
                raise PassError(f"quantize: int8 layer {node.name} ({node.target}) lost its "
                                "dequantized activation input")


# -- 1. layers ---------------------------------------------------------------------------------

def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def _as_layer(node: fx.Node) -> Layer | None:
    if node.op != "call_function":
        return None
    if node.target is aten.convolution.default:
        x, w = node.args[0], node.args[1]
        transposed = node.args[6] if len(node.args) > 6 else False
        if transposed or not is_constant(w) or len(w.meta["val"].shape) != 4 or (
                node.args[2] is not None and not is_constant(node.args[2])):
            return None
        kind = "conv"
    elif node.target is aten.addmm.default and not node.kwargs:
        if not is_constant(node.args[0]) or not is_constant(node.args[2]):
            return None
        x, w, kind = node.args[1], node.args[2], "linear"
    elif node.target is aten.mm.default:
        if not is_constant(node.args[1]) or is_constant(node.args[0]):
            return None
        x, w, kind = node.args[0], node.args[1], "linear"
    else:
        return None
    if not isinstance(x, fx.Node) or x.meta.get("val") is None or \
            x.meta["val"].dtype != torch.float32:
        return None
    users = list(node.users)
    out = users[0] if len(users) == 1 and users[0].target is aten.relu.default else node
    return Layer(node, kind, x, w, out, _module_path(node))


def find_layers(gm: fx.GraphModule) -> list[Layer]:
    if any(n.meta.get("val") is None for n in gm.graph.nodes if n.op != "output"):
        from hwopt.graph import propagate_meta

        propagate_meta(gm, _placeholder_values(gm))
    return [L for n in gm.graph.nodes if (L := _as_layer(n)) is not None]


def _placeholder_values(gm):
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    return [torch.zeros(v.shape, dtype=v.dtype) for v in vals]


# -- 2. calibration ----------------------------------------------------------------------------

@dataclass
class Stats:
    observers: dict  # fx.Node -> Observer (layer inputs and outputs)
    inputs: dict  # fx.Node (layer) -> list of its fp32 input tensors (first batches)
    outputs: list  # fp32 graph outputs per batch


class _Recorder(fx.Interpreter):
    def __init__(self, gm, stats: Stats, keep: dict):
        super().__init__(gm)
        self.stats, self.keep = stats, keep

    def run_node(self, n):
        value = super().run_node(n)
        if n in self.stats.observers and isinstance(value, torch.Tensor):
            self.stats.observers[n].update(value)
        for layer_node in self.keep.get(n, ()):
            kept = self.stats.inputs.setdefault(layer_node, [])
            if len(kept) < _SQNR_BATCHES:
                kept.append(value.detach())
        return value


def calibrate(gm: fx.GraphModule, layers: list[Layer], batches, cfg: QuantizeConfig) -> Stats:
    """Run the fp32 graph on every batch; observers see each layer's input and output."""
    stats = Stats({}, {}, [])
    keep: dict = {}
    for L in layers:
        for n in (L.x, L.out):
            stats.observers.setdefault(n, make_observer(cfg.observer, cfg.percentile))
        keep.setdefault(L.x, []).append(L.node)
    with torch.no_grad():
        for batch in batches:
            placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
            if len(batch) != len(placeholders):
                raise OptionError(f"quantize: a calibration batch has {len(batch)} tensor(s) but "
                                  f"the graph takes {len(placeholders)}; give calibration batches "
                                  "shaped like the example inputs")
            stats.outputs.append(_Recorder(gm, stats, keep).run(*batch))
    return stats


# -- 3. decisions ------------------------------------------------------------------------------

def _decision(dtype: str, reason: str, sqnr_db: float = math.nan) -> dict:
    return {"dtype": dtype, "reason": reason, "sqnr_db": sqnr_db}


def _skipped(L: Layer, skip: tuple[str, ...]) -> bool:
    return any(s in (L.node.name, L.kind) or (L.path and s in L.path) for s in skip)


EPILOGUE_OPS = 2  # per output: bias, activation
REQUANT_OPS = 12  # per output: int32 -> fp32, scales, round, zero point, clamp, -> int8 (Zen 4:
# the digits CNN's 1-channel first conv measured 18 us int8 vs 5 us fp32, its epilogue the bulk)


def _cost_gain(node: fx.Node, target) -> tuple[float, float] | None:
    """(fp32 latency, int8 latency) the target's cost model predicts, or None without one."""
    model = getattr(target, "cost_model", None)
    spec = getattr(target, "spec", None)
    if model is None or spec is None or not hasattr(model, "cost_of"):
        return None
    from hwopt.cost import node_bytes, node_flops, op_class

    flops, nbytes, cls = node_flops(node), node_bytes(node), op_class(node)
    out = node.meta.get("val")
    outputs = out.numel() if isinstance(out, torch.Tensor) else 0
    try:  # int8 operands move a quarter of the bytes; the compute runs at the int8 peak
        if "dtype" in inspect.signature(model.cost_of).parameters:
            fp32 = model.cost_of(flops, nbytes, cls, dtype="float32")
            int8 = model.cost_of(flops, nbytes / 4, cls, dtype="int8")
        else:
            fp32 = model.cost_of(flops, nbytes, cls)
            ratio = spec.peak_flops["float32"] / spec.peak_flops["int8"]
            int8 = model.cost_of(flops * ratio, nbytes / 4, cls)
        # The epilogue in the kernel's registers: bias + activation in fp32; in int8 also the
        # requantization of every output (to fp32, scale, round, clamp, to int8). With few
        # multiply-adds per output (a first conv on 1-3 channels) it decides.
        fp32_epi = model.cost_of(outputs * EPILOGUE_OPS, 0, "elementwise")
        int8_epi = model.cost_of(outputs * (EPILOGUE_OPS + REQUANT_OPS), 0, "elementwise")
        return (float(fp32.latency_s + fp32_epi.latency_s),
                float(int8.latency_s + int8_epi.latency_s))
    except Exception as e:  # noqa: BLE001 - a model that cannot answer does not block int8
        log.debug("hwopt: quantize: cost model failed on %s: %s", node.name, e)
        return None


def decide(gm, L: Layer, stats: Stats, cfg: QuantizeConfig, target) -> dict:
    """int8 / fp8 / fp32 for one layer, with the reason."""
    if _skipped(L, cfg.skip):
        return _decision("fp32", "skipped by QuantizeConfig.skip")
    if L.kind == "conv" and (L.node.args[8] if len(L.node.args) > 8 else 1) > 1 \
            and not cfg.depthwise:
        return _decision("fp32", "grouped/depthwise conv: kept fp32 (QuantizeConfig.depthwise="
                         "False; memory-bound, little int8 gain)")
    if cfg.weight_dtype in FP8_DTYPES:
        db = _layer_sqnr(gm, L, stats, cfg.weight_dtype)
        if db < cfg.min_sqnr_db:
            return _decision("fp32", f"SQNR {db:.1f} dB < min_sqnr_db {cfg.min_sqnr_db}", db)
        have = " ".join(getattr(getattr(target, "spec", None), "dtypes", ()))
        why = "no fp8 kernels yet" if ("fp8" in have or "float8" in have) else "target has no fp8"
        return _decision(cfg.weight_dtype, f"fp8 weights simulated in fp32 ({why})", db)
    spec = getattr(target, "spec", None)
    if spec is not None and ("int8" not in spec.dtypes or "int8" not in spec.peak_flops):
        return _decision("fp32", f"target {target.name} has no int8 compute")
    if cfg.use_cost_model and target is not None:
        gain = _cost_gain(L.node, target)
        if gain is not None and gain[1] > gain[0] * (1 - cfg.min_gain):
            return _decision("fp32", f"cost model of {target.name} predicts no gain "
                             f"({gain[0] * 1e6:.2f} us fp32 vs {gain[1] * 1e6:.2f} us int8, "
                             f"min_gain {cfg.min_gain:.0%})")
    db = _layer_sqnr(gm, L, stats, "int8")
    if db < cfg.min_sqnr_db:
        return _decision("fp32", f"SQNR {db:.1f} dB < min_sqnr_db {cfg.min_sqnr_db}", db)
    return _decision("int8", f"SQNR {db:.1f} dB", db)


def _run_layer(gm, L: Layer, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    def sub(a):
        if a is L.x:
            return x
        if a is L.w:
            return w
        return constant_value(gm, a)

    args = fx.node.map_arg(L.node.args, sub)
    y = L.node.target(*args, **L.node.kwargs)
    return torch.relu(y) if L.out is not L.node else y


def _layer_sqnr(gm, L: Layer, stats: Stats, dtype: str) -> float:
    """SQNR of the layer's output (incl. its own output quantization) on the calibration data."""
    w = constant_value(gm, L.w)
    axis = 0 if L.kind == "conv" else 1
    with torch.no_grad():
        if dtype == "int8":
            wq = fake_quant_weight(w, axis)
            xs, os_ = stats.observers[L.x].qparams(), stats.observers[L.out].qparams()
        else:
            wq = fp8_round_trip(w, dtype, axis)
        refs, tests = [], []
        for x in stats.inputs.get(L.node, []):
            refs.append(_run_layer(gm, L, x, w).flatten())
            if dtype == "int8":
                y = _run_layer(gm, L, fake_quant_per_tensor(x, *xs), wq)
                tests.append(fake_quant_per_tensor(y, *os_).flatten())
            else:
                tests.append(_run_layer(gm, L, x, wq).flatten())
    if not refs:
        return math.inf
    return sqnr(torch.cat(refs), torch.cat(tests))


# -- 4. rewrites -------------------------------------------------------------------------------

def _qdq_after(gm, node: fx.Node, scale: float, zp: int) -> tuple[fx.Node, fx.Node]:
    where = node
    if node.op == "placeholder":  # keep the placeholders together at the top
        where = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(where):
        q = gm.graph.call_function(qd.quantize_per_tensor.default,
                                   (node, scale, zp, QMIN, QMAX, torch.int8))
    with gm.graph.inserting_after(q):
        dq = gm.graph.call_function(qd.dequantize_per_tensor.default,
                                    (q, scale, zp, QMIN, QMAX, torch.int8))
    return q, dq


def _input_dq(gm, L: Layer, stats: Stats) -> fx.Node:
    """The dequantized activation the layer reads: its producer's DQ when there is one."""
    if L.x.target is qd.dequantize_per_tensor.default:
        return L.x
    existing = [u for u in L.x.users if u.target is qd.quantize_per_tensor.default]
    if existing:
        return next(iter(existing[0].users))
    pooled = _pooled_dq(L.x)
    qparams = tuple(pooled.args[1:3]) if pooled is not None else stats.observers[L.x].qparams()
    _, dq = _qdq_after(gm, L.x, *qparams)
    return dq


_MAX_POOLS = (aten.max_pool2d.default, aten.max_pool2d_with_indices.default)


def _pooled_dq(x: fx.Node) -> fx.Node | None:
    """The DQ that max pool `x` reads (an int8 layer's output), else None. The pool's output
    keeps that DQ's qparams: its int8 values then pass through unchanged, and the lowering
    pools int8 values instead of dequantizing, pooling fp32 and quantizing again."""
    node = x
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _MAX_POOLS):
        return None
    src = node.args[0]
    return src if src.target is qd.dequantize_per_tensor.default else None


def rewrite_int8(gm: fx.GraphModule, L: Layer, stats: Stats) -> None:
    """convolution / addmm / mm -> the contract's DQ(act), DQ(weight) -> op [-> relu] -> Q -> DQ."""
    x_dq = _input_dq(gm, L, stats)
    w = constant_value(gm, L.w)
    w_oc = w if L.kind == "conv" else w.t().contiguous()  # [out, ...]: per-channel axis 0
    w_q, scales = quantize_weight_per_channel(w_oc, 0, WMAX)
    cw = add_constant(gm, w_q, L.node, "w_q")
    cs = add_constant(gm, scales, L.node, "w_scale")
    cz = add_constant(gm, torch.zeros(scales.numel(), dtype=torch.int64), L.node, "w_zp")
    with gm.graph.inserting_before(L.node):
        w_dq = gm.graph.call_function(qd.dequantize_per_channel.default,
                                      (cw, cs, cz, 0, -WMAX, WMAX, torch.int8))
        if L.kind == "linear":
            w_dq = gm.graph.call_function(aten.permute.default, (w_dq, [1, 0]))
    x_pos = 1 if L.node.target is aten.addmm.default else 0
    w_pos = 2 if L.node.target is aten.addmm.default else 1
    args = list(L.node.args)
    args[x_pos], args[w_pos] = x_dq, w_dq
    L.node.args = tuple(args)
    q, dq = _qdq_after(gm, L.out, *stats.observers[L.out].qparams())
    L.out.replace_all_uses_with(dq, delete_user_cb=lambda u: u is not q)


def rewrite_fp8(gm: fx.GraphModule, L: Layer, dtype: str) -> None:
    """Weights rounded through float8 (per-channel scale) and stored back as fp32."""
    w = constant_value(gm, L.w)
    new = add_constant(gm, fp8_round_trip(w, dtype, 0 if L.kind == "conv" else 1), L.node,
                       "w_" + dtype)
    L.node.replace_input_with(L.w, new)


def quantize_attention(gm: fx.GraphModule, cfg: QuantizeConfig, batches, target) -> list[str]:
    """Step 5: int8 attention where its inputs are int8 and it pays; notes per attention."""
    from . import quantize_attention as qa

    found = qa.candidates(gm)
    if not found:
        return []
    spec = getattr(target, "spec", None)
    db = qa.attention_sqnr(gm, found, batches)
    notes = []
    for node, srcs in found:
        name = node.name
        gain = _cost_gain(node, target) if cfg.use_cost_model and target is not None else None
        if spec is not None and ("int8" not in spec.dtypes or "int8" not in spec.peak_flops):
            why = f"fp32 - target {target.name} has no int8 compute"
        elif gain is not None and gain[1] > gain[0] * (1 - cfg.min_gain):
            why = (f"fp32 - cost model of {target.name} predicts no gain ({gain[0] * 1e6:.2f} us "
                   f"fp32 vs {gain[1] * 1e6:.2f} us int8)")
        elif db[node] < cfg.min_sqnr_db:
            why = f"fp32 - SQNR {db[node]:.1f} dB < min_sqnr_db {cfg.min_sqnr_db}"
        else:
            new = qa.rewrite(gm, node, srcs)
            new.meta["hwopt_quant"] = _decision("int8", f"SQNR {db[node]:.1f} dB", db[node])
            why = f"int8 - SQNR {db[node]:.1f} dB"
        notes.append(f"{name} (attention): {why}")
    gm.graph.eliminate_dead_code()
    return notes


def _graph_sqnr(gm, batches, stats: Stats) -> float:
    from hwopt.bench import first_tensor

    refs, tests = [], []
    with torch.no_grad():
        for batch, ref in list(zip(batches, stats.outputs))[:_SQNR_BATCHES]:
            refs.append(first_tensor(ref).flatten())
            tests.append(first_tensor(gm(*batch)).flatten())
    return sqnr(torch.cat(refs), torch.cat(tests))
