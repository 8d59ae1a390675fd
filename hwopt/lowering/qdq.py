"""Quantized graphs into TVM as integer kernels (lower step, per region, before Relax import).

Input: a region of the ATen graph in the quantized-graph contract that the ``quantize`` pass emits
(``torch.ops.quantized_decomposed`` Q/DQ around fp32 conv / addmm / mm). Two steps:

1. `fuse_int8_layers` (FX): each ``DQ(act), DQ(weight) -> conv|addmm|mm (+bias) [-> relu] -> Q``
   becomes one ``hwopt::qconv2d`` / ``hwopt::qlinear`` op: int8 activation in, int8 weights,
   int8 out. Their PyTorch implementation is the fake-quant reference (the same ops), so the
   rewrite changes no value in eager mode.
2. `CONVERTERS` (Relax, ``custom_convert_map`` of ``from_exported_program``): the layer ops become
   integer arithmetic: ``int16(x_q) - x_zp`` (exact; padding with 0 is then the real 0) times the
   int16-widened int8 weights in a conv2d / matmul with ``out_dtype="int32"``, then the
   requantize epilogue (``acc * (s_x * s_w[c]) + bias``, relu, ``round(* 1/s_y) + y_zp``, clip,
   int8) which FuseOps/FuseTIR fuse into the integer kernel. Leftover Q/DQ ops become elementwise
   Relax ops. The schedule rules in ``hwopt.schedules.int8`` map the int16 dot products onto
   AVX2 ``vpmaddwd`` (16 MACs per instruction; no saturation, unlike ``vpmaddubsw``). On CPUs
   with AVX-512 VNNI (``converters("vnni")``) activations become uint8 (``x + 128``) against
   int8 weights, the zero point is taken out by a per-channel constant, and the rules map the
   dot products onto ``vpdpbusd`` (64 MACs per instruction, accumulating in place).

The integer result equals the fake-quant reference up to 1 LSB of the output scale (the fp32
reference sums its products with rounding; the integer kernel sums exactly): `max_output_lsb`
gives the bound the numerical check of a region uses.
"""
from __future__ import annotations

import operator

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)
import torch.fx as fx

from hwopt.graph import constant_value, is_constant

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
QMIN, QMAX = -128, 127


def _requant(y, relu: bool, y_scale: float, y_zp: int) -> torch.Tensor:
    y = torch.relu(y) if relu else y
    return qd.quantize_per_tensor.default(y, y_scale, y_zp, QMIN, QMAX, torch.int8)


def _dq_x(x, x_scale, x_zp):
    return qd.dequantize_per_tensor.default(x, x_scale, x_zp, QMIN, QMAX, torch.int8)


def _dq_w(w, w_scale):
    zeros = torch.zeros(w_scale.numel(), dtype=torch.int64)
    return qd.dequantize_per_channel.default(w, w_scale, zeros, 0, -127, 127, torch.int8)


@torch.library.custom_op("hwopt::qconv2d", mutates_args=())
def qconv2d(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, w_scale: torch.Tensor,
            x_scale: float, x_zp: int, y_scale: float, y_zp: int, stride: list[int],
            padding: list[int], dilation: list[int], groups: int, relu: bool) -> torch.Tensor:
    """int8 NCHW conv2d with per-channel int8 weights; the fake-quant reference computation."""
    y = aten.convolution.default(_dq_x(x, x_scale, x_zp), _dq_w(w, w_scale), bias, stride,
                                 padding, dilation, False, [0, 0], groups)
    return _requant(y, relu, y_scale, y_zp)


@qconv2d.register_fake
def _(x, w, bias, w_scale, x_scale, x_zp, y_scale, y_zp, stride, padding, dilation, groups,
      relu):
    y = aten.convolution.default(x.float(), w.float(), None, stride, padding, dilation, False,
                                 [0, 0], groups)
    return y.to(torch.int8)


@torch.library.custom_op("hwopt::qlinear", mutates_args=())
def qlinear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, w_scale: torch.Tensor,
            x_scale: float, x_zp: int, y_scale: float, y_zp: int, relu: bool) -> torch.Tensor:
    """int8 [M, K] x int8 weights [N, K]^T; the fake-quant reference computation."""
    xf, wf = _dq_x(x, x_scale, x_zp), _dq_w(w, w_scale).permute(1, 0)
    y = aten.addmm.default(bias, xf, wf) if bias is not None else aten.mm.default(xf, wf)
    return _requant(y, relu, y_scale, y_zp)


