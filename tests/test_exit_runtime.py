"""hwopt/exit_runtime.py: exit statistics and batch padding of a stage, without compiling."""
import torch
import torch.fx as fx

from hwopt.exit_runtime import ExitStats, Stage, StageVariant


def test_exit_stats_shares():
    s = ExitStats(4)
    s.histogram = [2, 0, 1, 1]  # 2 samples ran 1 stage, one 3, one 4
    assert s.samples == 4
    assert s.mean_exit == (2 * 1 + 3 + 4) / 4
    assert abs(s.skipped_share - (1 - 9 / 16)) < 1e-12
    assert "{1:2, 3:1, 4:1}" in s.summary()
    s.reset()
    assert s.samples == 0 and s.skipped_share == 0.0


class Double(torch.nn.Module):
    def forward(self, x, w):
        return (x * 2 + w,)


def test_stage_pads_to_the_next_size_and_drops_padding():
    calls = []

    class Spy(StageVariant):
        def forward(self, *args):
            calls.append(args[0].shape[0])
            return super().forward(*args)

    gm = fx.symbolic_trace(Double())
    stage = Stage({2: Spy(gm, 2, None), 4: Spy(gm, 4, None)}, [True, False], [True])
    x, w = torch.randn(3, 5), torch.randn(5)
    (out,) = stage.run([x, w], 3)
    assert calls == [4] and out.shape == (3, 5)
    torch.testing.assert_close(out, x * 2 + w)
    (out,) = stage.run([x[:1], w], 1)
    assert calls[-1] == 2 and out.shape == (1, 5)
