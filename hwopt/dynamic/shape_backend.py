"""Shape buckets under ``torch.compile(..., backend="hwopt")`` when Dynamo marks a size dynamic.

Used by hwopt.backend.ShapeSpecialized. Dynamo hands a graph whose example inputs have SymInt
sizes (``dynamic=True``, ``torch._dynamo.mark_dynamic(x, dim, min=, max=)``, or a recompile after
a new length) plus SymInt scalar inputs. On the first call, `ShapeBuckets.prepare` exports that
graph again with torch.export (the scalar inputs become ``sym_size`` of the tensors that carry
them, weights are frozen) to get an ATen graph with one symbolic size, then plans buckets exactly
as the ahead-of-time path does (hwopt.dynamic.shapes.plan_shapes: cost-model buckets over
Dynamo's range, padding only where proven safe). Each call is then keyed by its bucket: inputs
padded to it, SymInt scalar inputs set to it, outputs sliced back. Where padding is not safe (or
the graph has several independent sizes) the key is the exact shape, as before.
"""
from __future__ import annotations

import copy
import logging

import sympy
import torch
import torch.fx as fx

from hwopt.dynamic.shapes import ShapePlan, bound, input_ranges, plan_shapes

log = logging.getLogger("hwopt")


def _expr(s):
    return s.node.expr if isinstance(s, torch.SymInt) else s


def _unmarked(x):
    if isinstance(x, torch.Tensor) and hasattr(x, "_dynamo_dynamic_indices"):
        return x.detach()  # a new tensor object: same storage, no mark_dynamic attributes
    return x


