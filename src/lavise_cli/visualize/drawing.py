"""Regions to pixels: the dimmed image with the region's outline, and regions as compact data.

Pure tensor/array functions, no store and no session: :func:`highlight` draws a region over an
image as the heatmap figures show it; :func:`encode_mask` / :func:`decode_mask` turn a region
into the short run-length text the report page draws its overlays from (its JavaScript decoder
mirrors :func:`decode_mask`).
"""

from __future__ import annotations

import base64

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

DIM = 0.35  # pixels outside the region are multiplied by this (toward black)
OUTLINE = (255, 214, 0)  # the region's outline: bright yellow
WIDTH = 2  # outline width in pixels at the model's input resolution


def outline(region: torch.Tensor, width: int = WIDTH) -> torch.Tensor:
    """The inner boundary of a boolean region: ``region & ~eroded(region)``, ``width`` pixels thick.

    ``region`` is ``(H, W)`` or ``(B, H, W)`` bool.  Erosion is a min-pool (a max-pool of the
    complement) over a ``(2*width+1)²`` window; the image border is not a boundary (max-pool
    pads with -inf), so a region that runs off the image is not closed along the edge.
    """
    if width <= 0:
        return torch.zeros_like(region, dtype=torch.bool)
    squeeze = region.dim() == 2
    r = region[None] if squeeze else region
    comp = (~r).float()[:, None]  # (B, 1, H, W): 1 outside the region
    near_outside = F.max_pool2d(comp, kernel_size=2 * width + 1, stride=1, padding=width)[:, 0] > 0
    edge = r & near_outside
    return edge[0] if squeeze else edge


def highlight(image: torch.Tensor, region: torch.Tensor, *, dim: float = DIM, width: int = WIDTH,
              color: tuple[int, int, int] = OUTLINE) -> torch.Tensor:
    """The image with everything outside ``region`` dimmed and the region's outline drawn.

    ``image`` float ``(3, H, W)`` or ``(B, 3, H, W)`` in [0, 1]; ``region`` bool ``(H, W)`` or
    ``(B, H, W)``.  Returns a float tensor of the image's shape: inside the region the image is
    unchanged except for the outline pixels (``color``, on the region's inner boundary); outside
    it is ``image * dim``.
    """
    squeeze = image.dim() == 3
    img = image[None] if squeeze else image
    reg = region[None] if region.dim() == 2 else region
    reg = reg.to(torch.bool)
    out = torch.where(reg[:, None], img, img * dim)
    edge = outline(reg, width)
    col = torch.tensor(color, dtype=img.dtype, device=img.device).view(1, 3, 1, 1) / 255.0
    out = torch.where(edge[:, None], col.expand_as(out), out)
    return out[0] if squeeze else out


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [0, 1] ``(3, H, W)`` or ``(B, 3, H, W)`` -> uint8 ``(H, W, 3)`` / ``(B, H, W, 3)``, rounded."""
    return (x.clamp(0, 1) * 255.0).round().to(torch.uint8).movedim(-3, -1).contiguous()


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(to_uint8(x).numpy(), "RGB")


# -- regions as data ---------------------------------------------------------------------------


def _varints(values: np.ndarray) -> bytes:
    """Unsigned LEB128: 7 bits a byte, low bits first, the high bit set on all but the last byte."""
    out = bytearray()
    for v in values.tolist():
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def encode_mask(mask: np.ndarray | torch.Tensor) -> str:
    """A boolean ``(H, W)`` mask as base64 run lengths (row-major, the first run outside the region).

    The runs alternate outside / inside and add up to ``H * W``; each is an unsigned LEB128
    varint.  A blob-like region of a 128 px thumbnail takes a few dozen bytes.
    """
    flat = np.asarray(mask, dtype=bool).reshape(-1)
    return encode_masks(flat[None])[0]


def encode_masks(masks: np.ndarray | torch.Tensor) -> list[str]:
    """:func:`encode_mask` of each of a batch of masks ``(B, ...)``, all at once (no loop over runs)."""
    arr = np.asarray(masks, dtype=bool)
    if len(arr) == 0:
        return []
    flat = arr.reshape(len(arr), -1)
    b, n = flat.shape
    if n == 0:
        return [""] * b
    # Run boundaries of every row: its start (with an empty first run when it starts inside),
    # every change of value, its end.
    r_chg, c_chg = np.divmod(np.flatnonzero(flat[:, 1:] != flat[:, :-1]), max(n - 1, 1))  # 1-D: faster
    starts_inside = flat[:, 0]
    rows = np.concatenate((np.repeat(np.arange(b), 1 + starts_inside), r_chg, np.arange(b)))
    pos = np.concatenate((np.zeros(int(b + starts_inside.sum()), np.int64), c_chg + 1, np.full(b, n)))
    order = np.lexsort((pos, rows))
    rows, pos = rows[order], pos[order]
    # Consecutive boundaries of one row make a run; the row's first boundary opens it.
    first = np.ones(len(rows), bool)
    first[1:] = rows[1:] != rows[:-1]
    runs = np.diff(pos)[~first[1:]]
    run_row = rows[1:][~first[1:]]
    # Unsigned LEB128 of every run at once: byte j of a run carries its bits 7j..7j+6.
    nbytes = np.ones(len(runs), np.int64)
    v = runs >> 7
    while v.any():
        nbytes += v > 0
        v >>= 7
    rep = np.repeat(np.arange(len(runs)), nbytes)
    j = np.arange(len(rep)) - np.repeat(np.cumsum(nbytes) - nbytes, nbytes)
    byte = (runs[rep] >> (7 * j)) & 0x7F
    byte |= np.where(j < nbytes[rep] - 1, 0x80, 0)
    data = byte.astype(np.uint8).tobytes()
    ends = np.cumsum(np.bincount(run_row, weights=nbytes, minlength=b).astype(np.int64))
    return [base64.b64encode(data[e0:e1]).decode("ascii") for e0, e1 in zip(np.concatenate(([0], ends[:-1])), ends)]


def decode_mask(text: str, height: int, width: int) -> np.ndarray:
    """The inverse of :func:`encode_mask`: a boolean ``(height, width)`` array."""
    data = base64.b64decode(text)
    runs, v, shift = [], 0, 0
    for b in data:
        v |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            runs.append(v)
            v, shift = 0, 0
    if sum(runs) != height * width:
        raise ValueError(f"mask runs add up to {sum(runs)}, not {height} x {width}")
    values = np.arange(len(runs)) % 2 == 1  # outside, inside, outside, ...
    return np.repeat(values, runs).reshape(height, width)
