import torch
import torch.fx as fx

import hwopt
from hwopt.dynamic.buckets import Bucketed
from hwopt.dynamic.plan import PlanRunner, to_plan


def _bucketed(tmp_path):
    """A linear layer bucketed at 8 rows (PyTorch measured faster) and 16 rows (TVM)."""
    lin = torch.nn.Linear(8, 4).eval()
    n = torch.export.Dim("n", min=2, max=16)
    sub = torch.export.export(lin, (torch.randn(4, 8),), dynamic_shapes=({0: n},)).module()
    for node in [n for n in sub.graph.nodes if n.op == "call_module"]:
        sub.graph.erase_node(node)  # export's input guards: an ATen graph as the split leaves
    sub.recompile()
    b = Bucketed(sub, (0,), (0,), [8, 16])
    b.b8 = sub  # what lowering leaves where PyTorch measured faster
    b.b16 = hwopt.compile(lin, (torch.randn(16, 8),), executor="tvm", progress=False,
                          cache_dir=str(tmp_path)).compiled.module
    return lin, b


def test_bucket_that_pytorch_won_runs_unpadded_and_tvm_bucket_pads(tmp_path):
    lin, b = _bucketed(tmp_path)
    with torch.no_grad():
        x5, x12 = torch.randn(5, 8), torch.randn(12, 8)
        (y5,), (y12,) = b(x5), b(x12)
        torch.testing.assert_close(y5, lin(x5))
        torch.testing.assert_close(y12, lin(x12), rtol=1e-5, atol=1e-5)
    # 5 rows: the PyTorch bucket, at the exact size; 12 rows: padded to the TVM bucket of 16
    assert b.stats == {"padded_rows": 4, "rows": 12, "eager_calls": 1}


def test_host_plan_keeps_only_tvm_buckets_and_runs_the_rest_eagerly(tmp_path):
    lin, b = _bucketed(tmp_path)
    root = torch.nn.Module()
    root.bk = b
    g = fx.Graph()
    g.output(g.call_module("bk", (g.placeholder("x"),)))
    plan, consts = to_plan(fx.GraphModule(root, g))
    step = plan["steps"][0]
    assert (step["op"], sorted(step["compiled"]), step["sizes"]) == ("bucketed", ["16"], [8, 16])
    runner = PlanRunner(plan, consts, {"bk.b16": b.b16})
    for rows in (5, 12):
        x = torch.randn(rows, 8)
        y = runner(x)[0]
        y = y[0] if isinstance(y, tuple) else y
        torch.testing.assert_close(y, lin(x).detach(), rtol=1e-5, atol=1e-5)
