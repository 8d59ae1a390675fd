"""The ``torch.compile`` backend: ``torch.compile(model, backend="hwopt", options={...})``.

Registered in the ``torch_dynamo_backends`` entry-point group, so the name resolves without
importing hwopt first. Dynamo hands over an FX graph and example inputs; hwopt compiles it
(hwopt.compiler) and returns a callable. Bad options raise; any other failure falls back to
running the graph in PyTorch with a warning (or raises with ``strict=True``).
"""
from __future__ import annotations

import logging
import warnings

import torch

from hwopt.capture import from_dynamo
from hwopt.compiler import compile_captured
from hwopt.errors import HwoptError, OptionError
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
    eager = gm.forward
    _warn_if_training(example_inputs)
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
    if opts.report:
        from hwopt.report import write_report

        write_report(compiled, opts.report)
    return _runner(compiled, cap.input_indices, cap.frozen, eager)


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


def _warn_if_training(example_inputs) -> None:
    global _grad_warned
    if _grad_warned or not torch.is_grad_enabled():
        return
    if any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        _grad_warned = True
        log.info("hwopt compiles for inference: weights are frozen and outputs carry no "
                 "autograd history")


__all__ = ["hwopt_backend", "HwoptError"]
