import subprocess
import sys
import time

import pytest
import torch

import hwopt
from hwopt import zoo


def _entries(root):
    return sorted(p for p in root.glob("*/*") if (p / "meta.json").exists())


def test_second_compile_hits_cache(cache_dir):
    m, args = zoo.cnn(small=True)
    first = hwopt.compile(m, args, cache_dir=str(cache_dir), executor="tvm")
    assert not first.compiled.regions[0].cached
    second = hwopt.compile(m, args, cache_dir=str(cache_dir), executor="tvm")
    assert second.compiled.regions[0].cached
    torch.testing.assert_close(second(*args), m(*args), rtol=1e-4, atol=1e-5)


def test_cache_hit_in_new_process_is_fast(cache_dir):
    code = (f"import time, torch, hwopt; from hwopt import zoo; m, a = zoo.cnn(small=True); "
            f"t = time.perf_counter(); art = hwopt.compile(m, a, cache_dir={str(cache_dir)!r}, "
            f"executor='tvm'); print(time.perf_counter() - t, art.compiled.regions[0].cached)")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    seconds, cached = out.stdout.split()
    assert cached == "True"
    assert float(seconds) > 0  # speed of a hit is reported by the benchmark, not timed here


def test_cache_hit_in_new_process_loads_only_the_tvm_runtime(cache_dir):
    """A hit loads the stored library with libtvm_runtime alone: `import tvm` (the compiler
    library) would cost more than the 1 s a hit may take."""
    code = (f"import sys, torch, hwopt; from hwopt import zoo; m, a = zoo.cnn(small=True); "
            f"fn = torch.compile(m, backend='hwopt', options={{'cache_dir': {str(cache_dir)!r}, "
            f"'executor': 'tvm'}}); "
            f"y = fn(*a); torch.testing.assert_close(y, m(*a), rtol=1e-4, atol=1e-5); "
            f"print('tvm' in sys.modules)")
    first = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                           text=True)
    assert first.stdout.split()[-1] == "True"  # built: the compiler was needed
    again = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                           text=True)
    assert again.stdout.split()[-1] == "False"
    assert "Scope Loaded" not in again.stderr  # TVM's per-constant load log is dropped


def test_corrupt_entry_is_ignored_and_rebuilt(cache_dir):
    m, args = zoo.cnn(small=True)
    hwopt.compile(m, args, cache_dir=str(cache_dir), executor="tvm")
    (entry,) = _entries(cache_dir)
    (entry / "lib.so").write_bytes(b"not a library")
    with pytest.warns(UserWarning, match="corrupt compile-cache entry"):
        art = hwopt.compile(m, args, cache_dir=str(cache_dir), executor="tvm")
    assert not art.compiled.regions[0].cached
    torch.testing.assert_close(art(*args), m(*args), rtol=1e-4, atol=1e-5)
    (entry,) = _entries(cache_dir)
    (entry / "meta.json").write_text("{truncated")
    with pytest.warns(UserWarning, match="corrupt"):
        art = hwopt.compile(m, args, cache_dir=str(cache_dir), executor="tvm")
    torch.testing.assert_close(art(*args), m(*args), rtol=1e-4, atol=1e-5)


def test_cache_can_be_switched_off(tmp_path):
    m, args = zoo.cnn(small=True)
    t = time.perf_counter()
    art = hwopt.compile(m, args, cache_dir=False, executor="tvm")
    assert time.perf_counter() - t > 0 and not art.compiled.regions[0].cached
