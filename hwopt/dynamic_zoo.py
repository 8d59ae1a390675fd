"""Dynamic model zoo: networks with data-dependent control flow, for tests and benchmarks.

Each case is a `DynCase`: a factory ``(small) -> (model.eval(), example inputs)``, inputs that take
each path (``variants``: name -> inputs), and whether hwopt.compile (torch.export) can capture it
(Python ``if`` on a tensor cannot; torch.compile can). `CASES` is a list other helpers extend
(early exit rows append their own cases). Used by benchmarks/bench_dynamic.py and
tests/passes/test_split.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from torch._higher_order_ops.while_loop import while_loop


class GatedMLP(nn.Module):
    """torch.cond on the input's mean: a wide or a cheap branch."""

    def __init__(self, d=64):
        super().__init__()
        self.wide = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.cheap = nn.Linear(d, d)

    def forward(self, x):
        y = torch.cond(x.mean() > 0, lambda x: self.wide(x), lambda x: self.cheap(x).relu(), (x,))
        return y + x


class Refine(nn.Module):
    """torch.while_loop: apply a block `steps` times (a tensor-dependent count)."""

    def __init__(self, d=64):
        super().__init__()
        self.block = nn.Linear(d, d)

    def forward(self, x, steps):
        def cond(i, h):
            return i < steps.sum()

        def body(i, h):
            return i + 1, torch.tanh(self.block(h)) + h

        _, h = while_loop(cond, body, (torch.zeros((), dtype=torch.int64), x))
        return h


class TopOneMoE(nn.Module):
    """Mixture of experts, top-1 routing, one dispatch per expert (data-dependent token counts)."""

    def __init__(self, d=64, experts=4, hidden=128):
        super().__init__()
        self.gate = nn.Linear(d, experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.GELU(),
                                                   nn.Linear(hidden, d)) for _ in range(experts))

    def forward(self, x):
        probs = self.gate(x).softmax(-1)
        # argmax + a column of probs, not max(-1) / gather / amax: hwopt's TVM build of gather
        # and max.dim fails (std::bad_alloc) and amax has no converter
        idx = probs.argmax(-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            sel = (idx == e).nonzero().squeeze(-1)
            y = expert(x.index_select(0, sel)) * probs[:, e].index_select(0, sel).unsqueeze(-1)
            out = out.index_add(0, sel, y)
        return out


class ExitCNN(nn.Module):
    """A CNN with an intermediate classifier: exit there (torch.cond) when it is confident."""

    def __init__(self, classes=10, threshold=0.5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1),
                                  nn.ReLU())
        self.head1 = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes))
        self.rest = nn.Sequential(nn.Conv2d(32, 64, 3, 1, 1), nn.ReLU(), nn.Conv2d(64, 64, 3, 1, 1),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(64, classes))
        self.threshold = threshold

    def forward(self, x):
        h = self.stem(x)
        early = self.head1(h)
        conf = early.softmax(-1).max()
        return torch.cond(conf > self.threshold, lambda h, e: e.clone(),
                          lambda h, e: self.rest(h), (h, early))


class PythonIf(nn.Module):
    """Python ``if`` on a tensor value: Dynamo graph-breaks; torch.export cannot capture it."""

    def __init__(self, d=64):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        if x.mean() > 0:
            return self.a(x).relu()
        return self.b(x).sigmoid()


