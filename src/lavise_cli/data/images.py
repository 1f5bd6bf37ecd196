"""Image decoding and the geometric views that images and their masks share.

Everything that decodes or resizes an image in lavise goes through here, so that an image and
its masks always see exactly the same transform.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..errors import DataError, LaviseError


@dataclass(frozen=True)
class View:
    """A crop (relative box ``x0, y0, x1, y1`` in [0, 1]) of the image, then an optional h-flip."""

    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    flip: bool = False

    def pixel_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        x0, y0, x1, y1 = self.box
        left, top = int(round(x0 * width)), int(round(y0 * height))
        right, bottom = max(left + 1, int(round(x1 * width))), max(top + 1, int(round(y1 * height)))
        return left, top, min(right, width), min(bottom, height)

    def as_list(self) -> list[float | bool]:
        return [*self.box, self.flip]


IDENTITY = View()


def named_views(spec: str) -> list[View]:
    """Views from a comma list: ``full``, ``flip``, ``crop`` (centre 80 %), ``crop-flip``."""
    table = {
        "full": View(),
        "flip": View(flip=True),
        "crop": View((0.1, 0.1, 0.9, 0.9)),
        "crop-flip": View((0.1, 0.1, 0.9, 0.9), flip=True),
    }
    out = []
    for name in [s.strip() for s in spec.split(",") if s.strip()]:
        if name not in table:
            raise LaviseError(f"unknown view {name!r} in --views; choose from {', '.join(table)}")  # a bad option: exit 2
        out.append(table[name])
    return out or [View()]


def read_rgb(path: str | Path) -> torch.Tensor:
    """Decode an image file to a ``uint8`` tensor ``(3, H, W)``; any mode is converted to RGB.

    Raises :class:`DataError` for a missing, unreadable or truncated file.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode != "RGB":
                im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"image {path} cannot be decoded ({e})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def probe_image(path: str | Path) -> tuple[str, int, int]:
    """(mode, height, width) after a full decode; raises DataError when the file is bad."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            w, h = im.size
            if im.format == "JPEG":
                # Decoding at reduced scale still reads every entropy-coded byte, so a truncated
                # or corrupt file fails here, at a fraction of the cost of a full decode.
                im.draft(im.mode, (max(1, w // 8), max(1, h // 8)))
            im.load()
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"image {path} cannot be decoded ({e})") from None
    return mode, h, w


def apply_view_image(img: torch.Tensor, view: View, size: int) -> torch.Tensor:
    """``uint8``/float ``(3, H, W)`` -> float ``(3, size, size)`` in [0, 1]: crop, resize, flip."""
    x = _resized(img, view, size)
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.clamp_(0.0, 1.0)


def model_input(img: torch.Tensor, view: View, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """The normalised model input of ``img`` under ``view``: ``normalize(apply_view_image(...))`` in one step."""
    x = _resized(img, view, size)
    if x.dtype == torch.uint8:
        x, scale = x.float(), 1.0 / 255.0
    else:
        x, scale = x.clamp(0.0, 1.0), 1.0
    s = torch.tensor([scale / v for v in std], dtype=x.dtype).view(-1, 1, 1)
    b = torch.tensor([-m / v for m, v in zip(mean, std)], dtype=x.dtype).view(-1, 1, 1)
    return torch.addcmul(b, x, s)


def _resized(img: torch.Tensor, view: View, size: int) -> torch.Tensor:
    """Crop, antialiased bilinear resize and flip; a ``uint8`` image is resized as ``uint8``.

    Resizing in ``uint8`` (rounded to the nearest level, like PIL and torchvision's ``Resize``)
    is about three times faster than in float and differs from it by less than one level.
    """
    _, h, w = img.shape
    left, top, right, bottom = view.pixel_box(h, w)
    x = img[:, top:bottom, left:right]
    if x.dtype not in (torch.uint8, torch.float32, torch.float64):
        x = x.float()
    x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    if view.flip:
        x = x.flip(-1)
    return x


def apply_view_masks(masks: torch.Tensor, view: View, grid: tuple[int, int]) -> torch.Tensor:
    """Binary masks ``(K, H, W)`` -> the fraction of each feature-grid cell they cover ``(K, h, w)``.

    The crop is the image's crop, in the same pixel coordinates; area averaging of the cropped
    mask onto the ``h x w`` grid gives each cell's coverage; the flip is the image's flip.
    """
    _, h, w = masks.shape
    left, top, right, bottom = view.pixel_box(h, w)
    m = masks[:, top:bottom, left:right].double()
    wy = _area_weights(bottom - top, grid[0])
    wx = _area_weights(right - left, grid[1])
    # (K, gh, gw): the exact covered fraction, also when cells split pixels (float64, then float32)
    m = (wy @ m @ wx.T).float().clamp_(0.0, 1.0)
    if view.flip:
        m = m.flip(-1)
    return m


def area_weights(length: int, cells: int) -> torch.Tensor:
    """``(cells, length)``: the share of cell ``j`` (``[j L/n, (j+1) L/n)``) that pixel ``x`` fills."""
    edges = torch.arange(cells + 1, dtype=torch.float64) * (length / cells)
    x0 = torch.arange(length, dtype=torch.float64)
    overlap = (torch.minimum(edges[1:, None], x0[None, :] + 1) - torch.maximum(edges[:-1, None], x0[None, :])).clamp_min(0)
    return overlap / (length / cells)


@lru_cache(maxsize=256)
def _area_weights(length: int, cells: int) -> torch.Tensor:
    return area_weights(length, cells)


def masks_at(masks: torch.Tensor, view: View, size: int) -> torch.Tensor:
    """Binary masks ``(K, H, W)`` at the model's input resolution ``(K, size, size)``, as bool."""
    _, h, w = masks.shape
    left, top, right, bottom = view.pixel_box(h, w)
    m = masks[:, top:bottom, left:right].float()
    m = F.interpolate(m[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    if view.flip:
        m = m.flip(-1)
    return m >= 0.5


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - m) / s


TRAINING_IMAGES_FILE = "training-images.safetensors"


def image_identities(paths: "list[Path] | tuple[Path, ...]") -> torch.Tensor:
    """A sorted int64 tensor identifying each image by its resolved path (8 bytes of blake2b).

    An explainer keeps the identities of the images it was trained on, so that a target set that
    shares images with them is noticed, whichever dataset or folder it comes from.
    """
    import hashlib
    import os

    ids = [int.from_bytes(hashlib.blake2b(os.path.realpath(p).encode(), digest_size=8).digest(), "little", signed=True)
           for p in paths]
    return torch.tensor(sorted(ids), dtype=torch.int64)


def count_shared(paths: "list[Path] | tuple[Path, ...]", known: torch.Tensor) -> int:
    """How many of ``paths`` are among the image identities ``known``."""
    if not len(paths) or not len(known):
        return 0
    return int(torch.isin(image_identities(paths), known).sum())
