"""Benchmark of the early_exit pass: full compute vs early exit vs eager vs Inductor, one run.

Two models, both trained here in seconds (no weights are downloaded):

* cnn-exits: a 3-stage CNN with an exit head after each stage (BranchyNet-style: 4x4 average
  pool + linear; a global-mean head after the first stage cannot read a digit's shape, 9-38 %
  accuracy), trained jointly (sum of the heads' losses) on sklearn's load_digits (8x8 digits
  upsampled to 32x32); confidence exits. Quality: accuracy of the last output on the held-out
  split, early exit vs full compute.
* bert: BertForSequenceClassification from a transformers BertConfig, trained for a few hundred
  steps on a synthetic task (which of 4 keyword tokens occurs in a sequence of random filler
  tokens) with MuE's layer-wise task loss (the pooler and classifier applied to every layer's
  hidden state, losses summed), which is how MuE fine-tunes a model for similarity exits.
  Random weights are not used because their hidden states are not realistic: every layer
  changes the residual stream by the same small amount and no layer converges. Trained on the
  last layer's loss only, consecutive layers' states stay at cosine 0.90-0.94 and only ~5 % of
  block evaluations can be skipped at the quality target; with the layer-wise loss a solved
  sample's state stops changing after 2-3 blocks (cosine 0.98-0.997). Similarity exits;
  quality: mean per-sample cosine of the logits vs full compute, and accuracy.

The inputs are the held-out split, which the trained models find easy. Both compiled variants
come from hwopt.compile on the same model and example batch: "full" runs the target's default
pipeline, "exit" adds early_exit calibrated on a separate calibration split, not the training
data, on which the models are overconfident (quality target: agreement >= 0.99 for the CNN,
cosine >= 0.99 for BERT). All four are timed interleaved over the whole
held-out split (medians per batch); outputs are checked against eager. Exits non-zero only on a
crash, never on a slow figure.

    .venv/bin/python benchmarks/bench_early_exit.py [--models cnn,bert] [--batch 1,16]
        [--executor tvm|torch|auto] [--no-inductor]

The CNN's exit-head logits differ in scale from the final head's, so its relative-error bound is
loosened (tolerance 2.0) and agreement is the quality target; BERT keeps the pass's default bound.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hwopt.passes.early_exit_calibrate import quality  # noqa: E402

import hwopt  # noqa: E402
from hwopt.bench import environment, interleaved, pin_threads, table  # noqa: E402
from hwopt.exit_runtime import exit_stats  # noqa: E402


class ExitCNN(nn.Module):
    """Three conv stages, an exit head (pool + linear) after each; returns all heads' logits."""

    def __init__(self, widths=(32, 64, 128), classes=10, pool=4):
        super().__init__()
        chans = (1,) + tuple(widths)
        self.stages = nn.ModuleList(nn.Sequential(
            nn.Conv2d(chans[i], chans[i + 1], 3, padding=1), nn.ReLU(),
            nn.Conv2d(chans[i + 1], chans[i + 1], 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2) if i < 2 else nn.Identity()) for i in range(3))
        self.pool = pool
        self.heads = nn.ModuleList(nn.Linear(w * pool * pool, classes) for w in widths)

    def forward(self, x):
        outs = []
        for stage, head in zip(self.stages, self.heads):
            x = stage(x)
            outs.append(head(F.adaptive_avg_pool2d(x, self.pool).flatten(1)))
        return tuple(outs)


def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    tr, cal, te = perm[:1200], perm[1200:1400], perm[1400:]
    return x[tr], y[tr], x[cal], x[te], y[te]


