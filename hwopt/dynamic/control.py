"""Host-side control-flow modules that the ``split`` pass puts in place of dynamic nodes.

Sits in the *run* step (and is read by the *lower* step). Each module holds static sub-networks
as FX GraphModules; hwopt.lowering compiles them through TVM via ``hwopt_inner()`` (a list of
``(attribute, GraphModule, example inputs)``, with inputs recorded at a real call), and the module
itself only decides which sub-network runs:

- `CondOp`: ``torch.cond(pred, true_fn, false_fn, operands)``: the predicate is read on the host;
- `WhileOp`: ``torch.while_loop(cond_fn, body_fn, carried, additional)``;
- `IslandOp`: a region whose shapes depend on data (``nonzero``/boolean-mask routing, MoE): its
  gather/scatter ops run in PyTorch, its compute runs in `hwopt.dynamic.buckets.Bucketed`
  sub-networks compiled for a few padded sizes.

On fake tensors (shape propagation) each module returns empty tensors of the shapes recorded
from torch.export, since the real control flow cannot run there.
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from hwopt.errors import HwoptError


def _any_fake(xs) -> bool:
    return any(isinstance(x, torch.Tensor) and is_fake(x) for x in xs)


def _fakes(like: torch.Tensor, meta: list) -> tuple:
    return tuple(like.new_empty(tuple(shape), dtype=dtype) for shape, dtype in meta)


def _flat(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _clone(xs) -> list:
    return [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in xs]


class _ControlOp(torch.nn.Module):
    """Common part: output metadata for fake runs, and inputs recorded for the lowering."""

    kind = ""
    branches: tuple[str, ...] = ()

    def __init__(self, out_meta: list):
        super().__init__()
        self.out_meta = [(tuple(s), d) for s, d in out_meta]
        self._seen: list | None = None
        self.calls: dict[str, int] = {}  # per-branch call counts (statistics for the report)

    def _record(self, inputs) -> None:
        if self._seen is None:
            self._seen = _clone(inputs)

    def _count(self, branch: str) -> None:
        self.calls[branch] = self.calls.get(branch, 0) + 1

    def branch_inputs(self, seen: list) -> dict[str, list]:
        raise NotImplementedError

    def hwopt_inner(self):
        """For hwopt.lowering: each branch graph with example inputs seen at a real call."""
        if self._seen is None:
            return None
        seen, self._seen = self._seen, None
        ins = self.branch_inputs(seen)
        return [(name, getattr(self, name), ins[name]) for name in self.branches
                if isinstance(getattr(self, name), torch.fx.GraphModule)]


class CondOp(_ControlOp):
    """``torch.cond``: runs `true_branch` or `false_branch` on `operands`; flat tuple out."""

    kind = "cond"
    branches = ("true_branch", "false_branch")

    def __init__(self, true_branch, false_branch, out_meta: list):
        super().__init__(out_meta)
        self.true_branch, self.false_branch = true_branch, false_branch

    def branch_inputs(self, seen):
        return {"true_branch": seen, "false_branch": seen}

    def forward(self, pred, *operands):
        if _any_fake((pred, *operands)):
            return _fakes(pred, self.out_meta)
        self._record(operands)
        take = bool(pred)
        self._count("true" if take else "false")
        return _flat((self.true_branch if take else self.false_branch)(*operands))


class WhileOp(_ControlOp):
    """``torch.while_loop``: ``while cond(*carried, *additional): carried = body(...)``."""

    kind = "while"
    branches = ("cond_fn", "body_fn")

    def __init__(self, cond_fn, body_fn, n_carried: int, out_meta: list,
                 max_iterations: int = 1_000_000):
        super().__init__(out_meta)
        self.cond_fn, self.body_fn = cond_fn, body_fn
        self.n_carried, self.max_iterations = n_carried, max_iterations

    def branch_inputs(self, seen):
        return {"cond_fn": seen, "body_fn": seen}

    def forward(self, *inputs):
        carried, extra = list(inputs[:self.n_carried]), list(inputs[self.n_carried:])
        if _any_fake(inputs):
            return _fakes(inputs[0], self.out_meta)
        self._record(inputs)
        steps = 0
        while bool(_flat(self.cond_fn(*carried, *extra))[0]):
            carried = list(_flat(self.body_fn(*carried, *extra)))
            steps += 1
            if steps > self.max_iterations:
                raise HwoptError(f"while_loop ran more than {self.max_iterations} iterations; "
                                 "raise pass_config={'split': {'max_iterations': N}} if intended")
        self._count("runs")
        self.calls["iterations"] = self.calls.get("iterations", 0) + steps
        return tuple(carried)


class IslandOp(_ControlOp):
    """A data-dependent-shape region (e.g. per-expert routing) run as a PyTorch graph whose
    compute pieces are `Bucketed` sub-networks (compiled per padded size)."""

    kind = "island"

    def __init__(self, graph: torch.fx.GraphModule, out_meta: list):
        super().__init__(out_meta)
        self.graph = graph
        self._tvm = False

    def hwopt_inner(self):  # the Bucketed children are found by the lowering themselves
        return None

    def forward(self, *inputs):
        if _any_fake(inputs):
            like = next(x for x in inputs if isinstance(x, torch.Tensor))
            return _fakes(like, self.out_meta)
        from hwopt.host_threads import runs_in_tvm, single_torch_thread

        if not self._tvm:  # True once lowering has put TVM regions in
            self._tvm = runs_in_tvm(self.graph)
        with single_torch_thread(self._tvm):
            return _flat(self.graph(*inputs))
