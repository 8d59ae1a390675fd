"""Partition: which nodes TVM can take, and the regions they form.

Sits in the *lower* step, after the rewrite passes. A node is supported when TVM's ExportedProgram
translator converts its ATen op and its tensors have supported dtypes. Supported nodes are grouped
into regions (fused ``call_module`` submodules, acyclic); the rest stays in PyTorch. Constants a
region reads are moved into it, so weights are compile-time constants of the TVM code.
"""
from __future__ import annotations

import functools
import operator

import torch
import torch.fx as fx
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase

from hwopt.graph import constant_value, op_name

# int8: quantized activations and weights (the quantize pass's Q/DQ graphs, hwopt.lowering.qdq).
SUPPORTED_DTYPES = {torch.float32, torch.int64, torch.int32, torch.bool, torch.int8}
# Ops that must stay in PyTorch even though TVM converts them: they carry no computation TVM
# can speed up and only break regions apart (asserts) or need host semantics.
_NEVER = {"_assert_async.default", "_assert_async.msg", "_assert_scalar.default",
          "_local_scalar_dense.default", "_assert_tensor_metadata.default"}


@functools.lru_cache(maxsize=None)
def tvm_convertible_ops() -> frozenset[str]:
    """The op names TVM's ExportedProgram importer converts (kept per TVM version, hwopt.memo)."""
    from hwopt.memo import disk_memo

    def ask():
        from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

        return sorted(ExportedProgramImporter().create_convert_map())

    return frozenset(disk_memo("tvm-ops", "ExportedProgramImporter",
                               ask, valid=lambda v: isinstance(v, list) and len(v) > 50))


def _qdq_converters() -> dict:
    from hwopt.lowering.attention import CONVERTERS as ATTENTION
    from hwopt.lowering.extra_ops import CONVERTERS as EXTRA
    from hwopt.lowering.grouped import CONVERTERS as GROUPED
    from hwopt.lowering.qattention import CONVERTERS as QATTENTION
    from hwopt.lowering.qdq import CONVERTERS
    from hwopt.lowering.sparse import CONVERTERS as SPARSE

    return {**CONVERTERS, **SPARSE, **ATTENTION, **QATTENTION, **EXTRA, **GROUPED}


def _key(node: fx.Node) -> str:
    if node.target is operator.getitem:
        return "getitem"
    return getattr(node.target, "__name__", str(node.target))


def _dtypes_ok(node: fx.Node) -> bool:
    vals = [node.meta.get("val")] + [a.meta.get("val") for a in node.all_input_nodes]
    for v in vals:
        for t in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(t, torch.Tensor) and t.dtype not in SUPPORTED_DTYPES:
                return False
    return True


def unsupported_reason(node: fx.Node) -> str | None:
    """None when TVM can take the node, else why not."""
    if node.op != "call_function":
        return None
    key = _key(node)
    if key in _NEVER:
        return "host-side op"
    if key not in tvm_convertible_ops() and key not in _qdq_converters():
        return "no TVM converter"
    if not _dtypes_ok(node):
        return "unsupported dtype"
    if node.meta.get("hwopt_keep_in_torch"):
        return "marked to stay in PyTorch"
    return None


class _Support(OperatorSupportBase):
    def is_node_supported(self, submodules, node: fx.Node) -> bool:
        return node.op == "call_function" and unsupported_reason(node) is None


def unsupported_nodes(gm: fx.GraphModule) -> dict[str, list[str]]:
    """op name -> node names that must stay in PyTorch."""
    out: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and unsupported_reason(node) is not None:
            out.setdefault(op_name(node), []).append(node.name)
    return out


def partition(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[str]]:
    """Group supported nodes into ``hwopt_region_N`` submodules; returns (module, region names)."""
    part = CapabilityBasedPartitioner(gm, _Support(), allows_single_node_partition=True)
    parts = [p for p in part.propose_partitions() if _worth_a_region(p.nodes)]
    fused = part.fuse_partitions(parts, prefix="hwopt_region_")
    names = [n.target for n in fused.graph.nodes if n.op == "call_module"
             and str(n.target).startswith("hwopt_region_")]
    for name in names:
        _move_constants_in(fused, name)
    fused.graph.eliminate_dead_code()
    fused.recompile()
    return fused, names


def _worth_a_region(nodes) -> bool:
    # A region of views and getitems alone does no work: leave it to PyTorch.
    from hwopt.cost import op_class

    return any(op_class(n) != "view" and n.target is not operator.getitem for n in nodes)


def _move_constants_in(parent: fx.GraphModule, name: str) -> None:
    call = next(n for n in parent.graph.nodes if n.op == "call_module" and n.target == name)
    sub: fx.GraphModule = getattr(parent, name)
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    keep_args = []
    for arg, ph in zip(call.args, placeholders):
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            attr = f"_c_{ph.name}"
            sub.register_buffer(attr, constant_value(parent, arg))
            with sub.graph.inserting_before(ph):
                node = sub.graph.get_attr(attr)
            node.meta = dict(ph.meta)
            ph.replace_all_uses_with(node)
            sub.graph.erase_node(ph)
        else:
            keep_args.append(arg)
    call.args = tuple(keep_args)
    sub.recompile()


def region_inputs(parent: fx.GraphModule, name: str) -> list[fx.Node]:
    call = next(n for n in parent.graph.nodes if n.op == "call_module" and n.target == name)
    return list(call.args)