@qlinear.register_fake
def _(x, w, bias, w_scale, x_scale, x_zp, y_scale, y_zp, relu):
    return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.int8)


# -- 1. FX: contract pattern -> hwopt::qconv2d / hwopt::qlinear ---------------------------------

def _is(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def per_tensor_int8(node, op) -> bool:
    """`node` is `op` (quantize / dequantize_per_tensor) with int8 range and constant qparams."""
    return _is(node, op) and tuple(node.args[3:6]) == (QMIN, QMAX, torch.int8) and \
        all(isinstance(a, (int, float)) for a in node.args[1:3]) and \
        not node.kwargs.get("out_dtype")


def _act(node):
    """(q, scale, zero_point) of ``DQ(q)`` for an int8 per-tensor activation, else None."""
    if not _is(node, qd.dequantize_per_tensor.default):
        return None
    q, scale, zp, lo, hi, dtype = node.args[:6]
    if (lo, hi, dtype) != (QMIN, QMAX, torch.int8) or node.kwargs.get("out_dtype"):
        return None
    return q, scale, zp


def _weight(gm, node, transposed: bool):
    """(w_q const, scales const) of a per-channel symmetric DQ (through permute for linear)."""
    if transposed:
        if not _is(node, aten.permute.default) or list(node.args[1]) != [1, 0]:
            return None
        node = node.args[0]
    if not _is(node, qd.dequantize_per_channel.default):
        return None
    w, s, z, axis, lo, hi, dtype = node.args[:7]
    if not (is_constant(w) and is_constant(s) and (z is None or is_constant(z))) or axis != 0 \
            or dtype != torch.int8 or node.kwargs.get("out_dtype") or lo < -127:
        return None
    if z is not None and bool(constant_value(gm, z).any()):
        return None  # symmetric weights only
    return w, s


def _output(node: fx.Node):
    """(last float node, relu?, Q node) after a layer op, or None."""
    users = list(node.users)
    relu = len(users) == 1 and _is(users[0], aten.relu.default)
    last = users[0] if relu else node
    users = list(last.users)
    if len(users) != 1 or not _is(users[0], qd.quantize_per_tensor.default):
        return None
    q = users[0]
    if tuple(q.args[3:6]) != (QMIN, QMAX, torch.int8):
        return None
    return last, relu, q


def _match(gm, node: fx.Node):
    if _is(node, aten.convolution.default):
        x, w, b, stride, padding, dilation, transposed, _, groups = node.args[:9]
        if transposed or len(stride) != 2:
            return None
        extra = (list(stride), list(padding), list(dilation), int(groups))
        op, wt = torch.ops.hwopt.qconv2d.default, False
    elif _is(node, aten.addmm.default) and not node.kwargs:
        b, x, w = node.args[:3]
        op, wt, extra = torch.ops.hwopt.qlinear.default, True, ()
    elif _is(node, aten.mm.default):
        (x, w), b = node.args[:2], None
        op, wt, extra = torch.ops.hwopt.qlinear.default, True, ()
    else:
        return None
    act, weight, out = _act(x), _weight(gm, w, wt), _output(node)
    if act is None or weight is None or out is None or (b is not None and not is_constant(b)):
        return None
    return op, act, weight, b, out, extra


# Ops that move elements without changing them: Q(view(DQ(q))) with equal qparams is view(q).
_MOVES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default,
          aten.permute.default, aten.clone.default, aten.squeeze.dim, aten.unsqueeze.default,
          aten.flatten.using_ints, aten.transpose.int, aten.select.int, aten.slice.Tensor,
          # order-preserving: the max of int8 values is the int8 of the max (same qparams)
          aten.max_pool2d.default, aten.max_pool2d_with_indices.default}


