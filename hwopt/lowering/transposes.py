"""Cancel transpose pairs left at layout boundaries (a Relax pass of the *lower* step).

``ConvertLayout`` makes dense convolutions NHWC and puts a transpose back to NCHW after each one;
kernels that are NHWC inside (the filter-vectorized sparse convs of
``hwopt.lowering.sparse_block``) transpose to NHWC on the way in and back on the way out. Where
two such transposes meet, possibly with elementwise unary ops between them (the ReLU after a
layer), the pair is the identity: ``permute(f(permute(x, a)), b) -> f(x)`` when ``b`` undoes
``a``. Without this each sparse layer pays two extra copies of its activations. Runs after
``ConvertLayout`` and before legalization (`hwopt.lowering.relax_import.prepare`).
"""
from __future__ import annotations

# Elementwise ops with one tensor operand (others scalar constants): they commute with a
# transpose. ReLU6 arrives canonicalised as relu + minimum(constant).
_UNARY = ("relax.nn.relu", "relax.nn.gelu", "relax.nn.silu", "relax.sigmoid", "relax.tanh",
          "relax.clip")
_SCALAR_BINARY = ("relax.minimum", "relax.maximum", "relax.multiply", "relax.add")


def _axes(call) -> list[int] | None:
    axes = call.attrs.axes
    return None if axes is None else [int(a) for a in axes]


def _undo(a: list[int] | None, b: list[int] | None) -> bool:
    return a is not None and b is not None and len(a) == len(b) and \
        all(a[b[i]] == i for i in range(len(a)))


def _scalar_const(expr) -> bool:
    from tvm.ir.expr import Constant  # relax constants (TVM 0.27: value, not data)

    return isinstance(expr, Constant) and all(int(s) == 1 for s in expr.value.numpy().shape)


def cancel_transposes(mod):
    """``mod`` with every cancelling transpose pair removed (Relax functions only)."""
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

    rules = []
    x = wildcard()
    inner = is_op("relax.permute_dims")(x)

    def direct(orig, m):
        return m[x] if _undo(_axes(m[inner]), _axes(orig)) else orig

    rules.append((is_op("relax.permute_dims")(inner), direct))
    for op in _UNARY + _SCALAR_BINARY:
        consts = [is_const()] if op in _SCALAR_BINARY else []
        mid = is_op(op)(inner, *consts)

        def through(orig, m, mid=mid):
            call = m[mid]
            rest = list(call.args[1:])
            if not _undo(_axes(m[inner]), _axes(orig)) or \
                    not all(_scalar_const(r) for r in rest):
                return orig
            return relax.Call(call.op, [m[x], *rest], call.attrs, call.ty_args)

        rules.append((is_op("relax.permute_dims")(mid), through))
    for gv, f in list(mod.functions.items()):
        if isinstance(f, relax.Function):
            for pattern, fn in rules:
                f = rewrite_call(pattern, fn, f)
            mod[gv] = f
    return mod


def _is_permute(expr) -> bool:
    from tvm import relax

    return isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.permute_dims"