class MaskedAttention(nn.Module):
    """One self-attention block over token ids with an attention mask (padding is safe)."""

    def __init__(self, vocab=100, d=32, heads=2):
        super().__init__()
        self.emb, self.heads = nn.Embedding(vocab, d), heads
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, ids, mask):
        x = self.emb(ids)
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5
        scores = scores + (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
        return self.norm(x + self.out(y))


class MeanPooled(nn.Module):
    """A mean over the sequence without a mask: padding would change it (unsafe)."""

    def __init__(self, vocab=100, d=32):
        super().__init__()
        self.emb, self.fc = nn.Embedding(vocab, d), nn.Linear(d, d)

    def forward(self, ids):
        return self.fc(self.emb(ids)).relu().mean(1)


@dataclass
class DynCase:
    name: str
    kind: str  # the control-flow kind it exercises
    make: Callable  # (small) -> (model, default inputs)
    variants: Callable  # (inputs) -> {path name: inputs}
    aot: bool = True  # torch.export can capture it (hwopt.compile)
    notes: str = ""
    extra: dict = field(default_factory=dict)


def _x(rows, d, scale=1.0):
    g = torch.Generator().manual_seed(rows * 1000 + d)
    return torch.randn(rows, d, generator=g) * scale


def _gated(small):
    d = 32 if small else 256
    return GatedMLP(d).eval(), (_x(8 if small else 64, d).abs(),)


def _refine(small):
    d = 32 if small else 256
    return Refine(d).eval(), (_x(8 if small else 64, d), torch.tensor(3))


def _moe(small):
    d = 32 if small else 256
    return TopOneMoE(d, 4, 2 * d).eval(), (_x(16 if small else 128, d),)


def _exit_cnn(small):
    torch.manual_seed(0)
    s = 16 if small else 64
    return ExitCNN().eval(), (torch.randn(1, 3, s, s),)


def _pyif(small):
    d = 32 if small else 256
    return PythonIf(d).eval(), (_x(8 if small else 64, d).abs(),)


class _Bert(nn.Module):
    def __init__(self, small):
        super().__init__()
        from transformers import BertConfig, BertModel

        cfg = BertConfig(hidden_size=64 if small else 256, num_hidden_layers=2 if small else 4,
                         num_attention_heads=4, intermediate_size=128 if small else 1024,
                         vocab_size=1000, attn_implementation="eager")
        self.bert = BertModel(cfg, add_pooling_layer=False)

    def forward(self, ids, mask=None):
        return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state


def _bert(small):
    torch.manual_seed(0)
    return _Bert(small).eval(), (torch.randint(0, 1000, (1, 32)),)


def _lengths(inputs):
    (ids,) = inputs
    return {f"len {n}": (ids[:, :n].contiguous(),) for n in (32, 24, 16)}


SEQ_RANGE = (16, 128)
SEQ_LENGTHS = (16, 23, 40, 64, 77, 100, 128)


def _bert_masked(small):
    torch.manual_seed(0)
    ids = torch.randint(1, 1000, (1, SEQ_RANGE[1]))
    return _Bert(small).eval(), (ids[:, :32], torch.ones(1, 32, dtype=torch.int64))


def _masked_lengths(inputs):
    g = torch.Generator().manual_seed(1)
    return {f"len {n}": (torch.randint(1, 1000, (1, n), generator=g),
                         torch.ones(1, n, dtype=torch.int64)) for n in SEQ_LENGTHS}


def _signs(inputs):
    (x,) = inputs
    return {"true": (x.abs(),), "false": (-x.abs(),)}


def _steps(inputs):
    x, _ = inputs
    return {"3 steps": (x, torch.tensor(3)), "0 steps": (x, torch.tensor(0))}


def _routing(inputs):
    (x,) = inputs
    return {"random": (x,), "skewed": (x * 4 + 1,)}


def _exits(inputs):
    (x,) = inputs
    return {"input": (x,), "scaled": (x * 20,)}


CASES: list[DynCase] = [
    DynCase("gated_mlp", "cond", _gated, _signs),
    DynCase("refine_loop", "while_loop", _refine, _steps),
    DynCase("moe_top1", "routing", _moe, _routing),
    DynCase("exit_cnn", "cond (exit head)", _exit_cnn, _exits),
    DynCase("python_if", "python if", _pyif, _signs, aot=False,
            notes="torch.compile only: graph break, each side compiled"),
    DynCase("bert_varlen", "dynamic shapes", _bert, _lengths, aot=False,
            notes="torch.compile, no mask: padding unsafe, one compile per length (<= "
                  "max_buckets)"),
    DynCase("bert_buckets", "dynamic shapes (buckets)", _bert_masked, _masked_lengths,
            notes="hwopt.compile with dynamic_shapes: padded to cost-model buckets",
            extra={"options": {"dynamic_shapes": ({1: SEQ_RANGE}, {1: SEQ_RANGE})}}),
    DynCase("bert_buckets_dynamo", "dynamic shapes (buckets)", _bert_masked, _masked_lengths,
            aot=False, notes="torch.compile + mark_dynamic(dim 1, min, max): buckets",
            extra={"mark_dynamic": {0: (1, *SEQ_RANGE), 1: (1, *SEQ_RANGE)}}),
]


def cases(names: str | None = None) -> list[DynCase]:
    if not names:
        return list(CASES)
    by = {c.name: c for c in CASES}
    missing = [n for n in names.split(",") if n not in by]
    if missing:
        raise KeyError(f"unknown dynamic case(s) {missing}; known: {', '.join(by)}")
    return [by[n] for n in names.split(",")]
