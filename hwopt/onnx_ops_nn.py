"""ONNX convolution, pooling, resize and shape/indexing ops for hwopt's importer.

Part of the op table in hwopt.onnx_ops (same handler signature). Shapes are static, so ONNX's
tensor-valued shape arguments (Reshape, Slice, Expand, Pad, ...) are read as constants here and
the torch ops get plain Python ints: the captured ATen graph has no shape arithmetic left.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hwopt.onnx_ops import _arg, ints, op, shape

aten = torch.ops.aten


# -- convolution and pooling -----------------------------------------------------------------

def _pads(cv, x, attrs, kernel, strides, dilations) -> tuple[list[int], list[int]]:
    """Begin and end padding per spatial dim, from `pads` or `auto_pad`."""
    n, auto = len(kernel), attrs.get("auto_pad", "NOTSET")
    if auto == "VALID":
        return [0] * n, [0] * n
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(shape(x)[2:], kernel, strides, dilations):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else big)
            end.append(big if auto == "SAME_UPPER" else small)
        return begin, end
    pads = list(attrs.get("pads", [0] * 2 * n))
    return pads[:n], pads[n:]


def _torch_pads(begin, end) -> list[int]:
    """ONNX per-dim begin/end -> F.pad's order (last dim first)."""
    out = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [b, e]
    return out


def _window(attrs, n):
    return (list(attrs.get("strides", [1] * n)), list(attrs.get("dilations", [1] * n)))


@op("Conv")
def conv(cv, ins, attrs):
    x, w = ins[:2]
    b = ins[2] if len(ins) > 2 else None
    n = len(shape(w)) - 2
    if n not in (1, 2, 3):
        raise cv.fail(f"{n}-D convolution is not supported (1-D, 2-D, 3-D are)")
    kernel = list(attrs.get("kernel_shape", shape(w)[2:]))
    strides, dil = _window(attrs, n)
    begin, end = _pads(cv, x, attrs, kernel, strides, dil)
    if begin != end:
        x, begin = cv.emit(F.pad, x, _torch_pads(begin, end)), [0] * n
    fn = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    return cv.emit(fn, x, w, b, strides, begin, dil, attrs.get("group", 1))


@op("ConvTranspose")
def conv_transpose(cv, ins, attrs):
    x, w = ins[:2]
    b = ins[2] if len(ins) > 2 else None
    n = len(shape(w)) - 2
    if "output_shape" in attrs or attrs.get("auto_pad", "NOTSET") != "NOTSET":
        raise cv.fail("ConvTranspose with output_shape or auto_pad is not supported: "
                      "export with explicit pads")
    strides, dil = _window(attrs, n)
    pads = list(attrs.get("pads", [0] * 2 * n))
    if pads[:n] != pads[n:]:
        raise cv.fail(f"ConvTranspose with asymmetric pads {pads} is not supported")
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
    out_pad = list(attrs.get("output_padding", [0] * n))
    return cv.emit(fn, x, w, b, strides, pads[:n], out_pad, attrs.get("group", 1), dil)