def train(model, x, y, steps, lr, batch=64, loss_fn=None, forward=None):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        loss = loss_fn((forward or model)(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def cnn_task():
    torch.manual_seed(0)
    xtr, ytr, xcal, xte, yte = digits()
    model = train(ExitCNN(), xtr, ytr, 200, 2e-3,
                  loss_fn=lambda outs, y: sum(F.cross_entropy(o, y) for o in outs))
    cfg = {"metric": "agreement", "target": 0.99}
    return model, xcal, xte, yte, cfg, 2.0


class Bert(nn.Module):
    def __init__(self, layers=6, hidden=128, vocab=1000, classes=4):
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                         intermediate_size=4 * hidden, vocab_size=vocab, num_labels=classes,
                         max_position_embeddings=64, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
        self.m = BertForSequenceClassification(cfg)

    def forward(self, ids):
        return self.m(ids).logits

    def layer_logits(self, ids):
        """The classifier on every layer's hidden state (MuE's layer-wise task loss)."""
        hidden = self.m.bert(ids, output_hidden_states=True).hidden_states[1:]
        return [self.m.classifier(self.m.bert.pooler(h)) for h in hidden]


def keyword_data(n, seq=32, vocab=1000, classes=4, seed=0):
    """Filler tokens 10.. with one of `classes` keyword tokens (1..classes) at a random spot."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (n, seq), generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    pos = torch.randint(1, seq, (n,), generator=g)
    ids[torch.arange(n), pos] = y + 1
    return ids, y


def bert_task():
    torch.manual_seed(0)
    xtr, ytr = keyword_data(4096, seed=0)
    xte, yte = keyword_data(256, seed=1)
    xcal, _ = keyword_data(128, seed=2)
    model = Bert()
    model = train(model, xtr, ytr, 300, 1e-3, batch=32, forward=model.layer_logits,
                  loss_fn=lambda outs, y: sum(F.cross_entropy(o, y) for o in outs))
    return model, xcal, xte, yte, {"metric": "cosine", "target": 0.99}, None


def last(out):
    return out[-1] if isinstance(out, (tuple, list)) else out


def bench_one(name, task, batch, executor, inductor, n_test):
    model, xcal, xte, yte, cfg, tol = task
    n = min(len(yte), n_test) // batch * batch
    tests = [(xte[i:i + batch],) for i in range(0, n, batch)]
    calib = [(xcal[i:i + batch],) for i in range(0, len(xcal) // batch * batch, batch)]
    base = list(hwopt.get_pipeline("cpu")["passes"])
    common = dict(executor=executor, progress=False)
    t0 = time.perf_counter()
    full = hwopt.compile(model, tests[0], passes=base, **common)
    ee = hwopt.compile(model, tests[0], passes=base + ["early_exit"], calibration=calib,
                       pass_config={"early_exit": cfg}, tolerance=tol, **common)
    compile_s = time.perf_counter() - t0
    rec = next(r for r in ee.compiled.pass_records if r.name == "early_exit")
    fns = {"eager": model, "full": full, "exit": ee}
    if inductor:
        fns["inductor"] = torch.compile(model)
    with torch.no_grad():
        outs = {k: [f(*b) for b in tests] for k, f in fns.items()}
    for s in exit_stats(ee):
        s.reset()
    with torch.no_grad():
        [ee(*b) for b in tests]
    stats = exit_stats(ee)
    times = interleaved({k: (lambda f=f: [f(*b) for b in tests]) for k, f in fns.items()},
                        rounds=15, warmup=1, block=2, budget_s=60)
    y = yte[:n]

    def acc(k):
        return float((torch.cat([last(o) for o in outs[k]]).argmax(-1) == y).double().mean())

    ref = [tuple(o) if isinstance(o, tuple) else (o,) for o in outs["eager"]]
    got = [tuple(o) if isinstance(o, tuple) else (o,) for o in outs["exit"]]
    full_err = max(float((last(a) - last(b)).abs().max()) for a, b in zip(outs["full"],
                                                                           outs["eager"]))
    per = len(tests)
    row = {"model": name, "batch": batch, "eager_ms": 1e3 * times["eager"] / per,
           "full_ms": 1e3 * times["full"] / per, "exit_ms": 1e3 * times["exit"] / per,
           "exit/full": times.ratio("exit", "full"), "exit/eager": times.ratio("exit", "eager"),
           "skipped": f"{100 * stats[0].skipped_share:.0f}%" if stats else "-",
           "cosine": quality([(last(g),) for g in got], [(last(r),) for r in ref], "cosine"),
           "acc_full": acc("eager"), "acc_exit": acc("exit"), "full_err": full_err,
           "applied": rec.modified}
    if inductor:
        row["inductor_ms"] = 1e3 * times["inductor"] / per
        row["exit/inductor"] = times.ratio("exit", "inductor")
    note = rec.reverted or " | ".join(rec.notes)
    hist = stats[0].summary() if stats else "no cascade"
    return row, f"{name} batch {batch}: {note}\n#   held-out: {hist} (compile {compile_s:.0f}s)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="cnn,bert")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--executor", default="tvm", choices=("torch", "tvm", "auto"))
    ap.add_argument("--no-inductor", action="store_true")
    ap.add_argument("--n-test", type=int, default=128, help="held-out samples timed")
    args = ap.parse_args()
    pin_threads(2)
    print(f"# early_exit, target cpu, executor={args.executor}; {environment()}; shared "
          "machine: times are noisy, read the ratios")
    tasks = {"cnn": ("cnn-exits (digits)", cnn_task), "bert": ("bert-6L-128 (keyword)", bert_task)}
    rows, notes = [], []
    for key in args.models.split(","):
        name, make = tasks[key]
        t = time.perf_counter()
        task = make()
        notes.append(f"{name}: trained in {time.perf_counter() - t:.0f}s")
        for b in (int(s) for s in args.batch.split(",")):
            row, note = bench_one(name, task, b, args.executor, not args.no_inductor,
                                  args.n_test)
            rows.append(row)
            notes.append(note)
            print("# " + note, flush=True)
    cols = ["model", "batch", "eager_ms", "inductor_ms", "full_ms", "exit_ms", "exit/full",
            "exit/eager", "exit/inductor", "skipped", "cosine", "acc_full", "acc_exit",
            "full_err", "applied"]
    print(table(rows, cols))
    for n in notes:
        print("# " + n)


if __name__ == "__main__":
    main()