class ShapeBuckets:
    """Maps each call of a dynamic Dynamo graph to a compile key (a bucket, or the exact shape)
    and pads / slices around the compiled variant."""

    def __init__(self, gm: fx.GraphModule, example_inputs, opts):
        self.gm, self.opts = gm, opts
        # Dynamo passes real tensors; their symbolic sizes are on the placeholders' meta
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.examples = [ph.meta.get("example_value", x) if ph is not None else x
                         for ph, x in zip(phs + [None] * len(example_inputs), example_inputs)]
        self.plan: ShapePlan | None = None
        self.tensor_axes: list = []  # [(Dynamo arg index, axis)] padded along the size
        self.scalars: dict = {}  # Dynamo arg index -> sympy expr of a SymInt input
        self.syms: set = set()  # Dynamo's symbols that all equal the one exported size
        self.reason = "not prepared"

    # -- planning (first call) --------------------------------------------------------------
    def prepare(self, args) -> None:
        import warnings

        try:
            with warnings.catch_warnings():  # export's own deprecation chatter
                warnings.simplefilter("ignore")
                self._prepare(list(args))
        except Exception as e:  # noqa: BLE001 - buckets are an optimisation: exact shapes then
            self.plan, self.reason = None, f"{type(e).__name__}: {e}"
            log.debug("hwopt: no shape buckets", exc_info=True)
        log.info("hwopt: dynamic graph: %s", self.describe())

    def describe(self) -> str:
        if self.plan is None or not self.plan.padded:
            return f"exact shapes ({self.plan.reason if self.plan else self.reason})"
        return f"buckets {self.plan.buckets or 'powers of two'} ({self.plan.how})"

    def _prepare(self, args: list) -> None:
        from hwopt.capture import _flatten_exported, freeze_weights

        gm = fx.GraphModule(self.gm, copy.deepcopy(self.gm.graph))
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        carriers = {}  # Dynamo symbol -> (placeholder index, axis)
        for i, x in enumerate(self.examples):
            for axis, s in enumerate(getattr(x, "shape", ())):
                e = _expr(s)
                if isinstance(e, sympy.Symbol):
                    carriers.setdefault(e, (i, axis))
        keep = []
        for i, (ph, x) in enumerate(zip(phs, self.examples)):
            if isinstance(x, torch.SymInt):
                self.scalars[i] = _expr(x)
                self._to_sym_size(gm, ph, phs, carriers, _expr(x))
            else:
                keep.append(i)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        concrete = [_unmarked(args[i]) for i in keep]
        gm, user, _ = freeze_weights(gm, concrete)
        user_args = [concrete[j] for j in user]
        user_dynamo = [keep[j] for j in user]  # Dynamo arg index of each exported input
        dims, named = [], {}  # one export Dim per Dynamo symbol: equal sizes stay equal
        for j in user_dynamo:
            ex = self.examples[j]
            dims.append({a: self._dim(_expr(s), named) for a, s in enumerate(ex.shape)
                         if not isinstance(_expr(s), int)})
        ep = torch.export.export(gm, tuple(user_args), dynamic_shapes=tuple(dims), strict=False)
        ep = ep.run_decompositions()
        exported = _flatten_exported(ep)
        ranges = input_ranges(exported, dict(ep.range_constraints))
        if len(ranges) != 1:
            raise ValueError(f"{len(ranges)} independent sizes after export; buckets need one")
        (sym, vr), = ranges.items()
        lo, hi = self._range(vr, carriers)

        def run(*ts):
            return self.gm.forward(*self._full_args(args, user_dynamo, ts))

        self.plan = plan_shapes(exported, sym, lo, hi, user_args, run,
                                self.opts.target.cost_model, self.opts.max_buckets)
        self.tensor_axes = [(user_dynamo[i], axis) for i, axis in self.plan.inputs]
        self.syms = set(carriers)

    def _dim(self, expr, named: dict):
        if not isinstance(expr, sympy.Symbol):
            return torch.export.Dim.DYNAMIC
        if expr not in named:
            lo, hi = self._range_of(expr)
            kw = {"max": hi} if hi is not None else {}
            named[expr] = torch.export.Dim(f"d_{expr}", min=lo, **kw)
        return named[expr]

    def _range_of(self, sym) -> tuple[int, int | None]:
        from torch._guards import detect_fake_mode

        env = getattr(detect_fake_mode(self.examples), "shape_env", None)
        r = env.var_to_range.get(sym) if env is not None else None
        return (bound(r.lower) or 1, bound(r.upper)) if r is not None else (1, None)

    def _to_sym_size(self, gm, ph, phs, carriers, expr) -> None:
        """Replace a SymInt input by the size of a tensor input that carries it."""
        if expr not in carriers:
            raise ValueError(f"scalar input {ph.name} = {expr} is not a size of a tensor input")
        i, axis = carriers[expr]
        first = next(n for n in gm.graph.nodes if n.op != "placeholder")
        with gm.graph.inserting_before(first):
            size = gm.graph.call_function(torch.ops.aten.sym_size.int, (phs[i], axis))
        ph.replace_all_uses_with(size)
        gm.graph.erase_node(ph)

    def _range(self, vr, carriers) -> tuple[int, int | None]:
        """Export's range intersected with Dynamo's (mark_dynamic min / max)."""
        from torch._guards import detect_fake_mode

        lo, hi = bound(vr.lower) or 1, bound(vr.upper)
        mode = detect_fake_mode(self.examples)
        env = getattr(mode, "shape_env", None)
        for s in carriers:
            r = env.var_to_range.get(s) if env is not None else None
            if r is not None:
                lo = max(lo, bound(r.lower) or 1)
                if bound(r.upper) is not None:
                    hi = bound(r.upper) if hi is None else min(hi, bound(r.upper))
        return max(lo, 1), hi

    def _full_args(self, args, user_dynamo, ts) -> list:
        full = list(args)
        for j, t in zip(user_dynamo, ts):
            full[j] = t
        n = next(int(full[i].shape[a]) for i, a in self._carrier_axes(user_dynamo))
        return self._with_scalars(full, n)

    def _carrier_axes(self, user_dynamo) -> list:
        out = []
        for j in user_dynamo:
            for axis, s in enumerate(self.examples[j].shape):
                if isinstance(_expr(s), sympy.Symbol):
                    out.append((j, axis))
        return out

    def _with_scalars(self, args: list, size: int) -> list:
        out = list(args)
        for i, expr in self.scalars.items():
            out[i] = int(expr.subs({s: size for s in expr.free_symbols}))
        return out

    # -- per call ---------------------------------------------------------------------------
    @property
    def padded(self) -> bool:
        return self.plan is not None and self.plan.padded

    def key(self, args) -> tuple:
        """The compile key of a call: ("bucket", size) when padded, else the exact shapes."""
        if self.padded:
            n = int(args[self.tensor_axes[0][0]].shape[self.tensor_axes[0][1]])
            b = self.plan.bucket_for(n) if n >= self.plan.lo else None
            if b is not None:
                return ("bucket", b)
        return tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a
                     for a in args)

    def compile_args(self, args, key) -> list:
        """Example inputs to compile the variant of `key` for: padded to the bucket, without
        Dynamo's dynamic-dimension marks (torch.export would refuse the static shape)."""
        if key[0] == "bucket":
            return self.pad(args, key[1])
        return [_unmarked(a) for a in args]

    def pad(self, args, size: int) -> list:
        from hwopt.dynamic.shapes import pad_axis

        out = [_unmarked(a) for a in args]
        for i, axis in self.tensor_axes:
            out[i] = pad_axis(out[i], axis, size)
        return self._with_scalars(out, size)

    def unpad(self, out, args):
        n = int(args[self.tensor_axes[0][0]].shape[self.tensor_axes[0][1]])
        flat = list(out) if isinstance(out, (tuple, list)) else [out]
        flat = list(self.plan.unpad(flat, n))
        return type(out)(flat) if isinstance(out, (tuple, list)) else flat[0]
