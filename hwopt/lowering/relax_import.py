"""FX (ATen level) -> TVM Relax, and the Relax phases that run before scheduling.

Sits in the *lower* step of the pipeline: the rewritten, partitioned ATen graph of one supported
region comes in; a Relax IRModule with fused, legalized PrimFuncs (conv2d in NHWC/HWIO) comes out,
ready for the target's schedule rules (``hwopt.schedules``) and ``relax.build``.
"""
from __future__ import annotations

import warnings

import torch
import tvm
from tvm import relax


def to_relax(gm: torch.fx.GraphModule, example_inputs: tuple[torch.Tensor, ...],
             int8_dot: str = "i16") -> tvm.IRModule:
    """Import an ATen-level GraphModule (constants as get_attr) into Relax.

    Constants become Relax constants, so layout changes of weights fold at compile time.
    `int8_dot` picks the integer form of quantized layers (``hwopt.lowering.qdq.converters``).
    """
    from tvm.relax.frontend.torch import from_exported_program

    from hwopt.lowering import attention, extra_ops, grouped, qattention, qdq, qlut, sparse

    convert = {**extra_ops.CONVERTERS, **grouped.CONVERTERS}
    if qdq.has_quantized(gm):  # int8 layers -> integer kernels (see hwopt.lowering.qdq)
        qdq.fuse_int8_layers(gm)  # pruned layers (hwopt::sparse_*) -> hwopt.lowering.sparse
        qlut.fold_tables(gm)  # int8 -> int8 activations (GELU between linears) -> tables
        convert.update({**qdq.converters(int8_dot), **sparse.CONVERTERS, **attention.CONVERTERS,
                        **qattention.converters(int8_dot), **qlut.CONVERTERS})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(gm, tuple(example_inputs), strict=False)
        return from_exported_program(ep, keep_params_as_input=False, custom_convert_map=convert)


def prepare(mod: tvm.IRModule, target: tvm.target.Target,
            conv_layout: str = "NHWC") -> tvm.IRModule:
    """Relax phases before scheduling: decompose, canonicalise, NHWC conv layout, legalize, fuse."""
    passes = [
        _ClipTakes(),  # first: FoldConstant lowers a take to try to fold it
        relax.transform.DecomposeOpsForInference(),
        # Without it a BatchNorm tuple leftover stops the activation from fusing into the conv.
        relax.transform.CanonicalizeBindings(),
    ]
    if conv_layout == "NHWC":
        passes.append(relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]}))
        passes.append(_CancelTransposes())
    passes += [
        relax.transform.FoldConstant(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]
    with target:
        return tvm.transform.Sequential(passes)(mod)


@tvm.transform.module_pass(opt_level=0, name="hwopt.CancelTransposes")
class _CancelTransposes:
    """``hwopt.lowering.transposes.cancel_transposes`` as a module pass."""

    def transform_module(self, mod, ctx):
        from hwopt.lowering.transposes import cancel_transposes

        return cancel_transposes(mod)


@tvm.transform.module_pass(opt_level=0, name="hwopt.ClipTakes")
class _ClipTakes:
    """``hwopt.lowering.guards.clip_takes`` as a module pass."""

    def transform_module(self, mod, ctx):
        from hwopt.lowering.guards import clip_takes

        return clip_takes(mod)


def build(mod: tvm.IRModule, target: tvm.target.Target) -> relax.VMExecutable:
    """Build a scheduled module to a VM executable."""
    return relax.build(mod, target=target, relax_pipeline="default")
