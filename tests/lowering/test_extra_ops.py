"""amax/amin lower through hwopt.lowering.extra_ops (TVM's importer does not convert them)."""
import pytest
import torch
import torch.nn as nn

import hwopt


class Conf(nn.Module):
    def forward(self, x):
        return torch.softmax(x, -1).amax(-1), x.amin((0, 1))


@pytest.mark.filterwarnings("error:hwopt")
def test_amax_amin_compile_to_tvm_and_match():
    x = torch.randn(4, 5, 10)
    art = hwopt.compile(Conf(), (x,), executor="tvm", progress=False, strict=True)
    assert all(r.executor == "tvm" for r in art.compiled.regions)
    for got, want in zip(art(x), Conf()(x)):
        torch.testing.assert_close(got, want)
