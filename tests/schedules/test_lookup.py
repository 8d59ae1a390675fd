"""int8 table lookups on AVX-512 VBMI (hwopt.schedules.lookup)."""
import numpy as np
import pytest
import tvm
from hwopt.targets.cpu import TARGET as CPU

from hwopt.schedules.lookup import has_vbmi, vbmi_lookup

VBMI = has_vbmi(tvm.target.Target(CPU.tvm()))


@pytest.mark.skipif(not VBMI, reason="this CPU has no AVX-512 VBMI")
@pytest.mark.parametrize("shape", [(4, 64), (3, 197, 5)])  # whole vectors; a ragged tail
def test_vbmi_lookup_is_exact(shape):
    func = vbmi_lookup(shape).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=CPU.tvm())
    assert "vpermi2var" in lib.mod.inspect_source("ll")
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, shape).astype("int8")
    x.flat[:256] = np.arange(-128, 128)  # every index
    table = rng.integers(-128, 128, 256).astype("int8")
    args = [tvm.runtime.tensor(a) for a in (x, table, np.zeros(shape, "int8"))]
    lib["main"](*args)
    np.testing.assert_array_equal(args[2].numpy(), table[x.astype(int) + 128])


def test_no_vbmi_on_other_targets():
    assert not has_vbmi(tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"}))
    assert not has_vbmi(tvm.target.Target({"kind": "c"}))