def _moves(node) -> bool:
    """Whether `node` only moves (or max-pools) its first input's elements; for
    max_pool2d_with_indices, only through the getitem of its values."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and len(node.users) == 1):
        return False
    if node.target is operator.getitem:
        src = node.args[0]
        return node.args[1] == 0 and _is(src, aten.max_pool2d_with_indices.default)
    return node.target in _MOVES and (node.target is not aten.max_pool2d_with_indices.default
                                      or next(iter(node.users)).target is operator.getitem)


def fold_requantize(gm: fx.GraphModule) -> int:
    """``Q(moves(DQ(q)))`` with the same scale and zero point -> ``moves(q)`` on int8 values."""
    count = 0
    for q in list(gm.graph.nodes):
        if not _is(q, qd.quantize_per_tensor.default):
            continue
        chain, node = [], q.args[0]
        while _moves(node):
            chain.append(node)
            node = node.args[0]
        if not chain or not _is(node, qd.dequantize_per_tensor.default) or \
                tuple(node.args[1:6]) != tuple(q.args[1:6]):
            continue
        src = node.args[0]
        with gm.graph.inserting_before(q):
            for op in reversed(chain):
                src = gm.graph.call_function(op.target, (src, *op.args[1:]), dict(op.kwargs))
        q.replace_all_uses_with(src)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
    return count


def fuse_int8_layers(gm: fx.GraphModule) -> int:
    """Rewrite every contract int8 layer into one hwopt::qconv2d / qlinear node; returns count."""
    count = fold_requantize(gm)
    for node in list(gm.graph.nodes):
        m = _match(gm, node)
        if m is None:
            continue
        op, (xq, xs, xz), (w, ws), b, (_, relu, q), extra = m
        ys, yz = q.args[1], q.args[2]
        with gm.graph.inserting_before(q):
            new = gm.graph.call_function(op, (xq, w, b, ws, float(xs), int(xz), float(ys),
                                              int(yz), *extra, bool(relu)))
        new.meta = dict(q.meta)
        q.replace_all_uses_with(new)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return count


def has_quantized(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and getattr(n.target, "namespace", "") in
               ("quantized_decomposed", "hwopt") for n in gm.graph.nodes)


def max_output_lsb(gm: fx.GraphModule) -> float | None:
    """The largest output scale of the region's int8 requantizations (1 LSB), or None."""
    scales = [float(n.args[1]) for n in gm.graph.nodes
              if _is(n, qd.quantize_per_tensor.default) and isinstance(n.args[1], (int, float))]
    return max(scales) if scales else None


# -- 2. Relax converters ----------------------------------------------------------------------
# Each step is emitted as its own binding (the block builder needs normalized, typed operands).

class _Emitter:
    def __init__(self, imp):
        from tvm import relax

        self.bb, self.op = imp.block_builder, relax.op
        # int8 results requantized in this region: [(var, (rounded, zero point, hi, lo))]
        self.requantized = imp.__dict__.setdefault("_hwopt_requantized", [])

    def __call__(self, name: str, *args, **kwargs):
        fn = self.op
        for part in name.split("."):
            fn = getattr(fn, part)
        return self.bb.emit(fn(*args, **kwargs))

    @staticmethod
    def const(value, dtype):
        from tvm import relax

        return relax.const(value, dtype)


def _requantize(e: _Emitter, y, y_scale: float, y_zp: int, lo: int | None = QMIN,
                hi: int = QMAX):
    """``clamp(round(y / y_scale) + y_zp, lo, hi)`` as int8; ``lo=None``: y is known >= 0
    (after a ReLU), so the sum is >= y_zp >= QMIN and the lower clamp is left out."""
    if y_scale != 1.0:
        y = e("multiply", y, e.const(1.0 / y_scale, "float32"))
    y = e("round", y)
    # maximum/minimum, not clip: ConvertLayout has no layout rule for clip, which would wrap it
    # in transposes and keep it out of the NHWC conv's fused epilogue.
    rounded = y
    y = e("minimum", e("add", y, e.const(float(y_zp), "float32")), e.const(float(hi), "float32"))
    if lo is not None:
        y = e("maximum", y, e.const(float(lo), "float32"))
    out = e("astype", y, "int8")
    e.requantized.append((out, (rounded, float(y_zp), float(hi), lo)))
    return out


def _quantize(node, imp):
    x, scale, zp, lo, hi = imp.retrieve_args(node)[:5]
    return _requantize(_Emitter(imp), x, scale, zp, lo, hi)


