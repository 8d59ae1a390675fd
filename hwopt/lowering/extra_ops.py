"""Converters for ATen ops that TVM's ExportedProgram importer does not convert (lower step).

``custom_convert_map`` entries of ``from_exported_program``, used for every region
(hwopt.lowering.relax_import) and counted as convertible by the partitioner:

- ``amax`` / ``amin`` over dims -> ``relax.op.max`` / ``min`` (the importer has only
  ``max.dim``, which it lowers through ``topk``; the early-exit pass's confidence score
  ``softmax(x).amax(-1)`` needs the plain reduction).
"""
from __future__ import annotations


def _reduce(name: str):
    def convert(node, imp):
        from tvm import relax

        x = imp.env[node.args[0]]
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", [])
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        axis = list(dims) if isinstance(dims, (list, tuple)) else [dims]
        op = relax.op.max if name == "max" else relax.op.min
        return imp.block_builder.emit(op(x, axis=axis or None, keepdims=bool(keep)))

    return convert


CONVERTERS = {"amax.default": _reduce("max"), "amin.default": _reduce("min")}
