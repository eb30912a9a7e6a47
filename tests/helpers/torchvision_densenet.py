"""An independent DenseNet121 with torchvision's module names, in plain ``torch.nn``.

torchvision cannot be imported here, and public chest X-ray checkpoints (CheXNet
re-implementations, torchxrayvision) are saved from this layout (``features.denseblockN.
denselayerM.norm1``, ``classifier``). Tests write random state dicts from it in a source's
exact key layout and use its forward as the truth an imported MONAI network must match.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class RefDenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int = 32, bn_size: int = 4) -> None:
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(bn_size * growth), nn.ReLU()
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))
        return torch.cat([x, new], 1)


class RefDenseNet121(nn.Module):
    """torchvision.models.densenet121 / xrv.models.DenseNet: ``features`` + ``classifier``."""

    def __init__(self, in_channels: int, outputs: int, sigmoid_head: bool = False) -> None:
        super().__init__()
        parts: list[tuple[str, nn.Module]] = [
            ("conv0", nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(64)), ("relu0", nn.ReLU()),
            ("pool0", nn.MaxPool2d(3, stride=2, padding=1)),
        ]  # fmt: skip
        channels = 64
        for b, layers in enumerate((6, 12, 24, 16), start=1):
            block = nn.Sequential(OrderedDict(
                (f"denselayer{i + 1}", RefDenseLayer(channels + i * 32)) for i in range(layers)
            ))  # fmt: skip
            parts.append((f"denseblock{b}", block))
            channels += layers * 32
            if b < 4:
                parts.append((f"transition{b}", nn.Sequential(OrderedDict([
                    ("norm", nn.BatchNorm2d(channels)), ("relu", nn.ReLU()),
                    ("conv", nn.Conv2d(channels, channels // 2, 1, bias=False)),
                    ("pool", nn.AvgPool2d(2, stride=2))]))))  # fmt: skip
                channels //= 2
        parts.append(("norm5", nn.BatchNorm2d(channels)))
        self.features = nn.Sequential(OrderedDict(parts))
        linear = nn.Linear(channels, outputs)
        self.classifier = nn.Sequential(linear, nn.Sigmoid()) if sigmoid_head else linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.adaptive_avg_pool2d(F.relu(self.features(x)), 1).flatten(1)
        return self.classifier(out)


def randomised(model: nn.Module, seed: int) -> nn.Module:
    """Random weights everywhere, BatchNorm statistics included (defaults would hide a
    mis-mapped running_mean / running_var)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
            elif isinstance(module, nn.Conv2d | nn.Linear):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * math.sqrt(2 / fan_in))
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
    return model.eval()


def old_style(key: str) -> str:
    """torchvision < 0.3 names (``norm.1``), as the arnoweng CheXNet checkpoint has them."""
    return re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key)
