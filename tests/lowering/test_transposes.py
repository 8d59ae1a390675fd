"""cancel_transposes: transpose pairs around elementwise ops are removed (Relax, lower step)."""
import numpy as np
import tvm
from tvm import relax
from tvm.script import relax as R

from hwopt.lowering.transposes import cancel_transposes


def _module(between):
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, 4, 6, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.permute_dims(x, [0, 2, 3, 1]))
            y = bb.emit(between(y))
            out = bb.emit_output(relax.op.permute_dims(y, [0, 3, 1, 2]))
        bb.emit_func_output(out)
    return bb.get()


def _permutes(mod) -> int:
    return mod["main"].script().count("permute_dims")


def test_pair_around_relu_and_scalar_multiply_cancels():
    scale = relax.const(np.array(0.5, "float32"))
    for between in (relax.op.nn.relu, lambda y: relax.op.multiply(y, scale)):
        mod = _module(between)
        assert _permutes(mod) == 2
        assert _permutes(cancel_transposes(mod)) == 0


def test_pair_around_a_per_channel_multiply_stays():
    scale = relax.const(np.ones((1, 6, 8, 4), "float32"))  # not a scalar: layout matters
    mod = cancel_transposes(_module(lambda y: relax.op.multiply(y, scale)))
    assert _permutes(mod) == 2
    assert isinstance(mod, tvm.IRModule)
