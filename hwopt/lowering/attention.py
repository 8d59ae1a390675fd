"""The fused attention op ``hwopt::attention`` and its Relax converter (lower step).

The ``fuse`` pass (passes/fuse_attention.py) rewrites ``matmul -> [scale] -> [+ mask] -> softmax
-> matmul`` in the ATen graph into one ``hwopt::attention(q, k, v, mask, scale)`` node. Its
PyTorch implementation is the same ATen computation, so the rewrite changes no value in eager
mode and PyTorch can still run the node when TVM does not take its region.

The converter (``CONVERTERS``, a ``custom_convert_map`` entry of ``from_exported_program``) emits
a form the schedule rules handle well, on the attention's own rank (``[B, H, S, D]``, no
``[B*H, ...]`` reshapes whose ``//`` and ``%`` indices defeat vectorisation):

- the key length ``Sk`` is padded to a multiple of ``PAD`` with zero keys/values and a ``-inf``
  mask column: exp(-inf) is exactly 0 and the zero value rows add nothing, so the result is
  unchanged, while every row of the scores is a whole number of vectors (softmax max/sum run as
  vector reductions; 197 ViT tokens become 208);
- ``Q K^T`` is a batched matmul whose epilogue (``* scale + mask``) FuseOps fuses into the matmul
  kernel (``hwopt.schedules.dense``);
- softmax over the last axis is one row-wise reduction kernel (``hwopt.schedules.reduction``);
- ``P V`` a batched matmul, whose output is sliced back only when the padding touched it (never:
  padding is on the reduced axis).
"""
from __future__ import annotations

import torch

aten = torch.ops.aten
# Key lengths are padded to a multiple of this (16 fp32 lanes covers AVX-512, AVX2 and NEON).
PAD = 16


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """``softmax(q @ k^T * scale + mask, -1) @ v`` over ``[..., S, D]`` tensors."""
    s = torch.matmul(q, k.transpose(-2, -1))
    if scale != 1.0:
        s = s * scale
    if mask is not None:
        s = s + mask
    return torch.matmul(torch.softmax(s, -1), v)


@torch.library.custom_op("hwopt::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """The fused op. Run by PyTorch (a region TVM does not take), it is PyTorch's fused
    ``scaled_dot_product_attention`` (the same value up to rounding, without the score tensor
    in memory); `reference` is the unfused form."""
    if q.dim() >= 3 and q.dtype == k.dtype == v.dtype and q.is_floating_point() and (
            mask is None or mask.dtype == q.dtype):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale)
    return reference(q, k, v, mask, scale)


@attention.register_fake
def _(q, k, v, mask, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def decompose(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of `gm` whose ``hwopt::attention`` (and int8 ``hwopt::qattention``) nodes call
    their reference (plain ATen ops when traced), for consumers that do not know the ops, e.g.
    ONNX export."""
    import copy

    from hwopt.lowering import qattention

    refs = {torch.ops.hwopt.attention.default: reference,
            torch.ops.hwopt.qattention.default: qattention.reference}
    out = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    for node in out.graph.nodes:
        if node.op == "call_function" and node.target in refs:
            node.target = refs[node.target]
    out.recompile()
    return out


def _emit(imp, expr):
    return imp.block_builder.emit(expr)


def _pad_keys(imp, k, v, mask, mask_shape, rank: int, sk: int):
    """Zero keys/values and a -inf mask column up to a multiple of PAD keys (see module doc)."""
    from tvm import relax

    op, extra = relax.op, -sk % PAD
    if extra == 0:
        return k, v, mask
    widths = [0] * (2 * rank)
    widths[-3] = extra  # the Sk axis of [.., Sk, D]
    k = _emit(imp, op.nn.pad(k, widths))
    v = _emit(imp, op.nn.pad(v, widths))
    col = torch.zeros(sk + extra)
    col[sk:] = float("-inf")
    if mask is None:
        return k, v, relax.const(col.numpy(), "float32")
    mshape = [int(d) for d in mask_shape]
    mshape = [1] * (rank - len(mshape)) + mshape
    mask = _emit(imp, op.reshape(mask, mshape))
    if mshape[-1] == 1:  # a mask constant along keys: broadcast it first
        mshape[-1] = sk
        mask = _emit(imp, op.broadcast_to(mask, mshape))
    mwidths = [0] * (2 * rank)
    mwidths[-1] = extra
    return k, v, _emit(imp, op.nn.pad(mask, mwidths, pad_value=float("-inf")))


def _attention(node, imp):
    from tvm import relax

    op = relax.op
    q, k, v, mask, scale = imp.retrieve_args(node)
    rank = len(node.args[0].meta["val"].shape)
    sk = int(node.args[1].meta["val"].shape[-2])
    mask_shape = node.args[3].meta["val"].shape if mask is not None else None
    k, v, mask = _pad_keys(imp, k, v, mask, mask_shape, rank, sk)
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    scores = _emit(imp, op.matmul(q, _emit(imp, op.permute_dims(k, perm))))
    if scale != 1.0:
        scores = _emit(imp, op.multiply(scores, relax.const(float(scale), "float32")))
    if mask is not None:
        scores = _emit(imp, op.add(scores, mask))
    probs = _emit(imp, op.nn.softmax(scores, axis=-1))
    return _emit(imp, op.matmul(probs, v))


CONVERTERS = {"attention.default": _attention}
