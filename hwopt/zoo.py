"""Model zoo: real models built from code or `transformers` configs (no weight download).

Used by the demo, the tests and the benchmarks. Each factory returns ``(model.eval(), inputs)``;
``small=True`` gives a reduced size for fast tests.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def _conv_bn_relu(i, o, s):
    return [nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]


class ConvNet(nn.Module):
    """Six Conv-BN-ReLU layers, global pooling and a classifier."""

    def __init__(self, widths=((3, 32, 2), (32, 64, 1), (64, 64, 2), (64, 128, 1), (128, 128, 2),
                               (128, 256, 1)), classes=10):
        super().__init__()
        layers = []
        for i, o, s in widths:
            layers += _conv_bn_relu(i, o, s)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1][1], classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class MobileNetish(nn.Module):
    """MobileNet-v1-style: a stem conv, then depthwise 3x3 + pointwise 1x1 blocks (BN, ReLU6)."""

    def __init__(self, cfg=((32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2),
                            (256, 256, 1), (256, 512, 2)), classes=10):
        super().__init__()
        layers = [nn.Conv2d(3, cfg[0][0], 3, 2, 1, bias=False), nn.BatchNorm2d(cfg[0][0]),
                  nn.ReLU6()]
        for i, o, s in cfg:
            layers += [nn.Conv2d(i, i, 3, s, 1, groups=i, bias=False), nn.BatchNorm2d(i),
                       nn.ReLU6(), nn.Conv2d(i, o, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cfg[-1][1], classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def _init(model: nn.Module, seed: int = 0) -> nn.Module:
    # Non-trivial BatchNorm statistics, so folding them is really tested.
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def cnn(small: bool = False):
    torch.manual_seed(0)
    size = 64 if small else 224
    return _init(ConvNet()), (torch.randn(1, 3, size, size),)


def mobilenet(small: bool = False):
    torch.manual_seed(0)
    size = 64 if small else 224
    return _init(MobileNetish()), (torch.randn(1, 3, size, size),)


def bert(small: bool = False):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    h, layers, seq = (64, 2, 32) if small else (256, 4, 128)
    cfg = BertConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=4 * h, vocab_size=30522, attn_implementation="eager")
    return BertModel(cfg).eval(), (torch.randint(0, cfg.vocab_size, (1, seq)),)


def vit(small: bool = False):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    h, layers, size = (64, 2, 64) if small else (192, 4, 224)
    cfg = ViTConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=4 if small else 3,
                    intermediate_size=4 * h, image_size=size, patch_size=16,
                    attn_implementation="eager")
    return ViTModel(cfg, add_pooling_layer=False).eval(), (torch.randn(1, 3, size, size),)


def gpt2(small: bool = False):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    h, layers, seq = (64, 2, 32) if small else (256, 4, 128)
    cfg = GPT2Config(n_embd=h, n_layer=layers, n_head=4, use_cache=False,
                     attn_implementation="eager")
    return GPT2Model(cfg).eval(), (torch.randint(0, cfg.vocab_size, (1, seq)),)


MODELS = {"cnn": cnn, "mobilenet": mobilenet, "bert": bert, "vit": vit, "gpt2": gpt2}
