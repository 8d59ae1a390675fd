"""Subgraphs to measure: the model zoo cut into the regions hwopt compiles, and random op shapes.

Used by calibration (``hwopt.cost_calibrate``: random shapes of each op class) and by
``benchmarks/bench_cost_model.py`` (both). Each item is ``(name, GraphModule, example inputs)``
in hwopt's canonical form (ATen graph after capture and the ``fuse`` pass, ``meta['val']`` set).

Zoo models are cut at kernel boundaries (``hwopt.cost_fusion``): one kernel (conv+bn+relu,
linear, layernorm, softmax, ...), windows of consecutive kernels (linear+gelu, attention, a
residual block) and whole transformer layers; repeated layers with the same shapes count once.
"""
from __future__ import annotations

import random
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from hwopt.cost_fusion import graph_kernels
from hwopt.cost_measure import extract, signature


def canonical(model: nn.Module, inputs: tuple):
    """(GraphModule, inputs) as hwopt compiles them: captured, shapes known, ``fuse`` applied."""
    from hwopt.capture import from_module
    from hwopt.graph import propagate_meta
    from hwopt.pass_base import PassContext, get_pass
    from hwopt.target import get_target

    cap = from_module(model.eval(), inputs)
    propagate_meta(cap.gm, cap.example_inputs)
    ctx = PassContext(target=get_target("cpu"), example_inputs=cap.example_inputs)
    gm = get_pass("fuse")(cap.gm, ctx).graph_module
    propagate_meta(gm, cap.example_inputs)
    return gm, tuple(cap.example_inputs)


