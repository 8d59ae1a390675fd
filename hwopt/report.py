"""Reports: what the compiler did and why — passes applied, per-node predicted cost, the executor
chosen per region with measured times, and fallbacks with their reasons.

`Report(compiled)` is returned by ``art.report()``; ``options={"report": path}`` writes its HTML.
"""
from __future__ import annotations

import html
from pathlib import Path

from hwopt.cost import op_class


class Report:
    def __init__(self, compiled):
        self.compiled = compiled

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

    def __str__(self) -> str:
        c = self.compiled
        lines = [f"hwopt report — target {c.options.target.name}",
                 f"predicted latency {c.predicted.latency_s * 1e3:.3f} ms, "
                 f"{c.predicted.flops / 1e9:.3f} GFLOP, "
                 f"{c.predicted.bytes_moved / 1e6:.2f} MB moved",
                 "passes:"]
        for r in c.pass_records:
            state = f"skipped ({r.skipped})" if r.skipped else (
                f"{r.seconds * 1e3:.1f} ms, {r.nodes_before}->{r.nodes_after} nodes")
            lines.append(f"  {r.name}: {state}; {'; '.join(r.notes)}")
        lines.append("regions:")
        for g in c.regions:
            t = (f" tvm {g.tvm_ms:.3f} ms vs torch {g.torch_ms:.3f} ms" if g.tvm_ms else "")
            lines.append(f"  {g.name}: {g.executor}{' (cached)' if g.cached else ''}{t}"
                         f"{' — ' + g.reason if g.reason else ''}")
        if c.decision:
            lines.append(f"executor: {c.decision}")
        lines.append("phase seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in c.seconds.items()))
        return "\n".join(lines)

    def html(self) -> str:
        def cell(v):
            return f"<td>{html.escape(f'{v:.3g}' if isinstance(v, float) else str(v))}</td>"

        rows = "".join("<tr>" + "".join(cell(v) for v in r.values()) + "</tr>"
                       for r in self.node_costs())
        head = "".join(f"<th>{h}</th>" for h in
                       ("node", "op", "class", "pass", "latency µs", "flops", "bytes", "energy µJ"))
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>hwopt report</title>"
                f"</head><body><h1>hwopt report</h1><pre>{html.escape(str(self))}</pre>"
                f"<h2>Per-node predicted cost</h2><table border=1><tr>{head}</tr>{rows}</table>"
                f"</body></html>")


def write_report(compiled, path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(Report(compiled).html())
    return p
