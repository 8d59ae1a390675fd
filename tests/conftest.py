import os
import tempfile

os.environ.setdefault("TVM_NUM_THREADS", "2")
# Tests that use the default cache location must not touch the user's ~/.cache/hwopt.
os.environ["HWOPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="hwopt-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def cache_dir(tmp_path):
    """A fresh compile cache per test, so tests never see each other's entries."""
    return tmp_path / "hwopt-cache"
