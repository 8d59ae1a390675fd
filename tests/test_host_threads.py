import torch

from hwopt.host_threads import runs_in_tvm, single_torch_thread


def test_single_torch_thread_restores_the_count():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with single_torch_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with single_torch_thread(active=False):
            assert torch.get_num_threads() == 2
        try:
            with single_torch_thread():
                raise ValueError
        except ValueError:
            pass
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)


def test_plain_pytorch_modules_keep_their_threads():
    assert not runs_in_tvm(torch.nn.Sequential(torch.nn.Linear(4, 4)))


class _Threads(torch.nn.Module):
    """Records PyTorch's thread count when it runs (a PyTorch part of a compiled graph)."""

    seen: list = []

    def forward(self, x):
        self.seen.append(torch.get_num_threads())
        return x * 2


def test_graph_mixing_pytorch_and_tvm_runs_pytorch_on_one_thread(tmp_path):
    import hwopt
    from hwopt.compiler import Compiled
    from hwopt.host_threads import mixes_torch_and_tvm

    x = torch.randn(4, 8)
    region = hwopt.compile(torch.nn.Linear(8, 8).eval(), (x,), executor="tvm", progress=False,
                           cache_dir=str(tmp_path)).compiled.module
    mixed = torch.nn.Sequential(_Threads(), region)
    assert mixes_torch_and_tvm(mixed) and not mixes_torch_and_tvm(region)
    assert not mixes_torch_and_tvm(torch.nn.Sequential(_Threads()))
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for module, want in ((mixed, 1), (torch.nn.Sequential(_Threads()), 2)):
            _Threads.seen.clear()
            Compiled(module, None, [], [], None)(x)
            assert _Threads.seen == [want]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)
