"""A small MNIST CNN like the one of the Oramas et al. reproduction, as a lavise target model.

Four conv layers (8, 16, 32, 64 filters) and a dense head; ``conv4`` (its ReLU output, layer
``relu4``) is the last feature map, 64 x 7 x 7 at 28 px.  Train it on the MNIST digits of
``../shared/data/mnist`` (the official test set, IDX files) and write the other digits as an
image folder (one sub-folder per digit, named by the output index), then ask which filters each
digit depends on:

    python examples/mnist_cnn.py ../shared/data/mnist mnist-run/      # trains on 8k, writes 2k
    lavise relevant examples/mnist_cnn.py:build --weights mnist-run/mnist_cnn.pt \\
        --images mnist-run/digits --layer relu4 --per-class 8 --sweep-per-class 4,8,12,16

Inputs are grey digits read as RGB at 28 px; the model averages the three channels.
"""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

MEAN, STD = 0.1307, 0.3081  # MNIST pixel statistics on [0, 1]


class MnistCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()
        self.conv3, self.relu3 = nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()
        self.conv4, self.relu4 = nn.Conv2d(32, 64, 3, padding=1), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(64 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean(1, keepdim=True)  # grey digits arrive as RGB
        x = self.pool(self.relu1(self.conv1(x)))  # 14 x 14
        x = self.pool(self.relu2(self.conv2(x)))  # 7 x 7
        x = self.relu4(self.conv4(self.relu3(self.conv3(x))))  # 64 x 7 x 7
        return self.fc(torch.flatten(self.pool(x), 1))


def build() -> tuple[nn.Module, dict]:
    return MnistCNN(), {"input_size": 28, "mean": (MEAN,) * 3, "std": (STD,) * 3}


def read_idx(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The MNIST test set: images uint8 (10000, 28, 28), labels int64 (10000,)."""
    folder = Path(folder)
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz", "rb") as fh:
        _, n, h, w = struct.unpack(">IIII", fh.read(16))
        images = np.frombuffer(fh.read(), dtype=np.uint8).reshape(n, h, w)
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "rb") as fh:
        _, n2 = struct.unpack(">II", fh.read(8))
        labels = np.frombuffer(fh.read(), dtype=np.uint8).astype(np.int64)
    assert n == n2
    return images, labels


def train_cnn(images: np.ndarray, labels: np.ndarray, *, epochs: int = 2, seed: int = 0,
              batch: int = 128) -> nn.Module:
    """Adam, cross-entropy, seeded: the digits as the model sees them through lavise's preprocessing."""
    torch.manual_seed(seed)
    model = MnistCNN()
    x = (torch.from_numpy(np.array(images)).float()[:, None] / 255 - MEAN) / STD
    y = torch.from_numpy(np.array(labels))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def write_digits(images: np.ndarray, labels: np.ndarray, folder: Path) -> Path:
    """One PNG per digit in ``folder/<label>/``: the image-folder layout `lavise relevant` reads."""
    from PIL import Image

    folder = Path(folder)
    for i, (img, lab) in enumerate(zip(images, labels)):
        d = folder / str(int(lab))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.png")
    return folder


if __name__ == "__main__":
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    imgs, labs = read_idx(src)
    net = train_cnn(imgs[:8000], labs[:8000])
    dst.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), dst / "mnist_cnn.pt")
    write_digits(imgs[8000:], labs[8000:], dst / "digits")
    print(f"weights {dst / 'mnist_cnn.pt'}, digits {dst / 'digits'}")
