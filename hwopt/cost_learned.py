"""Learned refinement of the cost model: gradient-boosted trees over graph features.

Trained on measured subgraphs (``hwopt.cost_calibrate``, ``benchmarks/bench_cost_model.py``):
features of a subgraph's kernels (FLOPs, bytes per memory level, op-class counts, GEMM shapes,
arithmetic intensity, and the roofline's own prediction) -> log latency. The trees learn the
correction ``log(measured) - log(roofline prediction)``, so the prediction is the roofline's
times the learned factor and stays sensible outside the shapes seen in training. A second set
of trees corrects each kernel on its own (``hwopt.cost_learned_kernels``); the two predictions
are blended (geometric mean weighted by ``blend``): on the 402 held-out subgraphs of
``benchmarks/bench_cost_model.py`` (Zen 5 host, two seeds) the subgraph trees alone reached
11.4 % MAPE, the kernel trees alone 9.2 %, blends of 0.1-0.2 9.1 %, 0.3 9.2 %, 0.5 9.7 %.

scikit-learn fits the trees (the ``models`` extra); they are stored as plain JSON (thresholds,
children, leaf values) per machine next to the calibration and evaluated here without sklearn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone

from hwopt.cost_machine import FORMAT, cost_file, machine_key, write_json

CLASSES = ("conv", "dwconv", "matmul", "bmm", "reduction", "softmax", "norm", "elementwise",
           "gather", "layout", "to_nhwc", "to_nchw")
FEATURES = (("log_pred", "log_flops", "log_bytes", "log_intensity", "n_kernels",
             "log_compute_s", "log_memory_s", "compute_bound_share", "serial_kernels",
             "log_gemm_m", "log_gemm_k", "log_gemm_n", "tile_waste", "lane_use", "log_window",
             "log_max_row_bytes", "odd_rows",
             "log_top_kernel_bytes", "top_kernel_share", "top_class", "top_log_m", "top_log_k",
             "top_log_n", "top_lane_use", "top_log_row_bytes", "top_compute_bound")
            + tuple(f"lvl{i}_log_bytes" for i in range(4))
            + tuple(f"n_{c}" for c in CLASSES)
            + tuple(f"time_share_{c}" for c in CLASSES))


def _log(x: float) -> float:
    return math.log(max(float(x), 0.0) + 1.0)


def _per_kernel(roof, t) -> dict:
    """Compute and memory seconds of one kernel term, its latency and whether it runs parallel."""
    lb = [float(b) for b in t["level_bytes"]]
    comp = float(t["flops"]) / (roof.peak(t["dtype"]) * roof.efficiency.get(t["cls"], 0.1)
                                * float(t["util"]))
    mem = max(b / (lv[2] * roof.mem_efficiency.get(t["cls"], 1.0))
              for b, lv in zip(lb, roof.levels()))
    parallel = roof.cores <= 1 or float(t["work"]) >= roof.parallel_min_work
    lat = float(roof.latency_of(max(comp, mem), float(t["work"])))
    return {"comp": comp, "mem": mem, "lat": lat, "parallel": parallel, "lb": lb}


def _gemm(roof, terms) -> list[float]:
    """log M, log K, log N, register-tile padding waste, lane use and log window of the largest
    GEMM-like kernel."""
    big = max((t for t in terms if t["kernel"].work.gemm is not None),
              key=lambda t: float(t["flops"]), default=None)
    if big is None:
        return [0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    b, m, k, n = (float(x) for x in big["kernel"].work.gemm)
    tm, tn = roof.reg_tile
    waste = math.ceil(m / tm) * tm * math.ceil(n / tn) * tn / max(m * n, 1) - 1
    return [_log(b * m), _log(k), _log(n), waste, float(big["util"]),
            _log(float(big["kernel"].work.window))]


def _top(t, k) -> list[float]:
    """The dominant kernel: class (index in `CLASSES`), GEMM shape, lane use, row length."""
    if k is None:
        return [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    w = t["kernel"].work
    b, m, kk, n = (float(x) for x in w.gemm) if w.gemm is not None else (0, 0, 0, 0)
    cls = float(CLASSES.index(t["cls"])) if t["cls"] in CLASSES else -1.0
    return [cls, _log(b * m), _log(kk), _log(n), float(t["util"]), _log(float(w.row_bytes)),
            float(k["comp"] >= k["mem"])]


def features(roof, kernels, cost=None, terms=None) -> list[float]:
    """Feature vector (see `FEATURES`) of a subgraph's kernels under roofline `roof`."""
    terms = terms if terms is not None else roof.kernel_terms(kernels)
    cost = cost or roof.kernels_cost(kernels)
    ks = [_per_kernel(roof, t) for t in terms]
    total = sum(k["lat"] for k in ks) or 1.0
    lvl = [0.0] * 4
    for k in ks:
        for i, b in enumerate(k["lb"][-4:]):
            lvl[i + 4 - min(len(k["lb"]), 4)] += b
    share = {c: 0.0 for c in CLASSES}
    for t, k in zip(terms, ks):
        share[t["cls"]] = share.get(t["cls"], 0.0) + k["lat"] / total
    top = max(range(len(ks)), key=lambda i: ks[i]["lat"], default=None)
    rows = [float(t["kernel"].work.row_bytes) for t in terms if t["kernel"].work.row_bytes]
    lanes_bytes = 4 * max(getattr(roof, "lanes", 1), 1)
    flops, nbytes = float(cost.flops), float(cost.bytes_moved)
    return ([math.log(max(float(cost.latency_s), 1e-12)), _log(flops), _log(nbytes),
             _log(flops / max(nbytes, 1.0)), float(len(terms)),
             _log(sum(k["comp"] for k in ks) * 1e9), _log(sum(k["mem"] for k in ks) * 1e9),
             sum(k["lat"] for k in ks if k["comp"] >= k["mem"]) / total,
             float(sum(not k["parallel"] for k in ks))]
            + _gemm(roof, terms)
            + [_log(max(rows, default=0)), float(any(r % lanes_bytes for r in rows)),
               _log(float(terms[top]["bytes"])) if top is not None else 0.0,
               ks[top]["lat"] / total if top is not None else 0.0]
            + (_top(terms[top], ks[top]) if top is not None else _top(None, None))
            + [_log(b) for b in lvl]
            + [float(sum(t["cls"] == c for t in terms)) for c in CLASSES]
            + [share[c] for c in CLASSES])


