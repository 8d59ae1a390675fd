"""Learned per-kernel refinement of the cost model: boosted trees that correct each kernel.

Part of the learned cost model (``hwopt.cost_learned``, which blends it with its subgraph-level
trees). Where the subgraph trees see one feature vector per subgraph, this model sees every
kernel the subgraph lowers to (``hwopt.cost_fusion``): its class, FLOPs, bytes per memory
level, GEMM shape, lane use, the shapes of the tensor it reads and writes (a transpose's cost
depends on its channel count, not only its bytes) and the calibrated roofline's own latency
for it. A subgraph's latency is ``call overhead + sum_k roofline_k * exp(g(kernel_k))``, and the
trees g are fitted by functional gradient boosting on the log of the measured subgraph
latency: each round fits one regression tree to every kernel's share of its subgraph's error.
Trees are stored as plain JSON and evaluated without scikit-learn (which only fits them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from hwopt.cost_learned import CLASSES, _per_kernel
from hwopt.cost_ops import ELEMENT_FLOPS, base_name

KERNEL_FEATURES = ("cls", "log_flops", "log_bytes", "lvl0_log_bytes", "lvl1_log_bytes",
                   "lvl2_log_bytes", "lvl3_log_bytes", "log_gemm_m", "log_gemm_k", "log_gemm_n",
                   "window", "log_row_bytes", "lane_use", "log_compute_over_memory",
                   "log_roofline_s", "parallel", "n_reads", "n_writes", "n_mod_16", "m_mod_6",
                   "log_work", "n_kernels", "integer", "log_in_last_dim", "log_in_channels",
                   "log_in_spatial", "in_last_mod_16", "log_out_last_dim", "out_last_mod_16",
                   "in_rank", "log_rows", "log_reduce_ratio", "log_out_elems", "heavy_ops",
                   "libm_ops", "n_nodes", "log_gemm_batch", "log_gemm_m1", "m_mod_16",
                   "k_mod_16", "n_mod_32")


def _log(x: float) -> float:
    return math.log(max(float(x), 0.0) + 1.0)


def _shape(key) -> list:
    """Shape of the tensor a kernel reads or writes (keys may be tagged: ("nhwc", node)); of
    the first output of a node with several (native_layer_norm's normalized tensor)."""
    if isinstance(key, tuple):
        key = key[-1]
    val = getattr(key, "meta", {}).get("val") if key is not None else None
    if isinstance(val, (tuple, list)):
        val = next((v for v in val if isinstance(v, torch.Tensor)), None)
    return [int(s) for s in val.shape] if isinstance(val, torch.Tensor) else []


def _ops(k) -> list[float]:
    """Element-wise ops of a kernel that are more than an instruction: vectorized polynomials
    (exp, tanh, gelu: >= 20 FLOP equivalents) and scalar libm calls (sigmoid, silu, log)."""
    cost = [ELEMENT_FLOPS.get(base_name(n), 1) for n in k.nodes]
    return [float(sum(c >= 20 for c in cost)), float(sum(c >= 150 for c in cost)),
            float(len(cost))]


def kernel_rows(roof, kernels, terms=None) -> tuple[list[list[float]], list[float]]:
    """(feature rows, roofline latency s) of each kernel of a subgraph under `roof`
    (`terms`: ``roof.kernel_terms(kernels)`` when the caller has them already)."""
    rows, base = [], []
    terms = terms if terms is not None else roof.kernel_terms(kernels)
    for t in terms:
        k, pk = t["kernel"], _per_kernel(roof, t)
        w = k.work
        b, m, kk, n = (float(x) for x in w.gemm) if w.gemm is not None else (0, 0, 0, 0)
        lb = ([0.0] * 4 + pk["lb"])[-4:]
        ins = _shape(k.reads[0].key) if k.reads else []
        outs = _shape(k.writes[0][0]) if k.writes else []
        last, wl = (ins[-1] if ins else 0), (outs[-1] if outs else 0)
        n_in, n_out = math.prod(ins) if ins else 0, math.prod(outs) if outs else 0
        rows.append([
            float(CLASSES.index(t["cls"])) if t["cls"] in CLASSES else -1.0,
            _log(float(t["flops"])), _log(float(t["bytes"])), *[_log(x) for x in lb],
            _log(b * m), _log(kk), _log(n), float(w.window), _log(float(w.row_bytes or 0)),
            float(t["util"]),
            math.log(max(pk["comp"], 1e-12) / max(pk["mem"], 1e-12)),
            math.log(max(pk["lat"], 1e-12)), float(pk["parallel"]), float(len(k.reads)),
            float(len(k.writes)), float(n % 16) if n else -1.0, float(m % 6) if m else -1.0,
            _log(float(t["work"])), float(len(terms)), float(t["dtype"] != "float32"),
            _log(last), _log(ins[1] if len(ins) == 4 else 0),
            _log(ins[2] * ins[3] if len(ins) == 4 else 0), float(last % 16) if last else -1.0,
            _log(wl), float(wl % 16) if wl else -1.0, float(len(ins)),
            _log(n_in / last if last else 0), _log(n_in / n_out if n_out else 0), _log(n_out),
            *_ops(k), _log(b), _log(m), float(m % 16) if m else -1.0,
            float(kk % 16) if kk else -1.0, float(n % 32) if n else -1.0])
        base.append(pk["lat"])
    return rows, base


def _tree_value(tr: dict, x: list[float]) -> float:
    i = 0
    while tr["l"][i] != -1:
        i = tr["l"][i] if x[tr["f"][i]] <= tr["t"][i] else tr["r"][i]
    return tr["v"][i]


@dataclass
class KernelModel:
    """Boosted trees g over kernel features: kernel latency = roofline's * exp(g)."""

    learning_rate: float
    trees: list
    call_overhead_s: float = 0.0
    feature_names: tuple = KERNEL_FEATURES
    meta: dict = field(default_factory=dict)

    def latency(self, roof, kernels, terms=None) -> float:
        rows, base = kernel_rows(roof, kernels, terms)
        return self.call_overhead_s + sum(
            b * math.exp(self.learning_rate * sum(_tree_value(t, x) for t in self.trees))
            for x, b in zip(rows, base))

    def to_json(self) -> dict:
        return {"learning_rate": self.learning_rate, "trees": self.trees,
                "call_overhead_s": self.call_overhead_s, "features": list(self.feature_names),
                "meta": self.meta}

    @classmethod
    def from_json(cls, m: dict) -> "KernelModel":
        if tuple(m["features"]) != KERNEL_FEATURES:
            raise ValueError("kernel feature set differs from this hwopt version; retrain it")
        return cls(float(m["learning_rate"]), list(m["trees"]), float(m["call_overhead_s"]),
                   tuple(m["features"]), dict(m.get("meta", {})))


def _tree_json(est) -> dict:
    t = est.tree_
    return {"f": [int(v) for v in t.feature], "t": [float(v) for v in t.threshold],
            "l": [int(v) for v in t.children_left], "r": [int(v) for v in t.children_right],
            "v": [float(v) for v in t.value[:, 0, 0]]}


def train_kernels(roof, samples: list, n_trees: int = 300, max_depth: int = 5,
                  learning_rate: float = 0.1, clip: float = 0.5, seed: int = 0) -> KernelModel:
    """Fit on `samples` = [(kernels, measured latency s), ...] (needs scikit-learn).

    Each round: r = log(predicted) - log(measured) per subgraph (clipped to +-`clip`, a Huber
    loss), and one tree fitted to -r on every kernel, weighted by the kernel's share of its
    subgraph's predicted latency (the gradient of the loss in that kernel's log factor).
    """
    import numpy as np
    from sklearn.tree import DecisionTreeRegressor

    rows, sid, base = [], [], []
    for i, (ks, _) in enumerate(samples):
        r, b = kernel_rows(roof, ks)
        rows += r
        base += b
        sid += [i] * len(r)
    xs, sid, base = np.array(rows, dtype=float), np.array(sid), np.array(base)
    y = np.log([lat for _, lat in samples])
    call = float(roof.call_overhead_s)
    rng, g, trees = np.random.default_rng(seed), np.zeros(len(xs)), []
    for it in range(n_trees):
        part = base * np.exp(g)
        total = np.zeros(len(samples))
        np.add.at(total, sid, part)
        total += call
        resid = np.clip(np.log(total) - y, -clip, clip)
        keep = (rng.random(len(samples)) < 0.8)[sid]  # subsample subgraphs, as in GBT
        tree = DecisionTreeRegressor(max_depth=max_depth, min_samples_leaf=5, random_state=it)
        tree.fit(xs[keep], -resid[sid][keep], sample_weight=(part / total[sid])[keep] + 1e-3)
        trees.append(_tree_json(tree))
        g += learning_rate * tree.predict(xs)
    return KernelModel(learning_rate, trees, call,
                       meta={"samples": len(samples), "kernels": len(xs), "n_trees": n_trees,
                             "max_depth": max_depth})
