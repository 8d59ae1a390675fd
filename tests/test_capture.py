"""hwopt.capture: the canonical ATen graph runs in PyTorch exactly like the model."""
import pytest
import torch

from hwopt.capture import from_module


def test_unet_graph_runs_after_decomposition():
    """diffusers' UNet2DModel: core-ATen decompositions hand native_group_norm a non-contiguous
    input that its CPU kernel rejects (the decomposed program of PyTorch 2.13 does not run);
    capture puts a contiguous copy in front of it."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = unet

        def forward(self, x, t):
            return self.m(x, t, return_dict=False)[0]

    model, x, t = Wrap(), torch.randn(1, 3, 8, 8), torch.tensor([10])
    cap = from_module(model, (x, t))
    (out,) = cap.gm(*cap.example_inputs)
    torch.testing.assert_close(out, model(x, t), rtol=1e-4, atol=1e-5)
