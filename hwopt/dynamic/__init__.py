"""Dynamic networks: the runtime side of the ``split`` pass (passes/split.py).

A network with data-dependent control flow is split into static sub-networks, each lowered
through TVM like any graph, and a host dispatcher that runs the control flow:

- `hwopt.dynamic.control`: the modules that stand for ``torch.cond`` / ``torch.while_loop`` nodes
  and for data-dependent-shape islands (mixture-of-experts routing) in the rewritten graph;
- `hwopt.dynamic.buckets`: shape buckets for dynamic dimensions, chosen with the cost model,
  with padding where the sub-network is row-independent;
- `hwopt.dynamic.plan`: the serialized host plan (JSON) of a compiled graph, its interpreter, and
  `load` for a saved artifact (no Python code from the model is needed to pick a branch).
"""
from hwopt.dynamic.control import CondOp, IslandOp, WhileOp
from hwopt.dynamic.plan import load, to_plan

__all__ = ["CondOp", "IslandOp", "WhileOp", "load", "to_plan"]
