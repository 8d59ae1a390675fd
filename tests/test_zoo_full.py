"""Full-size model zoo through torch.compile(backend="hwopt"): slow, run with -m slow."""
import pytest
import torch

from hwopt import zoo
from hwopt.bench import rel_error


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_full_size_matches_eager(name, cache_dir):
    m, args = zoo.MODELS[name]()
    torch._dynamo.reset()
    fast = torch.compile(m, backend="hwopt", options={"cache_dir": str(cache_dir),
                                                      "executor": "tvm", "strict": True})
    with torch.no_grad():
        assert rel_error(fast(*args), m(*args)) <= 1e-4
