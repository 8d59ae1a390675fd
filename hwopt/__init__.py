"""hwopt: compile-time, hardware-aware optimisation of PyTorch models through Apache TVM.

    torch.compile(model, backend="hwopt", options={"target": "cpu"})
    art = hwopt.compile(model, example_inputs, target="cpu"); art(*inputs); art.save("out")
    run = hwopt.load("out"); run(*inputs)       # a saved artifact (host plan + TVM libraries)
"""
from __future__ import annotations

__version__ = "0.1.0"

from hwopt.aot import Artifact, compile
from hwopt.compiler import get_pipeline
from hwopt.cost import Cost
from hwopt.dynamic import load
from hwopt.errors import HwoptError, LoweringError, OptionError, PassError
from hwopt.exit_runtime import exit_stats
from hwopt.options import Options
from hwopt.pass_base import Pass, PassContext, PassResult, register_pass, registered_passes
from hwopt.step_cache import reset_cache
from hwopt.target import Target, TargetSpec, get_target, list_targets

__all__ = [
    "Artifact", "Cost", "HwoptError", "LoweringError", "OptionError", "Options", "Pass",
    "PassContext", "PassError", "PassResult", "Target", "TargetSpec", "compile", "exit_stats",
    "get_pipeline", "get_target", "list_targets", "load", "register_pass", "registered_passes",
    "reset_cache",
]
