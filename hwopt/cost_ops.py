"""Op classes and work counts of ATen nodes: FLOPs, MACs, operand bytes, GEMM dimensions.

Used by the cost models (``hwopt.cost``) in the *analyse* step and by passes that ask what a node
costs. Shapes come from ``node.meta['val']``; a dimension may be an int or a sympy expression
(``SymInt.node.expr`` of a graph captured by ``torch.export`` with ``Dim`` dynamic shapes), so
every count here is either a Python number or a sympy expression, never a guess.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx as fx

# Op classes, each with its own efficiency in the cost model.
CLASSES = ("conv", "dwconv", "matmul", "bmm", "reduction", "softmax", "norm", "elementwise",
           "gather", "layout", "view", "other")
# Kernel classes of the fusion model (hwopt.cost_fusion) besides these: "to_nhwc", "to_nchw"
# (layout transposes around convs).

# Ops that only relabel memory in PyTorch (no compute). `_LAYOUT_VIEWS` among them reorder or
# broadcast data: TVM materialises them (a copy kernel) unless they fold into a constant.
_FREE_VIEWS = {"view", "_unsafe_view", "reshape", "squeeze", "unsqueeze", "alias", "detach",
               "getitem", "lift_fresh_copy", "flatten", "unflatten"}
_LAYOUT_VIEWS = {"t", "slice", "select", "permute", "transpose", "expand", "split",
                 "split_with_sizes", "unbind", "narrow", "as_strided", "chunk"}
_VIEW_OPS = _FREE_VIEWS | _LAYOUT_VIEWS
_MATMUL = {"mm", "addmm", "linear", "matmul", "grouped_mm"}  # + hwopt::grouped_mm
# + hwopt::attention, hwopt::qattention
_BMM = {"bmm", "baddbmm", "scaled_dot_product_attention", "attention", "qattention"}
_REDUCTION = {"sum", "mean", "amax", "amin", "max", "min", "var", "std", "prod", "cumsum",
              "argmax", "argmin", "avg_pool2d", "max_pool2d", "max_pool2d_with_indices",
              "adaptive_avg_pool2d", "_adaptive_avg_pool2d", "logsumexp", "norm"}
_SOFTMAX = {"_softmax", "softmax", "_log_softmax", "log_softmax"}
_NORM = {"native_layer_norm", "layer_norm", "_native_batch_norm_legit_no_training",
         "native_batch_norm", "native_group_norm", "group_norm", "rms_norm", "_fused_rms_norm"}
_GATHER = {"embedding", "index_select", "gather", "index", "take", "embedding_bag"}
_COPY = {"clone", "_to_copy", "copy", "cat", "stack", "contiguous", "constant_pad_nd", "pad",
         "where", "masked_fill", "full_like", "zeros_like", "ones_like", "repeat"}
_CONV = {"convolution", "conv2d", "_convolution", "conv1d", "conv3d"}

# FLOP equivalents per element of ops that are more than one arithmetic instruction, in hwopt's
# generated code: exp/erf/tanh use vectorized fast-math polynomials (hwopt.schedules.fastmath);
# sigmoid, silu and log stay scalar libm calls, ~10x slower still. Measured on a Zen 3 (AVX2) as
# time per element relative to an add at the element-wise efficiency; calibration rescales the
# class, these keep the ops of one class in proportion.
ELEMENT_FLOPS = {"gelu": 28, "erf": 22, "tanh": 23, "exp": 25, "sigmoid": 220, "silu": 230,
                 "log": 160, "pow": 2, "div": 2, "sqrt": 5, "rsqrt": 10, "reciprocal": 2,
                 "hardtanh": 2, "clamp": 2, "hardswish": 4, "_softmax": 30, "softmax": 30,
                 "_log_softmax": 190, "log_softmax": 190, "native_layer_norm": 8,
                 "layer_norm": 8, "native_group_norm": 8, "rms_norm": 6, "_fused_rms_norm": 6}
# How many times a kernel streams through its input (rows are re-read from on-chip memory).
ROW_PASSES = {"softmax": 3, "norm": 2, "reduction": 1}


def base_name(node: fx.Node) -> str:
    if node.target is operator.getitem:
        return "getitem"
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def op_class(node: fx.Node) -> str:
    """Coarse class of an ATen node (one of `CLASSES`); views cost nothing on their own."""
    if node.op != "call_function":
        return "other"
    name = base_name(node)
    if name in _CONV:
        return "dwconv" if _is_depthwise(node) else "conv"
    if name in _MATMUL:
        return "matmul"
    if name in _BMM:
        return "bmm"
    if name in _SOFTMAX:
        return "softmax"
    if name in _NORM:
        return "norm"
    if name in _REDUCTION:
        return "reduction"
    if name in _VIEW_OPS:
        return "view"
    if name in _GATHER:
        return "gather"
    if name.startswith("sym_") or name.startswith("_assert") or name == "_local_scalar_dense":
        return "other"
    return "elementwise"


def is_free_view(node: fx.Node) -> bool:
    """A view TVM also treats as free (a reshape, an expand that broadcasts nothing); layout
    views (permute, a real expand, slice) are copies."""
    if node.op != "call_function":
        return False
    name = base_name(node)
    if name == "expand" and node.all_input_nodes:
        src, out = _val(node.all_input_nodes[0]), _val(node)
        return isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and \
            tuple(src.shape) == tuple(out.shape)
    return name in _FREE_VIEWS


def is_copy(node: fx.Node) -> bool:
    return node.op == "call_function" and base_name(node) in _COPY


def _is_depthwise(node: fx.Node) -> bool:
    w = _val(node.all_input_nodes[1]) if len(node.all_input_nodes) > 1 else None
    groups = node.args[8] if len(node.args) > 8 else node.kwargs.get("groups", 1)
    return isinstance(w, torch.Tensor) and w.dim() >= 3 and dim(w.shape[1]) == 1 and groups != 1


def dim(s) -> Any:
    """An int for a concrete size, a sympy expression for a symbolic one."""
    if isinstance(s, torch.SymInt):
        expr = s.node.expr
        return int(expr) if getattr(expr, "is_Integer", False) else expr
    return int(s)


def is_symbolic(x) -> bool:
    return hasattr(x, "free_symbols") and bool(getattr(x, "free_symbols", ()))


def _val(node) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def shape(t: torch.Tensor) -> tuple:
    return tuple(dim(s) for s in t.shape)


def numel(t: torch.Tensor) -> Any:
    return math.prod(shape(t))


def tensor_bytes(val) -> Any:
    """Bytes of a tensor value, or of all tensors in a tuple/list value (0 for non-tensors)."""
    if isinstance(val, torch.Tensor):
        return numel(val) * val.element_size()
    if isinstance(val, (tuple, list)):
        return sum((tensor_bytes(v) for v in val), 0)
    return 0


def _elems(val) -> Any:
    if isinstance(val, torch.Tensor):
        return numel(val)
    if isinstance(val, (tuple, list)):
        return sum((_elems(v) for v in val), 0)
    return 0


def dtype_name(node: fx.Node) -> str:
    """Compute dtype of a node: that of its first tensor input (int8 for a quantized matmul)."""
    for a in node.all_input_nodes:
        v = _val(a)
        if isinstance(v, torch.Tensor) and v.dtype not in (torch.int64, torch.int32, torch.bool):
            return str(v.dtype).replace("torch.", "")
    v = _val(node)
    v = v[0] if isinstance(v, (tuple, list)) and v else v
    return str(v.dtype).replace("torch.", "") if isinstance(v, torch.Tensor) else "float32"


@dataclass(frozen=True)
class Work:
    """What one node computes and touches.

    `inputs` are (producer node, bytes read) in role order: data, weight, then the rest.
    `gemm` is (batch, M, K, N) for conv/matmul/bmm (conv as implicit GEMM: M = N*OH*OW,
    K = Cin/groups*kh*kw, N = Cout); `window` is how often each data element is re-used by a
    sliding window (kh*kw/stride^2); `row_bytes` is the extent a reduction re-reads; `inner` is
    the length of the innermost reduced axis when a reduction runs along the last axis (0 when
    it keeps that axis), which decides whether its sums run as vector ops.
    """

    cls: str
    flops: Any
    macs: Any
    dtype: str
    inputs: tuple
    out_bytes: Any
    gemm: tuple | None = None
    window: Any = 1
    row_bytes: Any = 0
    inner: Any = 0


def _tensor_inputs(node: fx.Node) -> list:
    return [(a, tensor_bytes(_val(a))) for a in node.all_input_nodes
            if isinstance(_val(a), torch.Tensor)]


def node_work(node: fx.Node) -> Work:
    """Work of one ATen node from its shape metadata."""
    cls, name, out = op_class(node), base_name(node), _val(node)
    dt, ins, out_b = dtype_name(node), _tensor_inputs(node), tensor_bytes(out)
    if cls in ("view", "other"):  # bytes are what TVM moves when it materialises the view
        return Work(cls, 0, 0, dt, tuple(ins), out_b if cls == "view" else 0)
    if cls in ("conv", "dwconv"):
        return _conv_work(node, cls, dt, ins, out_b)
    if cls in ("matmul", "bmm"):
        return _gemm_work(node, cls, name, dt, ins, out_b)
    if cls == "gather":  # reads only the rows it gathers, not the whole table
        return Work(cls, 0, 0, dt, ((ins[0][0], out_b),) + tuple(ins[1:]), out_b)
    n_out = _elems(out[0] if isinstance(out, (tuple, list)) and out else out)
    n_in = _max(numel(_val(a)) for a, _ in ins)
    if cls in ("reduction", "softmax", "norm"):
        src = _val(ins[0][0]) if ins else None
        row = _row_bytes(node, name, src) if isinstance(src, torch.Tensor) else 0
        kernel, window = _pool_window(node) if name in _POOLS else (1, 1)
        flops = ELEMENT_FLOPS.get(name, 1) * (n_out * kernel if name in _POOLS else n_in)
        inner = _inner_reduced(node, name, src) if isinstance(src, torch.Tensor) else 0
        return Work(cls, flops, 0, dt, tuple(ins), out_b, window=window, row_bytes=row,
                    inner=inner)
    flops = 0 if is_copy(node) else ELEMENT_FLOPS.get(name, 1) * n_out
    return Work(cls, flops, 0, dt, tuple(ins), out_b)


def _max(values) -> Any:
    """Largest of some counts; a sympy ``Max`` when one of them is symbolic (sizes that grow
    with a dynamic dimension at different rates cannot be ordered by Python's ``max``)."""
    values = list(values)
    if not values:
        return 0
    if any(isinstance(v, sympy.Basic) for v in values):
        return sympy.Max(*values)
    return max(values)


def _conv_work(node, cls, dt, ins, out_b) -> Work:
    out, x, w = _val(node), _val(ins[0][0]), _val(ins[1][0])
    ws, os_ = shape(w), shape(out)
    transposed = len(node.args) > 6 and bool(node.args[6])
    k = math.prod(ws[1:])  # Cin/groups * kh * kw (Cout/groups * kh * kw when transposed)
    macs = (numel(x) if transposed else numel(out)) * k
    bias = numel(out) if len(ins) > 2 else 0
    stride = node.args[3] if len(node.args) > 3 else [1]
    s2 = math.prod(int(s) for s in stride) if stride else 1
    window = max(math.prod(ws[2:]) / s2, 1) if len(ws) > 2 else 1
    m = os_[0] * math.prod(os_[2:]) if len(os_) > 2 else os_[0]
    return Work(cls, 2 * macs + bias, macs, dt, tuple(ins), out_b,
                gemm=(1, m, ws[1] * math.prod(ws[2:]), os_[1]), window=window)


def _gemm_work(node, cls, name, dt, ins, out_b) -> Work:
    out = _val(node)
    mats = [(a, b) for a, b in ins if _val(a).dim() >= 2]
    bias = [(a, b) for a, b in ins if _val(a).dim() < 2]
    if name in ("addmm", "baddbmm") and len(ins) == 3:  # (bias, x, w): data and weight first
        mats, bias = list(ins[1:]), [ins[0]]
    if name == "grouped_mm":  # (x, w [G, K, N], bias [G, N], group): every group's w is read
        mats, bias = list(ins[:2]), list(ins[2:])
    os_ = shape(out)
    if name in ("scaled_dot_product_attention", "attention", "qattention"):
        q, kv = shape(_val(ins[0][0])), shape(_val(ins[1][0]))
        b, m, e, s = math.prod(q[:-2]), q[-2], q[-1], kv[-2]
        macs = b * m * s * e * 2
        return Work(cls, 2 * macs + 15 * b * m * s, macs, dt, tuple(ins), out_b,
                    gemm=(b, m, e, s))
    a, w = shape(_val(mats[0][0])), shape(_val(mats[-1][0]))
    k = w[-1] if name == "linear" else w[-2]
    n = os_[-1]
    m = os_[-2] if len(os_) >= 2 else 1
    batch = math.prod(os_[:-2]) if len(os_) > 2 else 1
    if cls == "matmul" and len(os_) > 2:  # a linear over (..., K): all leading dims are rows
        m, batch = m * batch, 1
    macs = batch * m * k * n
    extra = numel(out) if bias or name in ("addmm", "baddbmm") else 0
    del a
    return Work(cls, 2 * macs + extra, macs, dt, tuple(mats) + tuple(bias), out_b,
                gemm=(batch, m, k, n))


def _row_bytes(node: fx.Node, name: str, src: torch.Tensor) -> Any:
    dims = [a for a in node.args[1:2] if isinstance(a, (int, list, tuple))]
    sh = shape(src)
    if not sh:
        return src.element_size()
    if name in ("native_layer_norm", "layer_norm") and dims:  # args[1] is normalized_shape
        return math.prod(sh[-len(dims[0]):]) * src.element_size()
    if dims and name not in _NORM and "adaptive" not in name:  # adaptive pools: output size
        d = dims[0] if isinstance(dims[0], (list, tuple)) else [dims[0]]
        if d and all(isinstance(i, int) and -len(sh) <= i < len(sh) for i in d):
            return math.prod(sh[i] for i in d) * src.element_size()
    return sh[-1] * src.element_size()


def _inner_reduced(node: fx.Node, name: str, src: torch.Tensor) -> Any:
    """Length of the last axis when `node` reduces along it (layer/RMS/group norm, softmax over
    the last dim, sum/mean/max over dims that include the last), else 0. Pools and batch norm
    (a per-channel scale at inference) keep the last axis."""
    sh = shape(src)
    if not sh or name in _POOLS or "adaptive" in name or "batch_norm" in name:
        return 0
    last = len(sh) - 1
    if name in _NORM:
        return sh[-1]
    at = 2 if name == "norm" else 1  # norm(x, p, dim)
    dims = node.args[at] if len(node.args) > at else None
    if dims is None or dims == []:  # a full reduction
        return sh[-1]
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    if not all(isinstance(d, int) for d in dims):
        return 0
    return sh[-1] if any(d % len(sh) == last for d in dims) else 0


_POOLS = {"avg_pool2d", "max_pool2d", "max_pool2d_with_indices"}


def _pool_window(node: fx.Node) -> tuple:
    """(kernel area, re-use of each input element = kernel area / stride area)."""
    def pair(v):
        return list(v) * (2 if len(v) == 1 else 1) if isinstance(v, (list, tuple)) else [v, v]

    k = pair(node.args[1]) if len(node.args) > 1 else [1, 1]
    s = pair(node.args[2]) if len(node.args) > 2 and node.args[2] else k
    area = max(math.prod(int(i) for i in k), 1)
    return area, max(area / max(math.prod(int(i) for i in s), 1), 1)


def node_flops(node: fx.Node) -> Any:
    """FLOPs of one node (2 per MAC, plus bias adds and element ops)."""
    return node_work(node).flops


def node_bytes(node: fx.Node) -> Any:
    """Bytes a node reads and writes when it runs on its own (0 for views)."""
    w = node_work(node)
    if w.cls in ("view", "other"):
        return 0
    return sum((b for _, b in w.inputs), 0) + w.out_bytes