@op("MaxPool", "AveragePool")
def pool(cv, ins, attrs):
    x, is_max = ins[0], cv.onnx_node.op_type == "MaxPool"
    kernel = list(attrs["kernel_shape"])
    n = len(kernel)
    strides, dil = _window(attrs, n)
    if len(cv.onnx_node.output) > 1 and cv.onnx_node.output[1]:
        raise cv.fail("the Indices output of MaxPool is not supported")
    begin, end = _pads(cv, x, attrs, kernel, strides, dil)
    include_pad = bool(attrs.get("count_include_pad", 0))
    if begin != end or any(p > k // 2 for p, k in zip(begin, kernel)):
        if not is_max and not include_pad:
            raise cv.fail(f"AveragePool with pads {begin + end} that torch cannot express and "
                          "count_include_pad=0 is not supported")
        fill = -math.inf if is_max else 0.0
        x, begin = cv.emit(F.pad, x, _torch_pads(begin, end), "constant", fill), [0] * n
    ceil = bool(attrs.get("ceil_mode", 0))
    if is_max:
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
        return cv.emit(fn, x, kernel, strides, begin, dil, ceil_mode=ceil)
    if any(d != 1 for d in dil):
        raise cv.fail("AveragePool with dilations is not supported")
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
    return cv.emit(fn, x, kernel, strides, begin, ceil, include_pad)


@op("GlobalAveragePool", "GlobalMaxPool")
def global_pool(cv, ins, attrs):
    dims = list(range(2, len(shape(ins[0]))))
    fn = torch.mean if cv.onnx_node.op_type == "GlobalAveragePool" else torch.amax
    return cv.emit(fn, ins[0], dims, True)


@op("Resize", "Upsample")
def resize(cv, ins, attrs):
    x, rank = ins[0], len(shape(ins[0]))
    mode = attrs.get("mode", "nearest")
    coord = attrs.get("coordinate_transformation_mode", "half_pixel")
    sizes = ins[3] if len(ins) > 3 and ins[3] is not None else None
    scales = ins[2] if len(ins) > 2 and ins[2] is not None and ins[2].numel() else None
    if cv.onnx_node.op_type == "Upsample":
        scales, coord = ins[1], "asymmetric"
    if sizes is not None:
        out = ints(cv, sizes, "sizes")
    else:
        sc = cv.const(scales, "scales").tolist()
        out = [int(math.floor(s * f)) for s, f in zip(shape(x), sc)]
    if list(out[:2]) != list(shape(x)[:2]) or rank not in (3, 4, 5):
        raise cv.fail("Resize of the batch/channel dims is not supported")
    if mode == "nearest" and coord == "asymmetric" \
            and attrs.get("nearest_mode", "round_prefer_floor") == "floor":
        return cv.emit(F.interpolate, x, size=out[2:], mode="nearest")
    linear = {3: "linear", 4: "bilinear", 5: "trilinear"}[rank]
    if mode == "linear" and coord in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        return cv.emit(F.interpolate, x, size=out[2:], mode=linear,
                       align_corners=coord == "align_corners")
    raise cv.fail(f"Resize mode={mode!r}, coordinate_transformation_mode={coord!r}, "
                  f"nearest_mode={attrs.get('nearest_mode')!r} is not supported (nearest/"
                  "asymmetric/floor and linear/half_pixel/align_corners are)")


# -- shape and layout ------------------------------------------------------------------------

@op("Flatten")
def flatten(cv, ins, attrs):
    s = shape(ins[0])
    axis = attrs.get("axis", 1) % (len(s) + 1) if s else 0
    return cv.emit(torch.reshape, ins[0], (math.prod(s[:axis]), math.prod(s[axis:])))


@op("Reshape")
def reshape(cv, ins, attrs):
    s, new = shape(ins[0]), ints(cv, ins[1], "shape")
    if not attrs.get("allowzero", 0):
        new = [s[i] if d == 0 else d for i, d in enumerate(new)]
    return cv.emit(torch.reshape, ins[0], tuple(new))


@op("Transpose")
def transpose(cv, ins, attrs):
    perm = attrs.get("perm", list(reversed(range(len(shape(ins[0]))))))
    return cv.emit(torch.permute, ins[0], list(perm))


@op("Concat")
def concat(cv, ins, attrs):
    return cv.emit(torch.cat, [i for i in ins if i is not None], attrs["axis"])


@op("Split")
def split(cv, ins, attrs):
    x, s = ins[0], shape(ins[0])
    axis = attrs.get("axis", 0) % len(s)
    sizes = _arg(cv, ins, 1, attrs, "split", 13)
    if not sizes:
        num = attrs.get("num_outputs", len(cv.onnx_node.output))
        size = -(-s[axis] // num)
        sizes = [size] * (num - 1) + [s[axis] - size * (num - 1)]
    return list(cv.emit(torch.split, x, list(sizes), axis))


def _slice_bounds(start, end, step, dim):
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        return min(max(start, 0), dim), min(max(end, 0), dim)
    return min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)


@op("Slice")
def slice_(cv, ins, attrs):
    x = ins[0]
    if cv.opset >= 10:
        starts, ends = ints(cv, ins[1], "starts"), ints(cv, ins[2], "ends")
        axes, steps = (ints(cv, v, "axes/steps") if v is not None else None
                       for v in (ins + [None] * 2)[3:5])
    else:
        starts, ends, axes, steps = attrs["starts"], attrs["ends"], attrs.get("axes"), None
    axes = axes or list(range(len(starts)))
    steps = steps or [1] * len(starts)
    for ax, st, en, sp in zip(axes, starts, ends, steps):
        ax = ax % len(shape(x))
        st, en = _slice_bounds(st, en, sp, shape(x)[ax])
        if sp > 0:
            if (st, en, sp) != (0, shape(x)[ax], 1):
                x = cv.emit(aten.slice.Tensor, x, ax, st, max(en, st), sp)
        else:
            x = cv.emit(torch.index_select, x, ax, torch.tensor(list(range(st, en, sp)),
                                                                dtype=torch.int64))
    return x


def _index(cv, idx, dim):
    """ONNX indices may be negative: wrap them (now when constant, else in the graph)."""
    if isinstance(idx, torch.Tensor):
        return torch.where(idx < 0, idx + dim, idx).to(torch.int64)
    wrapped = cv.emit(torch.add, idx, dim)
    return cv.emit(torch.where, cv.emit(torch.lt, idx, 0), wrapped, idx)


def _gather(data, axis: int, idx):
    out = tuple(data.shape[:axis]) + tuple(idx.shape) + tuple(data.shape[axis + 1:])
    return torch.index_select(data, axis, idx.reshape(-1)).reshape(out)


@op("Gather")
def gather(cv, ins, attrs):
    data, idx = ins
    axis = attrs.get("axis", 0) % len(shape(data))
    idx = _index(cv, idx, shape(data)[axis])
    if isinstance(idx, torch.Tensor) and idx.dim() == 0:
        return cv.emit(torch.select, data, axis, int(idx))
    return cv.emit(_gather, data, axis, idx)


@op("GatherElements")
def gather_elements(cv, ins, attrs):
    data, idx = ins
    axis = attrs.get("axis", 0) % len(shape(data))
    return cv.emit(torch.gather, data, axis, _index(cv, idx, shape(data)[axis]))


@op("Unsqueeze")
def unsqueeze(cv, ins, attrs):
    s = list(shape(ins[0]))
    axes = _arg(cv, ins, 1, attrs, "axes", 13)
    rank = len(s) + len(axes)
    for a in sorted(a % rank for a in axes):
        s.insert(a, 1)
    return cv.emit(torch.reshape, ins[0], tuple(s))


@op("Squeeze")
def squeeze(cv, ins, attrs):
    s = shape(ins[0])
    axes = _arg(cv, ins, 1, attrs, "axes", 13)
    axes = {a % len(s) for a in axes} if axes else {i for i, d in enumerate(s) if d == 1}
    return cv.emit(torch.reshape, ins[0], tuple(d for i, d in enumerate(s) if i not in axes))


@op("Shape")
def shape_(cv, ins, attrs):
    s = shape(ins[0])
    return torch.tensor(s[attrs.get("start", 0):attrs.get("end", len(s))], dtype=torch.int64)


@op("Size")
def size(cv, ins, attrs):
    return torch.tensor(math.prod(shape(ins[0])), dtype=torch.int64)


@op("Constant")
def constant(cv, ins, attrs):
    if "value" in attrs:
        return attrs["value"]
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    raise cv.fail(f"Constant with attribute(s) {sorted(attrs)} is not supported (string and "
                  "sparse constants)")


@op("ConstantOfShape")
def constant_of_shape(cv, ins, attrs):
    value = attrs.get("value", torch.zeros(1))
    return torch.full(tuple(ints(cv, ins[0], "shape")), value.reshape(-1)[0].item(),
                      dtype=value.dtype)


@op("Expand")
def expand(cv, ins, attrs):
    out = torch.broadcast_shapes(shape(ins[0]), tuple(ints(cv, ins[1], "shape")))
    return ins[0] if tuple(out) == shape(ins[0]) else cv.emit(torch.broadcast_to, ins[0], out)


@op("Tile")
def tile(cv, ins, attrs):
    return cv.emit(torch.tile, ins[0], tuple(ints(cv, ins[1], "repeats")))


@op("Range")
def range_(cv, ins, attrs):
    start, limit, delta = (cv.const(v, "start/limit/delta") for v in ins)
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


@op("Trilu")
def trilu(cv, ins, attrs):
    k = ints(cv, ins[1], "k")[0] if len(ins) > 1 and ins[1] is not None else 0
    return cv.emit(torch.triu if attrs.get("upper", 1) else torch.tril, ins[0], k)


@op("NonZero")
def nonzero(cv, ins, attrs):
    return torch.nonzero(cv.const(ins[0], "the input of NonZero (data-dependent shape)")).t()


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate",
              "wrap": "circular"}


@op("Pad")
def pad(cv, ins, attrs):
    x, rank = ins[0], len(shape(ins[0]))
    if cv.opset >= 11:
        pads = ints(cv, ins[1], "pads")
        value = ins[2] if len(ins) > 2 and ins[2] is not None else None
        value = 0.0 if value is None else cv.const(value, "constant_value").item()
        axes = _arg(cv, ins, 3, attrs, "axes", 18) or list(range(rank))
    else:
        pads, value, axes = attrs["pads"], attrs.get("value", 0.0), list(range(rank))
    begin, end = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        begin[a % rank], end[a % rank] = pads[i], pads[len(axes) + i]
    first = next((i for i in range(rank) if begin[i] or end[i]), rank)
    if first == rank:
        return x
    mode = _PAD_MODES.get(attrs.get("mode", "constant"))
    if mode is None:
        raise cv.fail(f"Pad mode {attrs.get('mode')!r} is not supported")
    tp = _torch_pads(begin[first:], end[first:])
    if mode == "constant":
        return cv.emit(F.pad, x, tp, "constant", value)
    return cv.emit(F.pad, x, tp, mode)

