"""Property testing for graph rewrites: hypothesis strategies for random models and graphs, and a
checker that a pass keeps a graph's meaning.

Users test their own pass in a few lines::

    from hypothesis import given
    from hwopt.testing import graphs, assert_equivalent

    @given(graphs())
    def test_my_pass(case):
        assert_equivalent(case, my_pass)

`models()` draws small `nn.Module`s (conv, depthwise conv, linear, batch/layer norm, activations,
residual adds, pooling, reshape/permute, attention) with an example input; `graphs()` captures them
into the core-ATen FX form that passes see (hwopt.capture, weights as get_attr constants).
`assert_equivalent` runs the pass on a copy and compares outputs on the example and on fresh random
inputs, within the pass's declared bound; hypothesis then shrinks a failure to a minimal model.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

__all__ = ["Case", "graphs", "models", "assert_equivalent", "LOSSLESS_RTOL"]

LOSSLESS_RTOL = 1e-4  # relative to the output's range: fp32 reassociation, not a real change
ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "silu": nn.SiLU,
        "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "hardswish": nn.Hardswish}


@dataclass
class Case:
    """A drawn model or graph with its example inputs. `layers` says what was drawn."""

    module: nn.Module
    inputs: tuple
    layers: list = field(default_factory=list)

    def __repr__(self) -> str:  # what hypothesis prints for a (shrunk) failing example
        shapes = [tuple(x.shape) for x in self.inputs]
        return f"Case(layers={self.layers}, inputs={shapes})"


def _randomize(m: nn.Module, seed: int) -> nn.Module:
    """Non-trivial norm statistics, so that folding them is really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = mod.num_features
                mod.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                mod.weight.copy_(torch.randn(n, generator=g))
                mod.bias.copy_(torch.randn(n, generator=g))
            if isinstance(mod, nn.LayerNorm):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g))
    return m.eval()


class _Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class _Scale(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x):
        return x * self.value


