"""fuse: constant folding, BatchNorm folding, attention and linear-epilogue fusion (lossless).

Runs first in every pipeline, on the canonical ATen graph (see hwopt.capture), before any lossy
pass: folding BatchNorm into the preceding conv/linear removes a whole pass over the activations
and lets the lowering fuse the activation into the conv's epilogue. Requires frozen weights
(get_attr constants); a conv/linear whose weight is a runtime input is left unchanged.

Rewrites, each a pattern + replacement + check:
- constant folding: a pure op whose inputs are all constants is evaluated once at compile time
  (e.g. the ``permute`` of a linear weight), unless that would grow the constants;
- conv + BN: ``convolution -> _native_batch_norm_legit_no_training -> getitem 0`` becomes one
  convolution with scaled weights and a bias;
- linear + BN: ``addmm(b, x, W^T)`` (or ``mm``) followed by a BatchNorm over features likewise;
- attention: ``bmm -> [scale] -> [+ mask] -> softmax -> bmm`` becomes one ``hwopt::attention``
  op, lowered by hwopt.lowering.attention (passes/fuse_attention.py);
- linear epilogues: GELU, element-wise chains and residual adds after a linear run on its 2-D
  output, so FuseOps fuses them into the matmul kernel (passes/fuse_epilogue.py). conv + add +
  activation needs no rewrite (the NHWC conv kernel takes that epilogue as it is); the notes
  count it.
The notes of the PassResult give the count per pattern.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from hwopt.graph import add_constant, constant_value, is_constant, remove_unused_constants
from hwopt.pass_base import Pass, PassContext, PassResult, register_pass

from .fuse_attention import fuse_attention
from .fuse_epilogue import count_conv_epilogues, fuse_epilogues

aten = torch.ops.aten
BN = aten._native_batch_norm_legit_no_training.default
_IMPURE = ("rand", "normal", "bernoulli", "dropout", "empty", "uniform", "copy_", "_assert",
           "_local_scalar_dense")


@dataclass(frozen=True)
class FuseConfig:
    fold_constants: bool = True
    fold_batchnorm: bool = True
    # matmul -> [scale] -> [+ mask] -> softmax -> matmul as one hwopt::attention op.
    fuse_attention: bool = True
    # Views moved off linear outputs so GELU / residual adds fuse into the matmul kernel.
    fuse_epilogues: bool = True
    # Constant folding may not grow the constants beyond this many elements per node.
    max_folded_numel: int = 1 << 16


@register_pass("fuse", lossless=True)
class Fuse(Pass):
    def __init__(self, **config):
        self.config = FuseConfig(**config)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        notes = []
        changed = 0
        if self.config.fold_constants:
            n = fold_constants(gm, self.config.max_folded_numel)
            changed += n
            notes.append(f"folded {n} constant expression(s)")
        if self.config.fold_batchnorm:
            n = fold_batchnorm(gm)
            changed += n
            notes.append(f"folded {n} BatchNorm(s) into conv/linear")
        if self.config.fuse_attention:
            n = fuse_attention(gm)
            changed += n
            notes.append(f"fused {n} attention(s) (matmul-softmax-matmul)")
        if self.config.fuse_epilogues:
            counts = fuse_epilogues(gm)
            changed += sum(counts.values())
            notes.append("epilogues moved onto the matmul output: " + ", ".join(
                f"{what} {n}" for what, n in counts.items()))
            notes.append(f"conv+add+activation: {count_conv_epilogues(gm)} (fused by the "
                         "lowering as they are)")
        if changed:
            remove_unused_constants(gm)
            gm.recompile()
        return PassResult(gm, changed > 0, notes)


def _foldable(node: fx.Node) -> bool:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    if any(k in str(node.target) for k in _IMPURE) or node.target._schema.is_mutable:
        return False
    # Factory ops (arange, full, ...) have no inputs: foldable too, within the size limit.
    return all(is_constant(a) for a in node.all_input_nodes)


def fold_constants(gm: fx.GraphModule, max_numel: int) -> int:
    """Evaluate pure ops whose inputs are all constants; returns how many were folded."""
    count = 0
    for node in list(gm.graph.nodes):
        if not _foldable(node):
            continue
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs),
                                             lambda a: constant_value(gm, a))
        with torch.no_grad():
            value = node.target(*args, **kwargs)
        if not isinstance(value, torch.Tensor):
            continue
        in_numel = sum(constant_value(gm, a).numel() for a in node.all_input_nodes)
        if value.numel() > max(in_numel, max_numel):
            continue
        const = add_constant(gm, value, node, "folded")
        node.replace_all_uses_with(const)
        gm.graph.erase_node(node)
        count += 1
    return count


def _bn_parts(gm, bn: fx.Node):
    """(output getitem node, scale, shift) of an inference BatchNorm with constant stats."""
    x, w, b, mean, var = bn.args[:5]
    eps = bn.args[6] if len(bn.args) > 6 else bn.kwargs.get("eps", 1e-5)
    if not all(a is None or is_constant(a) for a in (w, b)) or not all(
            is_constant(a) for a in (mean, var)):
        return None
    users = list(bn.users)
    if len(users) != 1 or users[0].target is not __import__("operator").getitem \
            or users[0].args[1] != 0:
        return None
    mean_v, var_v = constant_value(gm, mean), constant_value(gm, var)
    gamma = constant_value(gm, w) if w is not None else torch.ones_like(mean_v)
    beta = constant_value(gm, b) if b is not None else torch.zeros_like(mean_v)
    scale = gamma / torch.sqrt(var_v + eps)
    return users[0], scale, beta - mean_v * scale


def fold_batchnorm(gm: fx.GraphModule) -> int:
    count = 0
    for bn in list(gm.graph.nodes):
        if bn.op != "call_function" or bn.target is not BN:
            continue
        producer = bn.args[0]
        if not isinstance(producer, fx.Node) or len(producer.users) != 1:
            continue
        parts = _bn_parts(gm, bn)
        if parts is None:
            continue
        if producer.target is aten.convolution.default and _fold_into_conv(gm, producer, parts):
            count += 1
        elif producer.target in (aten.addmm.default, aten.mm.default) and _fold_into_mm(
                gm, producer, parts):
            count += 1
    return count


def _fold_into_conv(gm, conv: fx.Node, parts) -> bool:
    out, scale, shift = parts
    x, w, b = conv.args[:3]
    transposed = conv.args[6]
    if transposed or not is_constant(w) or (b is not None and not is_constant(b)):
        return False
    weight = constant_value(gm, w)
    bias = constant_value(gm, b) if b is not None else torch.zeros(weight.shape[0])
    with torch.no_grad():
        new_w = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
        new_b = bias * scale + shift
    args = list(conv.args)
    args[1] = add_constant(gm, new_w, conv, "conv_w")
    args[2] = add_constant(gm, new_b, conv, "conv_b")
    conv.args = tuple(args)
    out.replace_all_uses_with(conv)
    _erase_bn(gm, out)
    return True


def _fold_into_mm(gm, mm: fx.Node, parts) -> bool:
    out, scale, shift = parts
    if mm.target is aten.addmm.default:
        b, x, wt = mm.args[:3]
        if mm.kwargs or not is_constant(b):
            return False
        bias = constant_value(gm, b)
    else:
        x, wt = mm.args[:2]
        bias = None
    if not is_constant(wt):
        return False
    weight_t = constant_value(gm, wt)  # [in, out]
    if weight_t.dim() != 2 or weight_t.shape[1] != scale.numel():
        return False
    bias = bias if bias is not None else torch.zeros(weight_t.shape[1])
    with torch.no_grad():
        new_wt = weight_t * scale.reshape(1, -1)
        new_b = bias * scale + shift
    nb = add_constant(gm, new_b, mm, "mm_b")
    nw = add_constant(gm, new_wt, mm, "mm_w")
    mm.target = aten.addmm.default
    mm.args = (nb, x, nw)
    mm.kwargs = {}
    out.replace_all_uses_with(mm)
    _erase_bn(gm, out)
    return True


def _erase_bn(gm, getitem: fx.Node) -> None:
    bn = getitem.args[0]
    gm.graph.erase_node(getitem)
    if not bn.users:
        gm.graph.erase_node(bn)