def _dequantize(node, imp):
    e = _Emitter(imp)
    q, scale, zp = imp.retrieve_args(node)[:3]
    y = e("subtract", e("astype", q, "float32"), e.const(float(zp), "float32"))
    return e("multiply", y, e.const(scale, "float32"))


def _dequantize_per_channel(node, imp):
    e = _Emitter(imp)
    q, scales, zps, axis = imp.retrieve_args(node)[:4]
    shape = [1] * len(node.args[0].meta["val"].shape)
    shape[axis] = -1
    y = e("astype", q, "float32")
    if zps is not None:
        y = e("subtract", y, e("reshape", e("astype", zps, "float32"), shape))
    return e("multiply", y, e("reshape", scales, shape))


def _epilogue(e: _Emitter, acc, bias, w_scale, x_scale, y_scale, y_zp, relu, shape,
              zp_term=None):
    """int32 accumulator (minus `zp_term`, per channel) -> requantized int8.

    The fake-quant reference computes ``clamp(round(relu((acc - zp_term) * ws * xs + b) / ys)
    + y_zp)``; here ``1 / ys`` (positive, so it commutes with the ReLU) and the zero-point term
    fold into one per-channel scale and offset: ``relu(acc * s + o)``, two vector ops per output
    fewer in the kernel's epilogue. The float rounding differs from the reference's by an ulp,
    so an output may move by one LSB at a rounding tie (what the region check allows)."""
    scale = e("multiply", w_scale, e.const(x_scale / y_scale, "float32"))
    offset = None
    if bias is not None:
        offset = e("multiply", bias, e.const(1.0 / y_scale, "float32"))
    if zp_term is not None:
        term = e("multiply", e("astype", zp_term, "float32"), scale)
        offset = e("negative", term) if offset is None else e("subtract", offset, term)
    y = e("multiply", e("astype", acc, "float32"), e("reshape", scale, shape))
    if offset is not None:
        y = e("add", y, e("reshape", offset, shape))
    if relu:
        y = e("nn.relu", y)
    return _requantize(e, y, 1.0, y_zp, lo=None if relu else QMIN)


def _widen(e: _Emitter, x, zp: int):
    x16 = e("astype", x, "int16")
    return e("subtract", x16, e.const(zp, "int16")) if zp else x16


def _qconv2d(node, imp):
    e = _Emitter(imp)
    (x, w, bias, ws, xs, xz, ys, yz, stride, padding, dilation, groups,
     relu) = imp.retrieve_args(node)
    x16, w16 = _widen(e, x, xz), e("astype", w, "int16")
    if groups == 1 and node.args[0].meta["val"].shape[1] % 2:
        # One zero input channel makes the channel count even: the vpmaddwd kernels multiply
        # pairs of channels (hwopt.schedules.int8); zeros add nothing to the sums.
        pad = [0, 0, 0, 1, 0, 0, 0, 0]
        x16, w16 = e("nn.pad", x16, pad), e("nn.pad", w16, pad)
    acc = e("nn.conv2d", x16, w16, strides=stride,
            padding=padding, dilation=dilation, groups=groups, data_layout="NCHW",
            kernel_layout="OIHW", out_dtype="int32")
    return _epilogue(e, acc, bias, ws, xs, ys, yz, relu, (1, -1, 1, 1))


def _qlinear(node, imp):
    e = _Emitter(imp)
    x, w, bias, ws, xs, xz, ys, yz, relu = imp.retrieve_args(node)
    wt = e("permute_dims", e("astype", w, "int16"), [1, 0])
    acc = e("matmul", _widen(e, x, xz), wt, out_dtype="int32")
    return _epilogue(e, acc, bias, ws, xs, ys, yz, relu, (1, -1))


def _shifted_u8(e: _Emitter, x):
    """int8 values + 128 as uint8 (the VNNI operand): exact, zero point moves by +128.

    Where `x` is requantized in this region (`_requantize`), the uint8 is made from the same
    rounded value with the shift in its zero point and clamp bounds: one add and clamp instead
    of int8 -> int16, +128, -> uint8 after the clamp (three vector ops fewer per value in the
    producer's epilogue; its int8 result is dropped when nothing else reads it)."""
    chain = next((c for v, c in e.requantized if v.same_as(x)), None)
    if chain is None:
        return e("astype", e("add", e("astype", x, "int16"), e.const(128, "int16")), "uint8")
    rounded, zp, hi, lo = chain
    y = e("minimum", e("add", rounded, e.const(zp + 128.0, "float32")),
          e.const(hi + 128.0, "float32"))
    if lo is not None:
        y = e("maximum", y, e.const(lo + 128.0, "float32"))
    return e("astype", y, "uint8")


