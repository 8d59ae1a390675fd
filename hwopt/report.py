"""Reports: what the compiler did and why.

Sits after the *lower* step: `Report(compiled)` (returned by ``art.report()``; written as HTML by
``options={"report": path}``) shows the passes applied with their predicted gain (and measured
error for lossy ones), the executor chosen per region with measured times, fallbacks with their
reasons, a per-node cost table, a roofline plot and the accuracy/latency trade-off of lossy passes.
Plots are matplotlib figures embedded as PNG data, so the page is one self-contained file.
"""
from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

from hwopt.cost import op_class


class Report:
    def __init__(self, compiled):
        self.compiled = compiled

    # -- data ------------------------------------------------------------------------------
    def node_costs(self) -> list[dict]:
        model = self.compiled.options.target.cost_model
        rows = []
        for node in self.compiled.graph.graph.nodes:
            if node.op != "call_function":
                continue
            c = model.node_cost(node)
            rows.append({"node": node.name, "op": str(node.target), "class": op_class(node),
                         "pass": node.meta.get("hwopt_pass", ""), "latency_us": c.latency_s * 1e6,
                         "flops": c.flops, "bytes": c.bytes_moved, "energy_uj": c.energy_j * 1e6})
        return rows

    def passes(self) -> list[dict]:
        rows = []
        for r in self.compiled.pass_records:
            before, after = r.cost_before, r.cost_after
            gain = None
            if before is not None and after is not None and after.latency_s > 0:
                gain = before.latency_s / after.latency_s
            rows.append({
                "pass": r.name, "state": "skipped: " + r.skipped if r.skipped else (
                    "undone: " + r.reverted if r.reverted else
                    ("applied" if r.modified else "no change")),
                "ms": r.seconds * 1e3, "nodes": f"{r.nodes_before} → {r.nodes_after}",
                "pred_before_us": before.latency_s * 1e6 if before else None,
                "pred_after_us": after.latency_s * 1e6 if after else None,
                "pred_gain": gain,
                "error": r.error, "bound": r.bound, "notes": "; ".join(r.notes)})
        return rows

    def fallbacks(self) -> list[str]:
        """Why parts of the graph run in PyTorch: unsupported ops and regions that fell back."""
        from hwopt.lowering.partition import unsupported_nodes

        out = []
        try:
            for op, nodes in unsupported_nodes(self.compiled.graph).items():
                out.append(f"op {op} ({len(nodes)} node(s), e.g. {nodes[0].name}): no TVM "
                           f"lowering for target {self.compiled.options.target.name}")
        except Exception:  # noqa: BLE001 - a report never fails the compile
            pass
        for g in self.compiled.regions:
            if g.executor == "torch" and g.reason:
                out.append(f"region {g.name}: {g.reason}")
        return out

    # -- text ------------------------------------------------------------------------------
    def __str__(self) -> str:
        c = self.compiled
        lines = [f"hwopt report — target {c.options.target.name}",
                 f"predicted latency {c.predicted.latency_s * 1e3:.3f} ms, "
                 f"energy {c.predicted.energy_j * 1e3:.3f} mJ, "
                 f"{c.predicted.flops / 1e9:.3f} GFLOP, "
                 f"{c.predicted.bytes_moved / 1e6:.2f} MB moved",
                 "passes:"]
        for r in self.passes():
            extra = f", error {r['error']:.3g} (bound {r['bound']:.3g})" if r["error"] is not None \
                else ""
            gain = f", predicted {r['pred_gain']:.2f}x" if r["pred_gain"] else ""
            lines.append(f"  {r['pass']}: {r['state']}; {r['ms']:.1f} ms, nodes {r['nodes']}"
                         f"{gain}{extra}; {r['notes']}")
        lines.append("regions:")
        for g in c.regions:
            t = (f" tvm {g.tvm_ms:.3f} ms vs torch {g.torch_ms:.3f} ms" if g.tvm_ms else "")
            lines.append(f"  {g.name}: {g.executor}{' (cached)' if g.cached else ''}{t}"
                         f"{' — ' + g.reason if g.reason else ''}")
        for f in self.fallbacks():
            lines.append(f"fallback: {f}")
        if c.decision:
            lines.append(f"executor: {c.decision}")
        lines.append("phase seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in c.seconds.items()))
        return "\n".join(lines)

    # -- html ------------------------------------------------------------------------------
    def html(self) -> str:
        c = self.compiled
        t = c.options.target
        plots = [("Roofline (predicted, per node)", _roofline_png(self.node_costs(), t.spec))]
        lossy = [r for r in self.passes() if r["error"] is not None]
        if lossy:
            plots.append(("Accuracy / latency trade-off of lossy passes", _tradeoff_png(lossy)))
        summary = _table([{"target": t.name, "description": t.description,
                           "predicted ms": c.predicted.latency_s * 1e3,
                           "predicted mJ": c.predicted.energy_j * 1e3,
                           "GFLOP": c.predicted.flops / 1e9,
                           "MB moved": c.predicted.bytes_moved / 1e6,
                           **{f"{k} s": v for k, v in c.seconds.items()}}])
        regions = _table([{"region": g.name, "executor": g.executor, "cached": g.cached,
                           "tvm ms": g.tvm_ms, "torch ms": g.torch_ms, "build s": g.build_s,
                           "max rel err": g.max_rel_err, "kernels": len(g.kernels),
                           "reason": g.reason} for g in c.regions])
        nodes = sorted(self.node_costs(), key=lambda r: -r["latency_us"])
        fallbacks = "".join(f"<li>{html.escape(f)}</li>" for f in self.fallbacks()) or \
            "<li>none: every region runs compiled code</li>"
        figs = "".join(f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{png}'>"
                       f"<figcaption>{html.escape(title)}</figcaption></figure>"
                       for title, png in plots if png)
        decision = f"<p>{html.escape(c.decision)}</p>" if c.decision else ""
        return (
            "<!doctype html><html><head><meta charset='utf-8'><title>hwopt report</title>"
            f"<style>{_CSS}</style></head><body><h1>hwopt report — {html.escape(t.name)}</h1>"
            f"<h2>Summary</h2>{summary}{decision}"
            f"<h2>Passes</h2>{_table(self.passes())}"
            f"<h2>Regions and executors</h2>{regions}"
            f"<h2>Fallbacks</h2><ul>{fallbacks}</ul>"
            f"<h2>Plots</h2>{figs}"
            f"<h2>Per-node predicted cost ({len(nodes)} nodes, slowest first)</h2>{_table(nodes)}"
            f"<h2>Text</h2><pre>{html.escape(str(self))}</pre>"
            f"<script>{_JS}</script></body></html>")


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse;"
        "font-size:90%}td,th{border:1px solid #bbb;padding:2px 6px;text-align:left}"
        "th{background:#eee}figure{display:inline-block;margin:1em}img{max-width:38em}")
