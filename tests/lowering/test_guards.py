import pytest
import torch

import hwopt
from hwopt.lowering.guards import IndexOutOfRange, index_checks


class Lookup(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8)
        self.table = torch.nn.Parameter(torch.randn(20, 8))

    def forward(self, ids, rows):
        return self.emb(ids).sum(1) + self.table.index_select(0, rows.reshape(-1))


def _inputs():
    return torch.randint(0, 50, (4, 6)), torch.randint(0, 20, (4,))


def test_index_inputs_are_found():
    m, (ids, rows) = Lookup().eval(), _inputs()
    ep = torch.export.export(m, (ids, rows))
    gm = ep.module()
    checks = {(p, size) for p, size, _ in index_checks(gm)}
    # placeholders of an exported module: parameters/buffers first, then the user inputs
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert {size for _, size in checks} == {50, 20}
    assert all(names[p] in ("ids", "rows") for p, _ in checks)


@pytest.mark.parametrize("where", ["ids", "rows"])
def test_out_of_range_index_raises_like_pytorch(where, tmp_path):
    m, (ids, rows) = Lookup().eval(), _inputs()
    art = hwopt.compile(m, (ids, rows), executor="tvm", cache_dir=str(tmp_path / "c"))
    torch.testing.assert_close(art(ids, rows), m(ids, rows), rtol=1e-4, atol=1e-5)
    bad_ids, bad_rows = ids.clone(), rows.clone()
    if where == "ids":
        bad_ids[1, 2] = 10**6
    else:
        bad_rows[0] = -1
    with pytest.raises(IndexError):
        m(bad_ids, bad_rows)
    with pytest.raises(IndexOutOfRange, match="index out of range"):
        art(bad_ids, bad_rows)
    art.save(tmp_path / "art")  # the saved artifact checks too
    with pytest.raises(IndexError):
        hwopt.load(tmp_path / "art")(bad_ids, bad_rows)


def test_torch_compile_cache_hit_keeps_the_check(tmp_path):
    m = torch.nn.Sequential(torch.nn.Embedding(30, 8), torch.nn.Linear(8, 4)).eval()
    ids = torch.randint(0, 30, (2, 5))
    bad = ids.clone()
    bad[0, 0] = 30
    for _ in range(2):  # built, then loaded from the cache
        torch._dynamo.reset()
        fn = torch.compile(m, backend="hwopt", options={"executor": "tvm",
                                                        "cache_dir": str(tmp_path)})
        torch.testing.assert_close(fn(ids), m(ids), rtol=1e-4, atol=1e-5)
        with pytest.raises(IndexError):
            fn(bad)


def test_takes_lower_in_clip_mode_without_tvm_warning(capfd, tmp_path):
    import tvm
    from tvm import relax
    from tvm.script import relax as R

    from hwopt.lowering.guards import clip_takes

    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((10, 4), "float32"))
    i = relax.Var("i", R.Tensor((3,), "int64"))
    with bb.function("main", [x, i]):
        bb.emit_func_output(bb.emit(relax.op.take(x, i, axis=0)))
    call = clip_takes(bb.get())["main"].body.blocks[0].bindings[0].value
    assert call.op.same_as(tvm.ir.Op.get("relax.take"))
    assert (call.attrs.mode, int(call.attrs.axis)) == ("clip", 0)

    m, (ids, rows) = Lookup().eval(), _inputs()  # compiled end to end: same numbers, no warning
    art = hwopt.compile(m, (ids, rows), executor="tvm", cache_dir=str(tmp_path), progress=False)
    torch.testing.assert_close(art(ids, rows), m(ids, rows), rtol=1e-4, atol=1e-5)
    assert "Fast mode segfaults" not in capfd.readouterr().err
