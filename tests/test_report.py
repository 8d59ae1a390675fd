import re
import shutil
import subprocess

import pytest
import torch

import hwopt
from hwopt import cli, zoo
from hwopt.pass_base import PassResult


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    m, args = zoo.cnn(small=True)
    cache = tmp_path_factory.mktemp("cache")
    return hwopt.compile(m, args, cache_dir=str(cache))


def test_report_html_has_every_section(art, tmp_path):
    page = art.report().html()
    for section in ("Summary", "Passes", "Regions and executors", "Fallbacks", "Roofline",
                    "Per-node predicted cost"):
        assert section in page, section
    assert page.count("data:image/png;base64,") >= 1
    text = str(art.report())
    assert "fuse: applied" in text and "predicted" in text


def test_lossy_pass_tradeoff_and_undone_pass_are_reported(tmp_path):
    def noisy(scale):
        def fn(gm, ctx):
            out = next(n for n in gm.graph.nodes if n.op == "output")
            (y,) = out.args[0]
            with gm.graph.inserting_before(out):
                new = gm.graph.call_function(torch.ops.aten.mul.Tensor, (y, 1.0 + scale))
            out.args = ((new,),)
            return PassResult(gm, True, [f"scaled by {1 + scale}"])
        return fn

    hwopt.register_pass("test_report_small", lossless=False, tolerance=0.05)(noisy(0.01))
    hwopt.register_pass("test_report_big", lossless=False, tolerance=0.05)(noisy(0.5))
    m = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()
    x = torch.randn(2, 8)
    with pytest.warns(UserWarning, match="undone"):
        art = hwopt.compile(m, (x,), passes=["test_report_small", "test_report_big"],
                            cache_dir=False, executor="torch")
    text = str(art.report())
    assert re.search(r"test_report_small: applied.*error 0.01", text)
    assert "test_report_big: undone: relative error 0.5" in text
    assert "Accuracy / latency trade-off" in art.report().html()


def test_cli_report_writes_html(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HWOPT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "r.html"
    assert cli.main(["report", "hwopt.zoo:cnn", "--input", "1x3x32x32", "-o", str(out),
                     "-q"]) == 0
    assert out.read_text().startswith("<!doctype html>")
    assert "hwopt report" in capsys.readouterr().out


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not _chromium(), reason="Chromium is not installed (scripts/setup.sh "
                    "installs Debian's chromium when it runs as root)")
def test_report_renders_in_headless_chromium(art, tmp_path):
    page = tmp_path / "report.html"
    page.write_text(art.report().html())
    r = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                        "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    rendered = re.search(r'data-rendered="(\d+)/(\d+)"', r.stdout)
    assert rendered, "the page's load script did not run"
    shown, total = map(int, rendered.groups())
    assert total >= 1 and shown == total  # every plot decoded and shown
    assert "Regions and executors" in r.stdout