# Marks the page once every plot has decoded, so a headless browser test can see that it renders.
_JS = ("window.addEventListener('load',()=>{const i=[...document.images];"
       "document.body.dataset.rendered=i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length;"
       "});")


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _table(rows: list[dict]) -> str:
    if not rows:
        return "<p>(none)</p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r.values())
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.2))


def _roofline_png(rows: list[dict], spec) -> str | None:
    """Attainable FLOP/s vs arithmetic intensity: the spec's roofs and each node's prediction."""
    pts = [r for r in rows if r["flops"] > 0 and r["bytes"] > 0 and r["latency_us"] > 0]
    if not pts:
        return None
    fig, ax = _figure()
    peak = max(spec.peak_flops.get("float32", 0.0), 1.0)
    xs = [10 ** (k / 10) for k in range(-20, 41)]
    levels = list(spec.mem_levels) or [("DRAM", 0, spec.mem_bw, 0.0)]
    for name, _size, bw, _e in levels:
        ax.plot(xs, [min(peak, bw * x) / 1e9 for x in xs], lw=1, label=f"{name} roof")
    classes = sorted({r["class"] for r in pts})
    for cls in classes:
        sel = [r for r in pts if r["class"] == cls]
        ax.scatter([r["flops"] / r["bytes"] for r in sel],
                   [r["flops"] / (r["latency_us"] * 1e-6) / 1e9 for r in sel],
                   s=[8 + 60 * math.sqrt(r["latency_us"] / max(p["latency_us"] for p in pts))
                      for r in sel], label=cls, alpha=0.7)
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)"), ax.set_ylabel("GFLOP/s")
    ax.legend(fontsize=7)
    return _png(fig)


def _tradeoff_png(lossy: list[dict]) -> str | None:
    pts = [r for r in lossy if r["pred_after_us"] is not None]
    if not pts:
        return None
    fig, ax = _figure()
    for r in pts:
        db = -20 * math.log10(r["error"]) if r["error"] > 0 else 120.0
        ax.scatter([r["pred_after_us"]], [db], label=f"{r['pass']} ({r['state'].split(':')[0]})")
        if r["bound"]:
            ax.axhline(-20 * math.log10(r["bound"]), ls="--", lw=0.8)
    ax.set_xlabel("predicted latency after the pass (µs)"), ax.set_ylabel("output SQNR (dB)")
    ax.legend(fontsize=7)
    return _png(fig)


def write_report(compiled, path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(Report(compiled).html())
    return p