def _zero_point_term(e: _Emitter, w, zp: int, axes: list[int]):
    """``zp * sum(w)`` over the reduction axes, per output channel (folds on constant w)."""
    wsum = e("sum", e("astype", w, "int32"), axis=axes)
    return e("multiply", wsum, e.const(zp, "int32"))


def _pad4(n: int) -> int:
    return -n % 4


def _qconv2d_u8(node, imp):
    """VNNI form: ``sum((x + 128) * w) - (x_zp + 128) * sum(w)`` with uint8 x and int8 w.

    The input is padded with its own zero point (a real 0), so the correction is the same at
    every output position; input channels are padded to a multiple of 4 (vpdpbusd multiplies
    groups of four) with zero weights. Where that zero point is 0 (the input of a ReLU'd layer,
    whose range starts at 0) and no channels are added, the padding is the conv's own: it
    stays in the conv kernel in NHWC, not a separate NCHW pad between two layout transposes.
    """
    e = _Emitter(imp)
    (x, w, bias, ws, xs, xz, ys, yz, stride, padding, dilation, groups,
     relu) = imp.retrieve_args(node)
    if groups != 1:
        return _qconv2d(node, imp)
    zp = xz + 128
    cpad = _pad4(int(node.args[0].meta["val"].shape[1]))
    ph, pw = padding
    u, own = _shifted_u8(e, x), [0, 0]
    if zp == 0 and not cpad:
        own = [ph, pw]
    else:
        u = e("nn.pad", u, [0, 0, 0, cpad, ph, ph, pw, pw], pad_value=float(zp))
    if cpad:
        w = e("nn.pad", w, [0, 0, 0, cpad, 0, 0, 0, 0])
    acc = e("nn.conv2d", u, w, strides=stride, padding=own, dilation=dilation,
            data_layout="NCHW", kernel_layout="OIHW", out_dtype="int32")
    term = _zero_point_term(e, w, zp, [1, 2, 3]) if zp else None
    return _epilogue(e, acc, bias, ws, xs, ys, yz, relu, (1, -1, 1, 1), term)


def _qlinear_u8(node, imp):
    """VNNI form of `_qlinear` (see `_qconv2d_u8`); K padded to a multiple of 4."""
    e = _Emitter(imp)
    x, w, bias, ws, xs, xz, ys, yz, relu = imp.retrieve_args(node)
    zp = xz + 128
    kpad = _pad4(int(node.args[0].meta["val"].shape[-1]))
    u = _shifted_u8(e, x)
    if kpad:
        u = e("nn.pad", u, [0, 0, 0, kpad], pad_value=float(zp))
        w = e("nn.pad", w, [0, 0, 0, kpad])
    acc = e("matmul", u, e("permute_dims", w, [1, 0]), out_dtype="int32")
    term = _zero_point_term(e, w, zp, [1]) if zp else None
    return _epilogue(e, acc, bias, ws, xs, ys, yz, relu, (1, -1), term)


CONVERTERS = {
    "quantize_per_tensor.default": _quantize,
    "dequantize_per_tensor.default": _dequantize,
    "dequantize_per_channel.default": _dequantize_per_channel,
    "qconv2d.default": _qconv2d,
    "qlinear.default": _qlinear,
}

# int8 dot-product flavours of the layer ops: "i16" (int16 x int16, vpmaddwd; any x86 with
# AVX2, and the generic fallback) and "vnni" (uint8 x int8, vpdpbusd; AVX-512 VNNI).
INT8_DOTS = ("i16", "vnni")


def converters(int8_dot: str = "i16") -> dict:
    if int8_dot not in INT8_DOTS:
        raise ValueError(f"int8_dot must be one of {INT8_DOTS}, got {int8_dot!r}")
    if int8_dot == "vnni":
        return {**CONVERTERS, "qconv2d.default": _qconv2d_u8, "qlinear.default": _qlinear_u8}
    return dict(CONVERTERS)
