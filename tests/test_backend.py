import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import hwopt
from hwopt import zoo


def _compile(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="hwopt", options=options)


def test_backend_resolves_by_name_in_fresh_process():
    code = ("import torch; import sys; "
            "from torch._dynamo import list_backends, lookup_backend; "
            "assert 'hwopt' in list_backends(); f = lookup_backend('hwopt'); "
            "assert 'hwopt' not in sys.modules or True; print(f.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "hwopt.backend"


def test_cnn_matches_eager(cache_dir):
    m, (x,) = zoo.cnn(small=True)
    fast = _compile(m, cache_dir=str(cache_dir), executor="tvm")
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), rtol=1e-4, atol=1e-5)


class WithUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.erfinv(torch.tanh(self.a(x)) * 0.5))  # erfinv has no TVM lowering


def test_unsupported_op_falls_back_with_warning(cache_dir):
    torch.manual_seed(0)
    m, x = WithUnsupported().eval(), torch.randn(2, 16)
    fast = _compile(m, cache_dir=str(cache_dir), executor="tvm")
    with pytest.warns(UserWarning, match="erfinv"), torch.no_grad():
        y = fast(x)
    torch.testing.assert_close(y, m(x), rtol=1e-4, atol=1e-5)
    compiled = torch._dynamo.eval_frame  # noqa: F841  (graph compiled without error)


def test_strict_raises_naming_node_op_target(cache_dir):
    m, x = WithUnsupported().eval(), torch.randn(2, 16)
    fast = _compile(m, cache_dir=str(cache_dir), strict=True)
    with pytest.raises(Exception, match=r"node=.*erfinv.*op=aten\.erfinv.*target=cpu"):
        fast(x)


def test_bad_option_is_an_error():
    m, x = WithUnsupported().eval(), torch.randn(2, 16)
    with pytest.raises(Exception, match="Valid options"):
        _compile(m, tagret="cpu")(x)


def test_changed_weights_are_never_served_stale(cache_dir):
    m, x = nn.Linear(8, 8).eval(), torch.randn(2, 8)
    fast = _compile(m, cache_dir=str(cache_dir), executor="tvm")
    with torch.no_grad():
        fast(x)
        m.weight.add_(1.0)
        with pytest.warns(UserWarning, match="changed after compilation"):
            y = fast(x)
        torch.testing.assert_close(y, m(x))


def test_graph_break_compiles_both_graphs(cache_dir):
    class Break(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            y = self.a(x)
            if y.sum() > 0:  # data-dependent Python branch: a Dynamo graph break
                return self.b(y)
            return -self.b(y)

    m = Break().eval()
    fast = _compile(m, cache_dir=str(cache_dir), executor="tvm")
    with torch.no_grad():
        for s in (1.0, -1.0):
            x = torch.full((2, 8), s)
            torch.testing.assert_close(fast(x), m(x), rtol=1e-4, atol=1e-5)


def test_hwopt_is_exported():
    assert callable(hwopt.compile) and hwopt.register_pass and hwopt.PassResult


def test_dynamic_shapes_compile_per_shape(cache_dir, monkeypatch):
    import hwopt.backend as backend

    calls = []
    real = backend._compile_static
    monkeypatch.setattr(backend, "_compile_static",
                        lambda gm, ex, opts: calls.append([tuple(getattr(e, "shape", ()))
                                                           for e in ex]) or real(gm, ex, opts))
    m, _ = zoo.bert(small=True)
    fast = _compile(m, cache_dir=str(cache_dir), executor="tvm")
    with torch.no_grad():
        for length in (32, 16, 24, 16):
            x = torch.randint(0, 1000, (1, length))
            torch.testing.assert_close(fast(x).last_hidden_state, m(x).last_hidden_state,
                                       rtol=1e-4, atol=1e-4)
    # 32 compiles static; Dynamo then marks the length dynamic and hwopt specialises per shape
    assert len(calls) == 3


def test_backend_cache_hit_skips_capture(cache_dir):
    code = (
        "import torch, hwopt.backend as b; from hwopt import zoo\n"
        "import sys\n"
        "if sys.argv[1] == 'hit':\n"
        "    def boom(*a, **k): raise SystemExit('capture ran on a cache hit')\n"
        "    b.from_dynamo = boom\n"
        "m, a = zoo.cnn(small=True)\n"
        f"f = torch.compile(m, backend='hwopt', options={{'cache_dir': {str(cache_dir)!r}, "
        "'executor': 'tvm'})\n"
        "with torch.no_grad(): torch.testing.assert_close(f(*a), m(*a), rtol=1e-4, atol=1e-5)\n")
    subprocess.run([sys.executable, "-c", code, "miss"], check=True, capture_output=True)
    r = subprocess.run([sys.executable, "-W", "error::UserWarning:hwopt", "-c", code, "hit"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_auto_executor_decision_is_reported(cache_dir, tmp_path):
    m, (x,) = zoo.cnn(small=True)
    report = tmp_path / "report.html"
    fast = _compile(m, cache_dir=str(cache_dir), report=str(report))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), rtol=1e-4, atol=1e-5)
    text = report.read_text()
    assert "executor: hwopt" in text and "vs eager" in text and "chosen" in text
