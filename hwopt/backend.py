"""The ``torch.compile`` backend: ``torch.compile(model, backend="hwopt", options={...})``.

Registered in the ``torch_dynamo_backends`` entry-point group, so the name resolves without
importing hwopt first. Dynamo hands over an FX graph and example inputs; hwopt compiles it
(hwopt.compiler) and returns a callable. Bad options raise; any other failure falls back to
running the graph in PyTorch with a warning (or raises with ``strict=True``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import warnings

import torch

from hwopt.cache import CompileCache, tensor_digest, versions
from hwopt.capture import from_dynamo, has_symbolic, is_weight
from hwopt.compiler import compile_captured
from hwopt.errors import HwoptError, OptionError
from hwopt.lowering.region import TVMRegion, time_pair
from hwopt.options import Options

log = logging.getLogger("hwopt")
_grad_warned = False


def hwopt_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None,
                  **kwargs):
    """Dynamo backend entry point."""
    if kwargs:
        raise OptionError(f"hwopt takes its settings through options={{...}}; got keyword(s) "
                          f"{', '.join(kwargs)} (torch.compile(model, backend='hwopt', "
                          f"options={{'target': 'cpu'}}))")
    opts = Options.from_dict(options)
    if not opts.target.runs_here():
        raise OptionError(f"target {opts.target.name!r} does not run on this machine, so "
                          "torch.compile cannot use it; cross-compile with hwopt.compile(model, "
                          f"inputs, target={opts.target.name!r}).save(folder)")
    _warn_if_training(example_inputs)
    if opts.dynamic_shapes is not None:
        raise OptionError("option 'dynamic_shapes' is for hwopt.compile; under torch.compile "
                          "use dynamic=True or torch._dynamo.mark_dynamic(x, dim, min=, max=)")
    if has_symbolic(example_inputs):
        return ShapeSpecialized(gm, opts, example_inputs)
    return _compile_static(gm, example_inputs, opts)


def _compile_static(gm, example_inputs, opts):
    eager = gm.forward
    cache = CompileCache(opts.cache_path())
    key = _graph_key(gm, example_inputs, opts) if cache.root and not opts.report else None
    planned = _load_plan(cache, key, example_inputs, eager, opts) if key else None
    if planned is not None:
        return planned
    try:
        cap = from_dynamo(gm, list(example_inputs))
        compiled = compile_captured(cap, opts)
    except OptionError:
        raise
    except Exception as e:
        if opts.strict:
            raise
        warnings.warn(f"hwopt: could not compile this graph ({type(e).__name__}: {e}); "
                      "running it in PyTorch", stacklevel=2)
        log.debug("hwopt: compile failure", exc_info=True)
        return eager
    # A simulated target (fpga) runs here only to check its numbers: timing it against eager
    # says nothing about the device, so its code is always what runs.
    simulated = opts.target.extra.get("simulated", False)
    eager_wins = (opts.executor == "auto" and not simulated and not _stateful(compiled)
                  and _eager_is_faster(compiled, cap, eager, example_inputs))
    if opts.report:
        from hwopt.report import write_report

        write_report(compiled, opts.report)
    if eager_wins:
        if key:
            cache.store(key, {"plan": "torch", "reason": compiled.decision})
        return eager
    if key and isinstance(compiled.module, TVMRegion):
        cache.store(key, {"plan": "tvm", "indices": list(cap.input_indices),
                          "index_checks": compiled.module.index_checks},
                    lambda d: compiled.module.export(d, "lib"))
    return _runner(compiled, cap.input_indices, cap.frozen, eager)


def _stateful(compiled) -> bool:
    """A graph whose calls depend on earlier calls (step caches of lazy_cache): one input timed
    over and over is not how it runs, so the whole-graph timing is skipped (regions still chose
    their executor one by one)."""
    stateful = any(getattr(m, "hwopt_stateful", False) for m in compiled.module.modules())
    if stateful:
        compiled.decision = ("compiled graph kept: it holds step caches, whose speed shows over a "
                             "sampling run, not in a repeated single call")
    return stateful


def _eager_is_faster(compiled, cap, eager, example_inputs) -> bool:
    """Never slower than eager: time the compiled graph against the original one, interleaved."""
    user = [example_inputs[i] for i in cap.input_indices]
    t_hw, t_eager = time_pair(lambda: compiled(*user), lambda: eager(*example_inputs))
    compiled.decision = (f"hwopt {t_hw * 1e3:.3f} ms vs eager {t_eager * 1e3:.3f} ms: "
                         f"{'eager' if t_eager < t_hw else 'hwopt'} chosen")
    log.info("hwopt: %s", compiled.decision)
    return t_eager < t_hw


def _graph_key(gm, example_inputs, opts) -> str:
    """Key of a whole Dynamo graph before capture: its code, every input's shape and dtype, the
    values of the weights among them, and the options. A hit skips capture, passes and lowering."""
    h = hashlib.sha256(b"dynamo-graph")
    h.update(gm.code.encode())
    for x in example_inputs:
        if not isinstance(x, torch.Tensor):
            h.update(repr(x).encode())
            continue
        h.update(f"{tuple(x.shape)}:{x.dtype}:{x.device}:{is_weight(x)};".encode())
        if is_weight(x):
            h.update(tensor_digest(x).encode())
    h.update(json.dumps({**opts.fingerprint(), **versions()}, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _load_plan(cache, key, example_inputs, eager, opts):
    """The runner stored for this exact graph, when the whole graph was one TVM region."""
    hit = cache.load(key)
    if hit is not None and hit[0].get("plan") == "torch":
        log.info("hwopt: cached decision: this graph runs in PyTorch (%s)", hit[0].get("reason"))
        return eager
    if hit is None or hit[0].get("plan") != "tvm" or not hit[0].get("file_order"):
        return None
    meta, folder = hit
    low = opts.target.lowering
    try:
        vm = low.load(folder, meta["file_order"])
    except Exception as e:  # a library that does not load is rebuilt, never trusted
        log.warning("hwopt: cached library in %s did not load (%s); rebuilding", folder, e)
        return None
    region = TVMRegion(vm, False, low, files=(folder, meta["file_order"]),
                       target_name=opts.target.name, index_checks=meta.get("index_checks", ()))
    indices = meta["indices"]
    frozen = [(x, x._version) for i, x in enumerate(example_inputs)
              if isinstance(x, torch.Tensor) and is_weight(x)]

    def compiled(*args):
        with torch.no_grad():
            return region(*args)

    return _runner(compiled, indices, frozen, eager)


def _runner(compiled, indices, frozen, eager):
    def run(*args):
        for t, version in frozen:
            if t._version != version:
                # Weights were frozen into the compiled code: never answer with stale ones.
                warnings.warn("hwopt: a parameter or buffer changed after compilation; running "
                              "this graph in PyTorch (call torch._dynamo.reset() to recompile)",
                              stacklevel=2)
                return eager(*args)
        return compiled(*[args[i] for i in indices])

    run.hwopt_compiled = compiled
    return run


class ShapeSpecialized:
    """A graph with dynamic shapes: compiled once per shape bucket (inputs padded to it, outputs
    sliced back; hwopt.dynamic.shape_backend) where padding is proven safe, else once per exact
    shape; at most ``max_buckets`` compiles, past that new shapes run in PyTorch with a warning."""

    def __init__(self, gm, opts, example_inputs=()):
        from hwopt.dynamic.shape_backend import ShapeBuckets

        self.gm, self.opts, self.compiled = gm, opts, {}
        self.buckets = ShapeBuckets(gm, example_inputs, opts)
        self.prepared = False

    def __call__(self, *args):
        if not self.prepared:
            self.prepared = True
            self.buckets.prepare(args)
        key = self.buckets.key(args)
        fn = self.compiled.get(key)
        if fn is None:
            if len(self.compiled) >= self.opts.max_buckets:
                warnings.warn(f"hwopt: more than {self.opts.max_buckets} input shapes for one "
                              "graph (option max_buckets); new shapes run in PyTorch",
                              stacklevel=2)
                return self.gm.forward(*args)
            fn = self.compiled[key] = _compile_static(
                self.gm, self.buckets.compile_args(args, key), self.opts)
        if key[0] != "bucket":
            return fn(*args)
        return self.buckets.unpad(fn(*self.buckets.pad(args, key[1])), args)


def _warn_if_training(example_inputs) -> None:
    global _grad_warned
    if _grad_warned or not torch.is_grad_enabled():
        return
    if any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        _grad_warned = True
        log.info("hwopt compiles for inference: weights are frozen and outputs carry no "
                 "autograd history")


__all__ = ["hwopt_backend", "HwoptError"]
