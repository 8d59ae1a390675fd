import operator

import torch

from hwopt.capture import from_module
from hwopt.graph import propagate_meta
from hwopt.lowering.partition import partition, unsupported_nodes


class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.erfinv(torch.tanh(self.a(x)) * 0.5))


def test_unsupported_op_splits_graph_into_regions():
    m, x = M().eval(), torch.randn(2, 8)
    cap = from_module(m, (x,))
    propagate_meta(cap.gm, cap.example_inputs)
    assert list(unsupported_nodes(cap.gm)) == ["aten.erfinv.default"]
    parent, names = partition(cap.gm)
    assert len(names) == 2
    top = [n.target for n in parent.graph.nodes if n.op == "call_function"
           and n.target is not operator.getitem]
    assert top == [torch.ops.aten.erfinv.default]
    for name in names:  # weights moved into the regions as constants, not passed at run time
        sub = getattr(parent, name)
        assert any(n.op == "get_attr" for n in sub.graph.nodes)
        assert sum(n.op == "placeholder" for n in sub.graph.nodes) == 1
    torch.testing.assert_close(parent(x)[0], m(x))
