"""The ONNX op table of hwopt's ONNX importer (hwopt.onnx_import): one handler per op type.

A handler gets the converter, the node's inputs (a constant tensor, a `Dyn` run-time value, or
None for an omitted optional input) and its attributes, and returns the node's outputs, built with
``cv.emit(torch_fn, ...)`` so that all-constant nodes fold at import time. Arguments that ONNX
passes as tensors but torch wants as Python values (shapes, axes, pads) go through ``cv.const``.
Ops whose semantics depend on the opset (Softmax, Slice, Split, Unsqueeze, Reduce*, Clip, ...)
read ``cv.opset``. Pooling, convolution and shape ops live in hwopt.onnx_ops_nn.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hwopt.onnx_import import DTYPES, Dyn

HANDLERS: dict = {}


def op(*names):
    def deco(fn):
        for n in names:
            HANDLERS[n] = fn
        return fn
    return deco


def attributes(cv, node) -> dict:
    """Attribute name -> Python value (tensors as torch tensors, strings as str)."""
    from onnx import AttributeProto, helper

    from hwopt.onnx_import import tensor_from_proto

    out = {}
    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:  # If branches; the handler decides
            out[a.name] = a.g
            continue
        if a.type == AttributeProto.TENSOR:
            out[a.name] = tensor_from_proto(a.t)
            continue
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def shape(v) -> tuple[int, ...]:
    return tuple(v.shape)


def ints(cv, v, what: str) -> list[int]:
    return [int(i) for i in cv.const(v, what).reshape(-1).tolist()]


def _arg(cv, ins, i, attrs, name, since: int, what: str | None = None):
    """An operand that became an input at opset `since` (an attribute before)."""
    if cv.opset >= since:
        v = ins[i] if len(ins) > i else None
        return None if v is None else ints(cv, v, what or name)
    return attrs.get(name)


# -- elementwise ------------------------------------------------------------------------------

UNARY = {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf,
    "Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt, "Reciprocal": torch.reciprocal,
    "Neg": torch.neg, "Abs": torch.abs, "Floor": torch.floor, "Ceil": torch.ceil,
    "Round": torch.round, "Sin": torch.sin, "Cos": torch.cos, "Sign": torch.sign,
    "Not": torch.logical_not, "Softplus": F.softplus, "Softsign": F.softsign,
    "HardSwish": F.hardswish, "Mish": F.mish, "IsNaN": torch.isnan,
}
BINARY = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div, "Pow": torch.pow,
    "Equal": torch.eq, "Less": torch.lt, "LessOrEqual": torch.le, "Greater": torch.gt,
    "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}
_COMMUTATIVE = ("Add", "Mul", "Equal", "And", "Or", "Xor")


def _unary(name):
    fn = UNARY[name]
    return lambda cv, ins, attrs: cv.emit(fn, ins[0])


def _scalar(a, other):
    """A one-element constant as a Python number (cleaner ATen: add.Tensor(x, 2.0))."""
    if isinstance(a, torch.Tensor) and isinstance(other, Dyn) and a.numel() == 1 \
            and a.dim() <= other.meta.dim() and a.dtype == other.dtype:
        return a.item()
    return a


def _binary(name):
    fn = BINARY[name]

    def handler(cv, ins, attrs):
        a, b = ins
        if name in _COMMUTATIVE and isinstance(a, torch.Tensor) and isinstance(b, Dyn):
            a, b = b, a
        b = _scalar(b, a)
        if name == "Div" and not a.dtype.is_floating_point:
            return cv.emit(torch.div, a, b, rounding_mode="trunc")
        return cv.emit(fn, a, b)
    return handler


for _n in UNARY:
    HANDLERS[_n] = _unary(_n)
for _n in BINARY:
    HANDLERS[_n] = _binary(_n)


@op("Mod")
def mod(cv, ins, attrs):
    fn = torch.fmod if attrs.get("fmod", 0) else torch.remainder
    return cv.emit(fn, ins[0], _scalar(ins[1], ins[0]))


@op("Max", "Min", "Sum", "Mean")
def variadic(cv, ins, attrs):
    name = cv.onnx_node.op_type
    fn = {"Max": torch.maximum, "Min": torch.minimum}.get(name, torch.add)
    acc = ins[0]
    for x in ins[1:]:
        acc = cv.emit(fn, acc, x)
    return cv.emit(torch.div, acc, float(len(ins))) if name == "Mean" else acc


@op("Identity")
def identity(cv, ins, attrs):
    return ins[0]


@op("Dropout")
def dropout(cv, ins, attrs):  # inference: identity, and an all-true mask
    return [ins[0], torch.ones(shape(ins[0]), dtype=torch.bool)]


@op("If")
def if_(cv, ins, attrs):
    """An If with a constant condition (legacy exporters emit them for static checks) inlines
    the branch taken; a data-dependent one cannot be compiled for static shapes."""
    cond = cv.const(ins[0], "the condition of If (data-dependent control flow)")
    return cv.inline(attrs["then_branch"] if bool(cond.reshape(-1)[0]) else attrs["else_branch"])


@op("Where")
def where(cv, ins, attrs):
    return cv.emit(torch.where, *ins)


@op("Clip")
def clip(cv, ins, attrs):
    if cv.opset < 11:
        lo, hi = attrs.get("min"), attrs.get("max")
    else:
        lo, hi = (cv.const(v, "min/max").item() if v is not None else None
                  for v in (ins + [None, None])[1:3])
    if lo is None and hi is None:
        return ins[0]
    return cv.emit(torch.clamp, ins[0], lo, hi)


@op("LeakyRelu")
def leaky_relu(cv, ins, attrs):
    return cv.emit(F.leaky_relu, ins[0], attrs.get("alpha", 0.01))


@op("Elu")
def elu(cv, ins, attrs):
    return cv.emit(F.elu, ins[0], attrs.get("alpha", 1.0))


@op("Selu")
def selu(cv, ins, attrs):
    a, g = attrs.get("alpha", 1.67326319217681884765625), attrs.get("gamma", 1.05070102214813232)
    return cv.emit(torch.mul, cv.emit(F.elu, ins[0], a), g)


@op("HardSigmoid")
def hard_sigmoid(cv, ins, attrs):
    a, b = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
    return cv.emit(torch.clamp, cv.emit(torch.add, cv.emit(torch.mul, ins[0], a), b), 0.0, 1.0)


@op("PRelu")
def prelu(cv, ins, attrs):
    x, slope = ins
    neg = cv.emit(torch.mul, x, slope)
    return cv.emit(torch.where, cv.emit(torch.lt, x, 0), neg, x)


@op("Gelu")
def gelu(cv, ins, attrs):
    return cv.emit(F.gelu, ins[0], approximate=attrs.get("approximate", "none"))


@op("Cast")
def cast(cv, ins, attrs):
    if attrs["to"] not in DTYPES:
        raise cv.fail(f"Cast to ONNX data type {attrs['to']} has no torch dtype")
    return cv.emit(_to, ins[0], DTYPES[attrs["to"]])


@op("CastLike")
def cast_like(cv, ins, attrs):
    return cv.emit(_to, ins[0], ins[1].dtype)


def _to(x, dtype):
    return x.to(dtype)


# -- matmul and normalisation ----------------------------------------------------------------

@op("MatMul")
def matmul(cv, ins, attrs):
    return cv.emit(torch.matmul, *ins)


@op("Gemm")
def gemm(cv, ins, attrs):
    """alpha * A' @ B' + beta * C, as F.linear (weight [N, K]) so the pipeline sees a linear."""
    a, b = ins[:2]
    c = ins[2] if len(ins) > 2 else None
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if attrs.get("transA", 0):
        a = cv.emit(torch.t, a)
    w = b if attrs.get("transB", 0) else cv.emit(torch.t, b)
    if alpha != 1.0 and isinstance(w, torch.Tensor):
        w, alpha = w * alpha, 1.0
    if c is not None and beta != 1.0:
        c = cv.emit(torch.mul, c, beta)
    bias = c if c is not None and len(shape(c)) <= 1 else None
    y = cv.emit(F.linear, a, w, bias)
    if alpha != 1.0:
        y = cv.emit(torch.mul, y, alpha)
    if c is not None and bias is None:
        y = cv.emit(torch.add, y, c)
    return y


@op("Einsum")
def einsum(cv, ins, attrs):
    return cv.emit(torch.einsum, attrs["equation"], *ins)


@op("Softmax", "LogSoftmax")
def softmax(cv, ins, attrs):
    fn = torch.softmax if cv.onnx_node.op_type == "Softmax" else torch.log_softmax
    x = ins[0]
    axis = attrs.get("axis", -1 if cv.opset >= 13 else 1)
    rank = len(shape(x))
    axis = axis % rank if rank else 0
    if cv.opset >= 13 or axis == rank - 1:
        return cv.emit(fn, x, axis)
    # Before opset 13 the input is flattened to 2-D at `axis` and normalised over the second part.
    s = shape(x)
    flat = cv.emit(torch.reshape, x, (math.prod(s[:axis]), -1))
    return cv.emit(torch.reshape, cv.emit(fn, flat, 1), s)


@op("LayerNormalization")
def layer_norm(cv, ins, attrs):
    x, scale = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else None
    axis = attrs.get("axis", -1) % len(shape(x))
    norm = shape(x)[axis:]
    if len(cv.onnx_node.output) > 1 and any(cv.onnx_node.output[1:]):
        raise cv.fail("the Mean/InvStdDev outputs of LayerNormalization are not supported")
    scale = cv.emit(torch.reshape, scale, norm) if shape(scale) != norm else scale
    if bias is not None and shape(bias) != norm:
        bias = cv.emit(torch.reshape, bias, norm)
    return cv.emit(F.layer_norm, x, norm, scale, bias, attrs.get("epsilon", 1e-5))


@op("BatchNormalization")
def batch_norm(cv, ins, attrs):
    if attrs.get("training_mode", 0) or (len(cv.onnx_node.output) > 1
                                         and any(cv.onnx_node.output[1:])):
        raise cv.fail("BatchNormalization in training mode is not supported (inference only)")
    x, scale, b, mean, var = ins
    return cv.emit(F.batch_norm, x, mean, var, scale, b, False, 0.0, attrs.get("epsilon", 1e-5))


@op("InstanceNormalization")
def instance_norm(cv, ins, attrs):
    x, scale, b = ins
    return cv.emit(F.instance_norm, x, None, None, scale, b, True, 0.0,
                   attrs.get("epsilon", 1e-5))


# -- reductions ------------------------------------------------------------------------------

_REDUCE_INPUT_AXES = {"ReduceSum": 13}  # the others take axes as an input from opset 18


@op("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2",
    "ReduceSumSquare", "ReduceLogSumExp")
def reduce(cv, ins, attrs):
    name, x = cv.onnx_node.op_type, ins[0]
    axes = _arg(cv, ins, 1, attrs, "axes", _REDUCE_INPUT_AXES.get(name, 18))
    keep = bool(attrs.get("keepdims", 1))
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return x
        axes = list(range(len(shape(x))))
    axes = sorted(a % len(shape(x)) for a in axes)
    if name == "ReduceMean":
        return cv.emit(torch.mean, x, axes, keep)
    if name == "ReduceSum":
        return cv.emit(torch.sum, x, axes, keep)
    if name == "ReduceMax":
        return cv.emit(torch.amax, x, axes, keep)
    if name == "ReduceMin":
        return cv.emit(torch.amin, x, axes, keep)
    if name == "ReduceLogSumExp":
        return cv.emit(torch.logsumexp, x, axes, keep)
    if name == "ReduceProd":
        for a in reversed(axes):
            x = cv.emit(torch.prod, x, a, keep)
        return x
    sq = cv.emit(torch.sum, cv.emit(torch.mul, x, x), axes, keep)
    return cv.emit(torch.sqrt, sq) if name == "ReduceL2" else sq


@op("ArgMax", "ArgMin")
def arg_reduce(cv, ins, attrs):
    if attrs.get("select_last_index", 0):
        raise cv.fail("select_last_index=1 is not supported")
    fn = torch.argmax if cv.onnx_node.op_type == "ArgMax" else torch.argmin
    return cv.emit(fn, ins[0], attrs.get("axis", 0), bool(attrs.get("keepdims", 1)))


@op("CumSum")
def cumsum(cv, ins, attrs):
    x, axis = ins[0], ints(cv, ins[1], "axis")[0]
    if attrs.get("reverse", 0):
        x = cv.emit(torch.flip, x, [axis])
    y = cv.emit(torch.cumsum, x, axis)
    if attrs.get("exclusive", 0):
        y = cv.emit(torch.sub, y, x)
    return cv.emit(torch.flip, y, [axis]) if attrs.get("reverse", 0) else y


from hwopt import onnx_ops_nn  # noqa: E402,F401  (registers conv, pooling and shape ops)
