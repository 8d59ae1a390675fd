"""Ahead-of-time compile for dynamic input shapes: one static variant per shape bucket.

``hwopt.compile(model, inputs, dynamic_shapes=...)`` lands here (hwopt.aot): the model is
captured with torch.export ``Dim``s, hwopt.dynamic.shapes plans the buckets and proves padding
safe, and each bucket is compiled by the ordinary static pipeline on inputs padded to it. The
`ShapeArtifact` pads each call to the smallest bucket that fits and slices the outputs back.
When padding is not safe, the exact shapes are compiled instead (the example's now, others on
first use, at most ``max_buckets``; beyond that, PyTorch with a warning).

``save`` writes each variant into a sub-folder and a top-level host_plan.json whose
``shape_variants`` entry says which input axes carry the size, the buckets and the folders;
hwopt.dynamic.plan.load reads it back (`load_variants`) and picks a variant per call.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from hwopt.dynamic.shapes import ShapePlan, bound, plan_shapes, symbolic_capture
from hwopt.errors import HwoptError, OptionError

log = logging.getLogger("hwopt")


class ShapeArtifact:
    """A model compiled for a range of input sizes: `variants` {size: Artifact}."""

    def __init__(self, plan: ShapePlan, variants: dict, model=None, static_compile=None,
                 max_variants: int = 4):
        self.plan, self.variants, self.model = plan, dict(variants), model
        self._static_compile, self.max_variants = static_compile, max_variants
        self.calls: dict[int, int] = {}  # variant size -> calls (tests, reports)
        first = next(iter(self.variants.values()))
        self.target, self.in_spec, self.out_spec = first.target, first.in_spec, first.out_spec

    @property
    def compiles(self) -> int:
        return len(self.variants)

    def __call__(self, *args, **kwargs):
        flat, spec = pytree.tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        n = self.plan.length(tensors)
        size = self._variant_for(n, tensors, args, kwargs)
        if size is None:
            warnings.warn(f"hwopt: input size {n} is outside the compiled sizes "
                          f"{sorted(self.variants)} (at most {self.max_variants} variants); "
                          "running the model in PyTorch", stacklevel=2)
            with torch.no_grad():
                return self.model(*args, **kwargs)
        self.calls[size] = self.calls.get(size, 0) + 1
        art = self.variants[size]
        if size == n:
            return art(*args, **kwargs)
        padded = _rebuild(flat, spec, self.plan.pad(tensors, size))
        out, out_spec = pytree.tree_flatten(art(*padded[0], **padded[1]))
        return pytree.tree_unflatten(list(self.plan.unpad(out, n)), out_spec)

    def _variant_for(self, n: int, tensors, args, kwargs) -> int | None:
        hi_ok = self.plan.hi is None or n <= self.plan.hi
        if self.plan.padded:
            b = self.plan.bucket_for(n) if n >= self.plan.lo and hi_ok else None
            return b if b in self.variants else None
        if n in self.variants:
            return n
        if self._static_compile is None or len(self.variants) >= self.max_variants or not (
                n >= self.plan.lo and hi_ok):
            return None
        log.info("hwopt: padding is unsafe (%s); compiling the exact size %d", self.plan.reason, n)
        self.variants[n] = self._static_compile(args, kwargs)
        return n

    def report(self):
        return {size: art.report() for size, art in self.variants.items()}

    def save(self, path) -> Path:
        """Each variant in ``<path>/len<size>/``, and the plan that picks one in
        ``<path>/host_plan.json`` (run by hwopt.dynamic.load)."""
        from hwopt.cache import versions
        from hwopt.dynamic.plan import PLAN_VERSION

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        folders = {}
        for size, art in sorted(self.variants.items()):
            art.save(out / f"len{size}")
            folders[str(size)] = f"len{size}"
        dump = pytree.treespec_dumps
        doc = {"version": PLAN_VERSION, "shape_variants": {**self.plan.to_json(),
                                                           "variants": folders},
               "in_spec": dump(self.in_spec), "out_spec": dump(self.out_spec)}
        (out / "host_plan.json").write_text(json.dumps(doc, indent=1))
        manifest = {"target": self.target.name, "shape_variants": folders,
                    "host_plan": ["host_plan.json"], "versions": versions()}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
        return out


def _rebuild(flat, spec, tensors) -> tuple:
    it = iter(tensors)
    return pytree.tree_unflatten([next(it) if isinstance(a, torch.Tensor) else a for a in flat],
                                 spec)


def compile_dynamic(model, args: tuple, kwargs: dict | None, opts, static_compile):
    """`static_compile(args, kwargs) -> Artifact` compiles one static shape (hwopt.aot)."""
    gm, ranges = symbolic_capture(model, args, kwargs, opts.dynamic_shapes)
    if len(ranges) != 1:
        raise OptionError(f"option 'dynamic_shapes': hwopt buckets one dynamic size; the model "
                          f"has {len(ranges)} ({', '.join(map(str, ranges)) or 'none'}). Give "
                          "inputs of equal length the same Dim (or the same (lo, hi) range)")
    (sym, vr), = ranges.items()
    hi = bound(vr.upper)
    flat, spec = pytree.tree_flatten((tuple(args), dict(kwargs or {})))
    tensors = [a for a in flat if isinstance(a, torch.Tensor)]

    def run(*ts):
        a, k = _rebuild(flat, spec, ts)
        return pytree.tree_leaves(model(*a, **k))

    plan = plan_shapes(gm, sym, bound(vr.lower) or 1, hi, tensors, run, opts.target.cost_model,
                       opts.max_buckets)
    log.info("hwopt: dynamic size %s in %d..%s: %s; buckets %s (%s)", sym, plan.lo, plan.hi,
             plan.reason, plan.buckets, plan.how)
    variants = {}
    if plan.padded:
        for b in plan.buckets:
            a, k = _rebuild(flat, spec, plan.pad(tensors, b))
            variants[b] = static_compile(a, k)
    else:
        variants[plan.length(tensors)] = static_compile(args, kwargs)
    return ShapeArtifact(plan, variants, model, static_compile, opts.max_buckets)


class LoadedVariants:
    """A saved ShapeArtifact run from its files: one hwopt.dynamic.plan.LoadedArtifact per
    variant, picked per call by the saved ShapePlan."""

    def __init__(self, folder: Path, plan: ShapePlan, variants: dict, in_spec, out_spec):
        self.folder, self.plan, self.variants = folder, plan, variants
        self.in_spec, self.out_spec = in_spec, out_spec
        self.calls: dict[int, int] = {}

    def __call__(self, *args, **kwargs):
        flat, spec = pytree.tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        n = self.plan.length(tensors)
        size = self.plan.bucket_for(n) if self.plan.padded else n
        if size not in self.variants or n < self.plan.lo:
            raise HwoptError(f"input size {n} has no compiled variant in {self.folder} "
                             f"(sizes {sorted(self.variants)}, padded={self.plan.padded}); "
                             "compile again with hwopt.compile(..., dynamic_shapes=...)")
        self.calls[size] = self.calls.get(size, 0) + 1
        out = self.variants[size](*self.plan.pad(tensors, size))
        out = self.plan.unpad(pytree.tree_leaves(out), n)
        return pytree.tree_unflatten(list(out), self.out_spec) if self.out_spec else out


def load_variants(folder: Path, doc: dict) -> LoadedVariants:
    from hwopt.dynamic.plan import load

    sv = doc["shape_variants"]
    plan = ShapePlan.from_json(sv)
    variants = {int(size): load(folder / sub) for size, sub in sv["variants"].items()}
    spec = pytree.treespec_loads
    return LoadedVariants(folder, plan, variants,
                          spec(doc["in_spec"]) if doc.get("in_spec") else None,
                          spec(doc["out_spec"]) if doc.get("out_spec") else None)
