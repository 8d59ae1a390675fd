import json
import subprocess
import sys

from hwopt import cli


def test_targets_lists_cpu(capsys):
    assert cli.main(["targets"]) == 0
    assert "cpu" in capsys.readouterr().out


def test_compile_writes_artifact(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HWOPT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert cli.main(["compile", "hwopt.zoo:cnn", "--input", "1x3x32x32", "-o", str(out),
                     "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"] == [[1, 3, 32, 32]] and manifest["passes"] == ["fuse"]


def test_bad_target_exits_2_with_the_fix():
    r = subprocess.run([sys.executable, "-m", "hwopt.cli", "compile", "hwopt.zoo:cnn",
                        "--target", "cpuu"], capture_output=True, text=True)
    assert r.returncode == 2 and "Did you mean 'cpu'" in r.stderr


def test_demo_runs_small(capsys):
    from hwopt import demo

    assert demo.main(["--small", "--models", "cnn"]) == 0
    out = capsys.readouterr().out
    assert "| cnn |" in out and "speedup" in out


def test_compile_for_fpga_from_the_shell(tmp_path, monkeypatch):
    """The fpga target's default pipeline quantizes: the CLI calibrates on the example inputs."""
    monkeypatch.setenv("HWOPT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "fpga"
    assert cli.main(["compile", "hwopt.zoo:cnn", "--input", "1x3x16x16", "--target", "fpga",
                     "-o", str(out), "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "fpga" and "quantize" in manifest["passes"]
    assert list(out.glob("*.c"))