@dataclass
class LearnedModel:
    """Boosted regression trees predicting log(measured / roofline) latency."""

    init: float
    learning_rate: float
    trees: list  # each {"f": [...], "t": [...], "l": [...], "r": [...], "v": [...]}
    feature_names: tuple = FEATURES
    meta: dict = field(default_factory=dict)
    kernel_model: object = None  # hwopt.cost_learned_kernels.KernelModel, or None
    blend: float = 0.15  # weight of the subgraph trees when there is a kernel model

    def log_ratio(self, x: list[float]) -> float:
        out = self.init
        for tr in self.trees:
            i = 0
            while tr["l"][i] != -1:
                i = tr["l"][i] if x[tr["f"][i]] <= tr["t"][i] else tr["r"][i]
            out += self.learning_rate * tr["v"][i]
        return out

    def refine(self, roof, kernels, cost) -> float:
        """Latency (s) of a subgraph: the roofline's, corrected by the trees."""
        terms = roof.kernel_terms(kernels)  # shared by both sets of trees
        sub = float(cost.latency_s) * math.exp(
            self.log_ratio(features(roof, kernels, cost, terms)))
        if self.kernel_model is None or not kernels:
            return sub
        per_kernel = self.kernel_model.latency(roof, kernels, terms)
        return math.exp(self.blend * math.log(max(sub, 1e-12))
                        + (1 - self.blend) * math.log(max(per_kernel, 1e-12)))

    def to_json(self) -> dict:
        out = {"init": self.init, "learning_rate": self.learning_rate, "trees": self.trees,
               "features": list(self.feature_names), "meta": self.meta, "blend": self.blend}
        if self.kernel_model is not None:
            out["kernel_model"] = self.kernel_model.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict) -> "LearnedModel":
        m = data.get("model", data)
        if tuple(m["features"]) != FEATURES:
            raise ValueError("feature set differs from this hwopt version; retrain it")
        kernel_model = None
        if m.get("kernel_model") is not None:
            from hwopt.cost_learned_kernels import KernelModel

            kernel_model = KernelModel.from_json(m["kernel_model"])
        return cls(float(m["init"]), float(m["learning_rate"]), list(m["trees"]),
                   tuple(m["features"]), dict(m.get("meta", {})), kernel_model,
                   float(m.get("blend", 0.15)))


def train(roof, samples: list, n_estimators: int = 300, max_depth: int = 3,
          learning_rate: float = 0.05, seed: int = 0, per_kernel: bool = True) -> LearnedModel:
    """Fit on `samples` = [(kernels, measured latency s), ...] (needs scikit-learn); with
    `per_kernel` also the per-kernel trees (``hwopt.cost_learned_kernels``)."""
    import numpy as np
    from sklearn.ensemble import GradientBoostingRegressor

    xs = np.array([features(roof, k) for k, _ in samples], dtype=float)
    ys = np.array([math.log(lat) for _, lat in samples]) - xs[:, 0]
    gbr = GradientBoostingRegressor(loss="huber", n_estimators=n_estimators, max_depth=max_depth,
                                    learning_rate=learning_rate, subsample=0.8,
                                    min_samples_leaf=3, random_state=seed)
    gbr.fit(xs, ys)
    trees = []
    for est in gbr.estimators_[:, 0]:
        t = est.tree_
        trees.append({"f": [int(v) for v in t.feature], "t": [float(v) for v in t.threshold],
                      "l": [int(v) for v in t.children_left],
                      "r": [int(v) for v in t.children_right],
                      "v": [float(v) for v in t.value[:, 0, 0]]})
    init = float(gbr.init_.predict(xs[:1])[0]) if hasattr(gbr.init_, "predict") else 0.0
    kernel_model = None
    if per_kernel:
        from hwopt.cost_learned_kernels import train_kernels

        kernel_model = train_kernels(roof, samples, seed=seed)
    return LearnedModel(init, learning_rate, trees,
                        meta={"samples": len(samples), "n_estimators": n_estimators,
                              "max_depth": max_depth}, kernel_model=kernel_model)


def save_learned(model: LearnedModel, target: str = "cpu", cache_dir=None, key=None) -> str:
    data = {"format": FORMAT, "kind": "learned", "target": target, "machine": key or machine_key(),
            "created": datetime.now(timezone.utc).isoformat(), "model": model.to_json()}
    return str(write_json(cost_file("learned", target, cache_dir, key), data))
