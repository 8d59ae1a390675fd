"""hwopt: compile-time, hardware-aware optimisation of PyTorch models through Apache TVM.

    torch.compile(model, backend="hwopt", options={"target": "cpu"})
    art = hwopt.compile(model, example_inputs, target="cpu"); art(*inputs); art.save("out")
"""
from __future__ import annotations

__version__ = "0.1.0"

from hwopt.aot import Artifact, compile
from hwopt.compiler import get_pipeline
from hwopt.cost import Cost
from hwopt.errors import HwoptError, LoweringError, OptionError, PassError
from hwopt.options import Options
from hwopt.pass_base import Pass, PassContext, PassResult, register_pass, registered_passes
from hwopt.step_cache import reset_cache
from hwopt.target import Target, TargetSpec, get_target, list_targets

__all__ = [
    "Artifact", "Cost", "HwoptError", "LoweringError", "OptionError", "Options", "Pass",
    "PassContext", "PassError", "PassResult", "Target", "TargetSpec", "compile", "get_pipeline",
    "get_target", "list_targets", "register_pass", "registered_passes", "reset_cache",
]