def _segments(gm) -> list[list]:
    """Runs of call_function nodes, each starting where a kernel of the whole graph starts."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    index = {n: i for i, n in enumerate(nodes)}
    starts = sorted({min(index[n] for n in k.nodes) for k in graph_kernels(gm) if k.nodes})
    if not starts:
        return []
    starts[0] = 0
    return [nodes[a:b] for a, b in zip(starts, starts[1:] + [len(nodes)])]


def zoo_subgraphs(model: nn.Module, inputs: tuple, prefix: str,
                  windows: tuple = (1, 2, 3, 5, 8), per_width: int = 8) -> Iterator[tuple]:
    """Kernel-level and multi-kernel windows of a model, distinct by shape and structure.

    Every single kernel is kept; of the wider windows, at most about `per_width` evenly spaced
    ones per width.
    """
    gm, _ = canonical(model, inputs)
    segs = _segments(gm)
    seen = set()
    for width in windows:
        starts = max(len(segs) - width + 1, 0)
        step = 1 if width == 1 else max(1, -(-starts // per_width))
        for i in range(0, starts, step):
            nodes = [n for s in segs[i:i + width] for n in s]
            if not _has_work(nodes):
                continue
            sub, ins = extract(gm, nodes)
            key = signature(sub, ins)
            if key in seen:
                continue
            seen.add(key)
            yield f"{prefix}/w{width}@{i}", sub, ins


def _has_work(nodes) -> bool:
    from hwopt.cost_ops import op_class

    return any(op_class(n) not in ("view", "other") for n in nodes)


# -- random shapes of the main op classes ---------------------------------------------------
class _Conv(nn.Module):
    def __init__(self, cin, cout, k, s, groups, act):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False)
        self.bn, self.act = nn.BatchNorm2d(cout), act

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class _Linear(nn.Module):
    def __init__(self, k, n, act):
        super().__init__()
        self.fc, self.act = nn.Linear(k, n), act

    def forward(self, x):
        return self.act(self.fc(x))


class _Fn(nn.Module):
    def __init__(self, fn, *params):
        super().__init__()
        self.fn, self.params = fn, nn.ParameterList([nn.Parameter(p) for p in params])

    def forward(self, *xs):
        return self.fn(*xs, *self.params)


def _pick(r: random.Random, xs):
    return xs[r.randrange(len(xs))]


def _conv(r, depthwise=False):
    c = _pick(r, (16, 32, 48, 64, 96, 128, 192, 256, 384, 512) if depthwise
              else (3, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256))
    cout = c if depthwise else _pick(r, (8, 16, 32, 48, 64, 96, 128, 160, 256))
    h = _pick(r, (7, 8, 14, 16, 28, 32, 56, 64, 112))
    k = _pick(r, (3, 5) if depthwise else (1, 3, 3, 3, 5))
    s = _pick(r, (1, 1, 2))
    act = _pick(r, (nn.ReLU(), nn.ReLU6(), nn.Identity()))
    m = _Conv(c, cout, k, s, c if depthwise else 1, act)
    return m, (torch.randn(_pick(r, (1, 1, 2)), c, h, h),)


def _linear(r):
    rows = _pick(r, (1, 4, 16, 32, 50, 64, 128, 197, 256, 512))
    k, n = _pick(r, (32, 64, 96, 128, 192, 256, 384, 512, 768, 1024)), _pick(
        r, (16, 32, 64, 128, 192, 256, 384, 512, 768, 1024))
    act = _pick(r, (nn.Identity(), nn.GELU(), nn.ReLU(), nn.Tanh()))
    return _Linear(k, n, act), (torch.randn(1, rows, k),)


def _bmm(r):
    b, m = _pick(r, (1, 2, 3, 4, 8, 12, 16)), _pick(r, (16, 32, 50, 64, 128, 197, 256))
    k, n = _pick(r, (16, 32, 48, 64, 128)), _pick(r, (16, 32, 64, 128, 197, 256))
    return _Fn(torch.bmm), (torch.randn(b, m, k), torch.randn(b, k, n))


def _rows(r):
    return _pick(r, (1, 8, 32, 64, 128, 197, 256, 512, 1024)), _pick(
        r, (16, 32, 64, 128, 197, 256, 384, 768, 1024, 3072))


def _softmax(r):
    rows, cols = _rows(r)
    return _Fn(lambda x: torch.softmax(x * 0.125, -1)), (torch.randn(rows, cols),)


def _layernorm(r):
    rows, cols = _rows(r)
    return nn.LayerNorm(cols), (torch.randn(1, rows, cols),)


def _reduction(r):
    c, h = _pick(r, (16, 64, 128, 256, 512)), _pick(r, (7, 14, 28, 56))
    return _Fn(lambda x: x.mean((2, 3))), (torch.randn(1, c, h, h),)


_ELEMENTWISE = (lambda x, y: x + y, lambda x, y: torch.relu(x * y + 1.0),
                lambda x, y: F.gelu(x) + y, lambda x, y: torch.tanh(x) * y,
                lambda x, y: torch.sigmoid(x) * x + y)


def _elementwise(r):
    rows, cols = _rows(r)
    fn = _pick(r, _ELEMENTWISE)
    return _Fn(fn), (torch.randn(rows, cols), torch.randn(rows, cols))


GENERATORS = {"conv": _conv, "dwconv": lambda r: _conv(r, True), "matmul": _linear,
              "bmm": _bmm, "softmax": _softmax, "norm": _layernorm, "reduction": _reduction,
              "elementwise": _elementwise}


def random_subgraphs(n: int, seed: int = 0, classes: tuple | None = None,
                     max_flops: float = 3e8) -> Iterator[tuple]:
    """`n` random single-op subgraphs, round-robin over op `classes` (default: all)."""
    from hwopt.cost_ops import node_flops

    r = random.Random(seed)
    classes = tuple(classes or GENERATORS)
    made, tries = 0, 0
    while made < n and tries < 20 * n:
        cls = classes[tries % len(classes)]
        tries += 1
        torch.manual_seed(r.randrange(1 << 30))
        model, inputs = GENERATORS[cls](r)
        gm, ins = canonical(model, inputs)
        flops = sum(float(node_flops(x)) for x in gm.graph.nodes if x.op == "call_function")
        if flops > max_flops:
            continue
        made += 1
        yield f"random/{cls}/{made}", gm, ins
