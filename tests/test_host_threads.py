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
