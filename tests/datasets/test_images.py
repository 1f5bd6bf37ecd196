"""Image decoding and the views that images and their masks share (src/lavise_cli/data/images.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lavise_cli.data.images import (
    View,
    apply_view_image,
    apply_view_masks,
    masks_at,
    named_views,
    probe_image,
    read_rgb,
)
from lavise_cli.errors import DataError, LaviseError


def _planted(h: int, w: int, rows: slice, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """A dark noisy uint8 image ``(3, h, w)`` with a bright block, and the block's mask ``(1, h, w)``."""
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 60, (3, h, w), generator=g, dtype=torch.uint8)
    img[:, rows, cols] = 230
    mask = torch.zeros(1, h, w, dtype=torch.uint8)
    mask[:, rows, cols] = 1
    return img, mask


def _bright_cells(img: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Fraction of each grid cell that is bright in a float ``(3, S, S)`` image in [0, 1]."""
    bright = (img.mean(0) > 0.5).float()
    return F.adaptive_avg_pool2d(bright[None, None], grid)[0, 0]


# ----------------------------------------------------------------------------------------------
# Image and mask stay aligned
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flip", [False, True])
def test_crop_and_flip_keep_mask_on_image_exactly(flip: bool) -> None:
    # 160 wide x 80 high; the crop keeps x 40..120, y 20..60, i.e. 4 x 4 cells of 20 x 10 pixels.
    # The block (x 40..60, y 20..40) fills cells (0, 0) and (1, 0) of the crop: (0, 3), (1, 3) flipped.
    img, mask = _planted(80, 160, slice(20, 40), slice(40, 60))
    view = View((0.25, 0.25, 0.75, 0.75), flip=flip)
    assert view.pixel_box(80, 160) == (40, 20, 120, 60)
    x = apply_view_image(img, view, 32)
    m = apply_view_masks(mask, view, (4, 4))[0]
    expected = torch.zeros(4, 4)
    col = 3 if flip else 0
    expected[0:2, col] = 1.0
    torch.testing.assert_close(m, expected)
    torch.testing.assert_close((_bright_cells(x, (4, 4)) > 0.5).float(), expected)


@pytest.mark.parametrize("spec", ["full", "flip", "crop", "crop-flip"])
def test_named_views_keep_mask_on_image(spec: str) -> None:
    # An asymmetric block (left of centre, upper half) on a non-square image.
    img, mask = _planted(90, 150, slice(15, 50), slice(22, 70))
    (view,) = named_views(spec)
    grid = (7, 7)
    x = apply_view_image(img, view, 112)
    assert x.shape == (3, 112, 112) and x.dtype == torch.float32
    m = apply_view_masks(mask, view, grid)[0]
    assert m.shape == grid
    cov = _bright_cells(x, grid)
    assert (cov - m).abs().max() < 0.2, (cov, m)
    assert (cov - m).abs().mean() < 0.05
    assert torch.equal(m > 0.5, cov > 0.5)
    # The same view at the input resolution: masks_at marks exactly the bright pixels (up to the
    # one-pixel blur at the block's border).
    at = masks_at(mask, view, 112)[0]
    bright = x.mean(0) > 0.5
    assert (at != bright).float().mean() < 0.03


def test_flip_and_crop_are_the_images_not_centre_crops() -> None:
    """A view that flips or crops must move the mask: comparing with the identity view fails."""
    _, mask = _planted(80, 160, slice(20, 40), slice(40, 60))
    same = apply_view_masks(mask, View(), (4, 4))
    assert not torch.equal(same, apply_view_masks(mask, View(flip=True), (4, 4)))
    assert not torch.equal(same, apply_view_masks(mask, View((0.25, 0.25, 0.75, 0.75)), (4, 4)))


# ----------------------------------------------------------------------------------------------
# Cell coverage, exactly
# ----------------------------------------------------------------------------------------------


def test_apply_view_masks_is_exact_cell_coverage() -> None:
    m = torch.zeros(2, 4, 4, dtype=torch.uint8)
    m[0, 0, 0] = m[0, 0, 1] = m[0, 1, 0] = 1  # 3 of the 4 pixels of cell (0, 0)
    m[0, 3, 3] = 1  # 1 of the 4 pixels of cell (1, 1)
    m[1] = 1
    out = apply_view_masks(m, View(), (2, 2))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0], torch.tensor([[0.75, 0.0], [0.0, 0.25]]), rtol=0, atol=0)
    torch.testing.assert_close(out[1], torch.ones(2, 2), rtol=0, atol=0)
    flipped = apply_view_masks(m, View(flip=True), (2, 2))
    torch.testing.assert_close(flipped[0], torch.tensor([[0.0, 0.75], [0.25, 0.0]]), rtol=0, atol=0)

    # A crop: only the pixels inside the box count.  8 x 8, box x 2..6, y 2..6 -> cells of 2 x 2.
    m = torch.zeros(1, 8, 8, dtype=torch.uint8)
    m[0, 2, 2] = m[0, 2, 3] = m[0, 3, 2] = 1  # cell (0, 0): 3/4
    m[0, 5, 5] = 1  # cell (1, 1): 1/4
    m[0, 0, :] = m[0, 7, :] = m[0, :, 0] = m[0, :, 7] = 1  # outside the crop: ignored
    out = apply_view_masks(m, View((0.25, 0.25, 0.75, 0.75)), (2, 2))[0]
    torch.testing.assert_close(out, torch.tensor([[0.75, 0.0], [0.0, 0.25]]), rtol=0, atol=0)

    # A non-square mask onto a non-square grid: 6 high x 4 wide -> 3 x 2 cells of 2 x 2.
    m = torch.zeros(1, 6, 4, dtype=torch.bool)
    m[0, 0:2, 0:2] = True  # cell (0, 0) full
    m[0, 2, 3] = True  # cell (1, 1): 1/4
    m[0, 4:6, 2] = True  # cell (2, 1): 2/4
    out = apply_view_masks(m, View(), (3, 2))[0]
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0], [0.0, 0.25], [0.0, 0.5]]), rtol=0, atol=0)


def test_apply_view_masks_exact_coverage_when_cells_split_pixels() -> None:
    m = torch.zeros(1, 2, 5, dtype=torch.uint8)
    m[0, :, 2] = 1
    out = apply_view_masks(m, View(), (1, 2))[0]
    torch.testing.assert_close(out, torch.tensor([[0.2, 0.2]]))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.float32])
def test_masks_are_never_divided_by_255(dtype: torch.dtype) -> None:
    full = torch.ones(1, 37, 53, dtype=dtype)
    for view in named_views("full,flip,crop,crop-flip"):
        out = apply_view_masks(full, view, (7, 7))
        assert torch.equal(out, torch.ones(1, 7, 7)), out.unique()
        assert masks_at(full, view, 64).all()
    half = torch.zeros(1, 40, 40, dtype=dtype)
    half[:, :, :20] = 1
    out = apply_view_masks(half, View(), (4, 4))
    assert out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(out[0, :, :2], torch.ones(4, 2), rtol=0, atol=0)
    torch.testing.assert_close(out[0, :, 2:], torch.zeros(4, 2), rtol=0, atol=0)
    assert masks_at(half, View(), 40)[0, :, :20].all() and not masks_at(half, View(), 40)[0, :, 20:].any()


def test_apply_view_image_scales_uint8_only() -> None:
    img = torch.full((3, 10, 20), 255, dtype=torch.uint8)
    torch.testing.assert_close(apply_view_image(img, View(), 8), torch.ones(3, 8, 8))
    flt = torch.full((3, 10, 20), 0.5)
    torch.testing.assert_close(apply_view_image(flt, View(flip=True), 8), torch.full((3, 8, 8), 0.5))


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def _save(path: Path, im: Image.Image, fmt: str) -> Path:
    im.save(path, format=fmt)
    return path


def test_read_rgb_keeps_orientation(tmp_path: Path) -> None:
    arr = np.zeros((24, 40, 3), np.uint8)  # 40 wide x 24 high
    arr[2, 30] = (255, 0, 0)
    arr[20, 3] = (0, 0, 255)
    x = read_rgb(_save(tmp_path / "a.png", Image.fromarray(arr), "PNG"))
    assert x.shape == (3, 24, 40) and x.dtype == torch.uint8
    assert x[:, 2, 30].tolist() == [255, 0, 0] and x[:, 20, 3].tolist() == [0, 0, 255]
    assert int(x.sum()) == 2 * 255
    assert probe_image(tmp_path / "a.png") == ("RGB", 24, 40)


def test_read_rgb_converts_modes(tmp_path: Path) -> None:
    gray = _save(tmp_path / "g.png", Image.new("L", (40, 24), 77), "PNG")
    x = read_rgb(gray)
    assert x.shape == (3, 24, 40) and bool((x == 77).all())

    rgba = Image.new("RGBA", (40, 24), (10, 20, 30, 0))
    rgba.putpixel((39, 0), (200, 100, 50, 255))
    x = read_rgb(_save(tmp_path / "a.png", rgba, "PNG"))
    assert x.shape == (3, 24, 40)
    assert x[:, 0, 39].tolist() == [200, 100, 50] and x[:, 5, 5].tolist() == [10, 20, 30]

    cmyk = Image.new("CMYK", (40, 24), (0, 255, 0, 0))  # magenta
    cmyk.putpixel((0, 23), (0, 0, 0, 0))  # white
    x = read_rgb(_save(tmp_path / "c.tif", cmyk, "TIFF"))
    assert x.shape == (3, 24, 40)
    assert x[:, 0, 0].tolist() == [255, 0, 255] and x[:, 23, 0].tolist() == [255, 255, 255]
    x = read_rgb(_save(tmp_path / "c.jpg", cmyk, "JPEG"))  # CMYK JPEG, as some COCO files are
    assert x.shape == (3, 24, 40)
    assert abs(x[:, 10, 20].int() - torch.tensor([255, 0, 255])).max() <= 8

    for p, mode in [(gray, "L"), (tmp_path / "a.png", "RGBA"), (tmp_path / "c.jpg", "CMYK")]:
        assert probe_image(p) == (mode, 24, 40)


def test_read_rgb_bad_files_raise_data_error(tmp_path: Path) -> None:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
    truncated = tmp_path / "t.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(DataError, match="cannot be decoded"):
        read_rgb(truncated)
    with pytest.raises(DataError, match="cannot be decoded"):
        probe_image(truncated)
    garbage = tmp_path / "g.jpg"
    garbage.write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot be decoded"):
        read_rgb(garbage)
    with pytest.raises(DataError, match="does not exist"):
        read_rgb(tmp_path / "missing.jpg")
    # A complete copy of the same bytes decodes.
    whole = tmp_path / "w.jpg"
    whole.write_bytes(buf.getvalue())
    assert read_rgb(whole).shape == (3, 64, 64)


def test_named_views_reject_unknown_names() -> None:
    assert named_views("full, flip") == [View(), View(flip=True)]
    assert named_views("") == [View()]
    with pytest.raises(LaviseError, match="unknown view 'zoom'") as e:
        named_views("full,zoom")
    assert e.value.exit_code == 2  # a bad option value, not bad data (3)
