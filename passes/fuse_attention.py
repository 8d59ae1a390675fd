"""fuse, attention part: ``bmm -> [* scale] -> [+ mask] -> softmax(-1) -> bmm`` -> one op.

Part of the ``fuse`` pass (passes/fuse.py), on the canonical ATen graph. Eager attention in
``transformers`` (BERT, ViT, GPT-2 with ``attn_implementation="eager"``) decomposes into:

    q4, k4, v4: [B, H, S, D]
    bmm(view(expand(q4)), view(expand(permute(k4, [0, 1, 3, 2]))))  -> view [B, H, S, Sk]
    -> mul(scale) | div(c) -> add(mask) -> _softmax(-1) -> [clone] -> view(expand)
    -> bmm(., view(expand(v4))) -> view [B, H, S, Dv]

``torch.nn.functional.scaled_dot_product_attention`` (diffusers) decomposes into the same with
the scale split as ``q * sqrt(scale)`` and ``k^T * sqrt(scale)`` before the first bmm, and, when
there is no mask, a "safe softmax" guard after it (``where(all(scores == -inf, -1), 0, p)``,
which finite scores never trigger). `fuse_attention` replaces both by
``hwopt::attention(q4, k4, v4, mask, scale)``
(hwopt.lowering.attention). The match holds only when every intermediate has this one use (a
score or probability tensor that is also used elsewhere must stay), the softmax is over the last
axis in float32, the expands broadcast nothing and the mask broadcasts to the scores. The mask may
be a graph input (``attention_mask``): it is passed through unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_EXPAND = aten.expand.default


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _logical(node, shape: tuple):
    """The tensor of `shape` that `node` is a view of through reshapes and no-op expands."""
    while _shape(node) != shape:
        if _is(node, *_VIEWS, _EXPAND) and len(node.users) == 1:
            node = node.args[0]
            continue
        return None
    while _is(node, _EXPAND, aten.clone.default, *_VIEWS) and _shape(node.args[0]) == shape \
            and len(node.users) == 1:
        node = node.args[0]  # same-shape expand / view / clone: nothing to keep
    return node


def _scores_tail(bmm: fx.Node):
    """(score node of the attention's rank, scale, mask, softmax) after the first bmm, or None."""
    node, scale, mask = bmm, 1.0, None
    user = _single_user(node)
    if _is(user, *_VIEWS):
        node, user = user, _single_user(user)
    if _is(user, aten.mul.Tensor) and isinstance(user.args[1], (int, float)) \
            and user.args[0] is node:
        scale, node, user = float(user.args[1]), user, _single_user(user)
    elif _is(user, aten.div.Tensor) and isinstance(user.args[1], (int, float)) \
            and user.args[0] is node and user.args[1] != 0:
        scale, node, user = 1.0 / float(user.args[1]), user, _single_user(user)
    if _is(user, aten.add.Tensor) and not user.kwargs:
        other = user.args[1] if user.args[0] is node else user.args[0]
        if isinstance(other, fx.Node) and other is not node:
            mask, node, user = other, user, _single_user(user)
    if user is None and mask is None:  # scores also feed the safe-softmax guard
        user = next((u for u in node.users if _is(u, aten._softmax.default)), None)
    if not _is(user, aten._softmax.default) or user.args[2]:
        return None
    if len(node.users) > 1 and (mask is not None or _safe_guard(node, user) is None):
        return None
    return node, scale, mask, user


def _safe_guard(scores: fx.Node, softmax: fx.Node) -> fx.Node | None:
    """The ``where`` of SDPA's safe-softmax guard on `softmax`, when `scores` feed exactly that
    guard (eq -inf -> logical_not -> any(-1, keepdim) -> logical_not -> where(., 0, softmax))."""
    others = [u for u in scores.users if u is not softmax]
    if len(others) != 1 or not _is(others[0], aten.eq.Scalar) or others[0].args[1] != -math.inf:
        return None
    node = others[0]
    for target in (aten.logical_not.default, aten.any.dim, aten.logical_not.default):
        node = _single_user(node)
        if not _is(node, target):
            return None
    where = _single_user(node)
    if not _is(where, aten.where.self) or where.args[0] is not node or where.args[2] is not softmax:
        return None
    fill = where.args[1]
    if not _is(fill, aten.full_like.default) or fill.args[0] is not softmax or fill.args[1] != 0 \
            or len(fill.users) != 1 or set(softmax.users) != {fill, where}:
        return None
    return where


def _probs(softmax: fx.Node) -> fx.Node:
    """The softmax, or the safe-softmax guard's ``where`` around it."""
    if len(softmax.users) == 1:
        return softmax
    return _safe_guard(softmax.args[0], softmax) or softmax


def _prescaled(node: fx.Node | None) -> tuple:
    """(x, s) for ``x * s`` with a number s and one use (SDPA's split scale), else (node, 1)."""
    if _is(node, aten.mul.Scalar, aten.mul.Tensor) and isinstance(node.args[1], (int, float)) \
            and len(node.users) == 1:
        return node.args[0], float(node.args[1])
    return node, 1.0


def _probs_bmm(softmax: fx.Node):
    """The second bmm fed by the softmax (through clone / no-op expand / view), or None."""
    node = _single_user(_probs(softmax))
    while node is not None and _is(node, aten.clone.default, _EXPAND, *_VIEWS):
        if _is(node, _EXPAND) and _shape(node) != _shape(node.args[0]):
            return None
        node = _single_user(node)
    return node if _is(node, aten.bmm.default) else None


def _match(bmm: fx.Node):
    tail = _scores_tail(bmm)
    if tail is None:
        return None
    scores, scale, mask, softmax = tail
    ss = _shape(scores)
    rank = len(ss)
    if softmax.args[1] not in (-1, rank - 1) or _shape(softmax) != ss or \
            softmax.meta["val"].dtype != torch.float32:
        return None
    if mask is not None and not _broadcasts(_shape(mask), ss):
        return None
    bmm2 = _probs_bmm(softmax)
    if bmm2 is None or _logical(bmm2.args[0], ss) is not _probs(softmax):
        return None
    q_shape = _shape(bmm.args[0])
    q, sq = _prescaled(_logical(bmm.args[0], ss[:-1] + q_shape[-1:]))
    kt, sk = _prescaled(_logical(bmm.args[1], ss[:-2] + (q_shape[-1], ss[-1])))
    scale *= sq * sk
    dv = _shape(bmm2)[-1]
    v = _logical(bmm2.args[1], ss[:-2] + (ss[-1], dv))
    if q is None or kt is None or v is None:
        return None
    return q, kt, v, mask, scale, bmm2, ss[:-1] + (dv,)


def _broadcasts(mask_shape, shape) -> bool:
    if mask_shape is None or len(mask_shape) > len(shape):
        return False
    return all(m in (1, s) for m, s in zip(reversed(mask_shape), reversed(shape)))


def _key(graph: fx.Graph, kt: fx.Node) -> fx.Node:
    """k of ``k^T``: the permute's input when kt swaps the last two axes, else a transpose."""
    if _is(kt, aten.permute.default) and len(kt.users) == 1:
        perm = list(kt.args[1])
        n = len(perm)
        if perm == list(range(n - 2)) + [n - 1, n - 2]:
            return kt.args[0]
    with graph.inserting_after(kt):
        k = graph.call_function(aten.transpose.int, (kt, -2, -1))
    shape = list(_shape(kt))
    k.meta = {**kt.meta, "val": kt.meta["val"].new_empty(shape[:-2] + shape[-1:] + shape[-2:-1])}
    return k


def fuse_attention(gm: fx.GraphModule) -> int:
    """Rewrite every eager attention into ``hwopt::attention``; returns how many."""
    from hwopt.lowering import attention  # noqa: F401  (registers torch.ops.hwopt.attention)

    count = 0
    for node in list(gm.graph.nodes):
        if not _is(node, aten.bmm.default):
            continue
        m = _match(node)
        if m is None:
            continue
        q, kt, v, mask, scale, bmm2, out_shape = m
        k = _key(gm.graph, kt)
        out_view = _single_user(bmm2)
        with gm.graph.inserting_before(bmm2):
            att = gm.graph.call_function(torch.ops.hwopt.attention.default,
                                         (q, k, v, mask, scale))
            # Provenance (nn_module_stack, ...) stays: later passes find blocks by it.
            att.meta = {**bmm2.meta, "val": bmm2.meta["val"].new_empty(out_shape)}
        if _is(out_view, *_VIEWS) and _shape(out_view) == out_shape:
            out_view.replace_all_uses_with(att)
        else:
            with gm.graph.inserting_after(att):
                back = gm.graph.call_function(aten.view.default, (att, list(_shape(bmm2))))
            back.meta = dict(bmm2.meta)
            bmm2.replace_all_uses_with(back)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
    return count