class _Attention(nn.Module):
    """Self-attention written out: split heads, QK^T * scale (+ causal mask), softmax, PV."""

    def __init__(self, dim: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        if self.causal:
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        y = (F.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(b, n, d)
        return self.out(y)


class _Pool(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "max":
            return F.max_pool2d(x, 2, ceil_mode=True)
        return F.avg_pool2d(x, 2, ceil_mode=True) if min(x.shape[-2:]) >= 2 else x


class _Head(nn.Module):
    """Flatten (N, C, H, W) -> (N, C*H*W) -> linear: the usual end of a CNN."""

    def __init__(self, features: int, classes: int):
        super().__init__()
        self.fc = nn.Linear(features, classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _image_layer(draw, c: int, hw: tuple[int, int]):
    """One drawn layer for (N, C, H, W) activations: (module, description, new c, new hw)."""
    kind = draw(st.sampled_from(["conv", "conv", "depthwise", "bn", "act", "residual", "pool",
                                 "scale"]))
    if kind in ("conv", "depthwise"):
        k, stride = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 1, 2]))
        cout = c * draw(st.integers(1, 2)) if kind == "depthwise" else draw(st.integers(1, 12))
        groups = c if kind == "depthwise" else 1
        conv = nn.Conv2d(c, cout, k, stride, k // 2, groups=groups, bias=draw(st.booleans()))
        hw = tuple((s + 2 * (k // 2) - k) // stride + 1 for s in hw)
        return conv, f"{kind}{k}x{k}/{stride} {c}->{cout}", cout, hw
    if kind == "bn":
        return nn.BatchNorm2d(c), "batchnorm", c, hw
    if kind == "act":
        name = draw(st.sampled_from(sorted(ACTS)))
        return ACTS[name](), name, c, hw
    if kind == "residual":
        body = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c), nn.ReLU())
        return _Residual(body), "residual(conv3x3-bn-relu)", c, hw
    if kind == "pool":
        pk = draw(st.sampled_from(["max", "avg"]))
        return _Pool(pk), f"{pk}pool2", c, tuple(-(-s // 2) for s in hw)
    value = draw(st.sampled_from([0.5, -1.0, 2.0]))
    return _Scale(value), f"scale{value}", c, hw


def _sequence_layer(draw, d: int):
    kind = draw(st.sampled_from(["linear", "layernorm", "act", "attention", "mlp", "scale"]))
    if kind == "linear":
        return nn.Linear(d, d, bias=draw(st.booleans())), "linear"
    if kind == "layernorm":
        return nn.LayerNorm(d), "layernorm"
    if kind == "act":
        name = draw(st.sampled_from(["gelu", "relu", "silu", "tanh"]))
        return ACTS[name](), name
    if kind == "attention":
        heads = draw(st.sampled_from([h for h in (1, 2, 4) if d % h == 0]))
        causal = draw(st.booleans())
        return _Residual(_Attention(d, heads, causal)), f"attention(h={heads},causal={causal})"
    if kind == "mlp":
        return _Residual(nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))), "mlp"
    return _Scale(0.5), "scale0.5"


@st.composite
def models(draw, max_layers: int = 5, kinds: tuple[str, ...] = ("image", "sequence")) -> Case:
    """A small random model and its example input (`Case`)."""
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2**16))
    n_layers = draw(st.integers(1, max_layers))
    layers, names = [], []
    if kind == "image":
        c, hw = draw(st.integers(1, 6)), (draw(st.integers(4, 12)), draw(st.integers(4, 12)))
        shape = (draw(st.integers(1, 2)), c, *hw)
        for _ in range(n_layers):
            m, name, c, hw = _image_layer(draw, c, hw)
            layers.append(m), names.append(name)
        if draw(st.booleans()):
            layers.append(_Head(c * hw[0] * hw[1], draw(st.integers(1, 10))))
            names.append("flatten-linear")
    else:
        d = draw(st.sampled_from([4, 8, 12, 16]))
        shape = (draw(st.integers(1, 2)), draw(st.integers(1, 9)), d)
        for _ in range(n_layers):
            m, name = _sequence_layer(draw, d)
            layers.append(m), names.append(name)
    torch.manual_seed(seed)
    module = _randomize(nn.Sequential(*layers), seed)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return Case(module, (x,), names)


@st.composite
def graphs(draw, max_layers: int = 5, kinds: tuple[str, ...] = ("image", "sequence")) -> Case:
    """A random model captured to the core-ATen FX GraphModule that passes receive."""
    from hwopt.capture import from_module

    case = draw(models(max_layers=max_layers, kinds=kinds))
    cap = from_module(case.module, case.inputs)
    return Case(cap.gm, tuple(cap.example_inputs), case.layers)


def _flat(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flat(v)]
    return []


def _as_graph(case_or_gm, inputs):
    if isinstance(case_or_gm, Case):
        inputs = case_or_gm.inputs if inputs is None else inputs
        case_or_gm = case_or_gm.module
    if not isinstance(case_or_gm, fx.GraphModule):
        from hwopt.capture import from_module

        cap = from_module(case_or_gm, tuple(inputs))
        return cap.gm, tuple(cap.example_inputs)
    return case_or_gm, tuple(inputs)


def assert_equivalent(case_or_gm, pass_, inputs=None, *, tol: float | None = None,
                      ctx=None, trials: int = 3, seed: int = 0):
    """Run `pass_` on a copy of the graph and check it computes the same function.

    Outputs are compared on the example inputs and `trials` fresh random inputs of the same
    shapes. A lossless pass is held to `tol` (default ``LOSSLESS_RTOL``) as max |error| relative
    to each output's range; a lossy pass to `tol` (default: its declared tolerance) as
    ``hwopt.pass_base.relative_error`` (relative RMS error, the measure the compiler enforces).
    Returns the `PassResult`; raises AssertionError showing the graph before and after.
    """
    from hwopt.pass_base import PassContext, get_pass, relative_error
    from hwopt.target import get_target

    gm, inputs = _as_graph(case_or_gm, inputs)
    if isinstance(pass_, str) or hasattr(pass_, "hwopt_pass_name"):
        pass_ = get_pass(getattr(pass_, "hwopt_pass_name", pass_))
    lossless = getattr(pass_, "lossless", True)
    if tol is None:
        tol = LOSSLESS_RTOL if lossless else (getattr(pass_, "tolerance", None) or LOSSLESS_RTOL)
    g = torch.Generator().manual_seed(seed)
    batches = [inputs] + [tuple(torch.randn(x.shape, generator=g).to(x.dtype)
                                if x.is_floating_point() else x for x in inputs)
                          for _ in range(trials)]
    if ctx is None:
        ctx = PassContext(target=get_target("cpu"), example_inputs=inputs,
                          calibration=[b for b in batches[1:]] or [inputs], tolerance=tol)
    before = copy.deepcopy(gm)
    with torch.no_grad():
        result = pass_(copy.deepcopy(gm), ctx)
        after = result.graph_module
        for i, batch in enumerate(batches):
            want, got = _flat(before(*batch)), _flat(after(*batch))
            err = _worst_error(got, want) if lossless else relative_error(got, want)
            if err > tol:
                raise AssertionError(
                    f"pass {getattr(pass_, 'name', pass_)!r} changed the result on input set {i}: "
                    f"error {err:.3g} > tolerance {tol:.3g}\n"
                    f"--- before ---{before.code}\n--- after ---{after.code}")
    return result


def _worst_error(got: list, want: list) -> float:
    if len(got) != len(want):
        return float("inf")
    worst = 0.0
    for a, b in zip(got, want):
        if a.shape != b.shape or a.dtype != b.dtype:
            return float("inf")
        if not b.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(a, b) else float("inf"))
            continue
        if b.numel() == 0:
            continue
        finite = torch.isfinite(b)
        if not torch.equal(finite, torch.isfinite(a)):
            return float("inf")
        scale = max(float(b[finite].abs().max()) if finite.any() else 0.0, 1e-6)
        diff = (a[finite] - b[finite]).abs()
        worst = max(worst, float(diff.max()) / scale if diff.numel() else 0.0)
    return worst
