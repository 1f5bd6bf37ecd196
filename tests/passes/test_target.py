"""The target pass (src/lavise_cli/passes/target.py): the exact 0.995-quantile threshold, streamed.

(``RunningTopK`` itself is tested in test_stats.py.)  ``target_pass`` on a generated image
folder with a small factory model is checked against the cached maps and against the model run
by hand, and corrupt images are skipped and counted.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lavise_cli.data.images import View, apply_view_image, normalize, read_rgb
from lavise_cli.errors import LaviseError
from lavise_cli.models import load_model
from lavise_cli.store import Store
from lavise_cli.passes.target import SHARD_IMAGES, folder_target, target_pass

from test_stats import assert_exact_quantile as _assert_exact_quantile

# ----------------------------------------------------------------------------------------------
# target_pass on a generated folder
# ----------------------------------------------------------------------------------------------

# A tiny factory model.  Its layer ``feat`` outputs (N, 5, 4, 4) for 32x32 inputs, with values
# on a 1/16 grid (exactly representable in the fp16 cache), so the cached maps hold exactly the
# values the threshold was computed from.  Channel 1 is ReLU6-capped (saturates), channel 4 is
# always 0 (an inactive filter).
FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Quantise(nn.Module):
        def forward(self, x):
            return torch.round(x * 16.0) / 16.0


    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 1)
            with torch.no_grad():
                self.conv.weight.copy_(torch.tensor([
                    [1.0, -0.5, -0.5], [6.0, 6.0, 6.0], [-1.0, 1.0, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 0.0],
                ]).view(5, 3, 1, 1))
                self.conv.bias.copy_(torch.tensor([0.0, 0.0, 0.1, 0.2, -1.0]))
            self.act = nn.ReLU6()
            self.pool = nn.AvgPool2d(8)
            self.feat = Quantise()
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            f = self.feat(self.pool(self.act(self.conv(x))))
            return self.head(f.mean((2, 3)))


    def build():
        return Tiny(), {"input_size": 32, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    """
)


@pytest.fixture
def tiny_model(tmp_path: Path):
    f = tmp_path / "tiny_model.py"
    f.write_text(FACTORY)
    return load_model(f"{f}:build", "none")


def _write_folder(root: Path, n_good: int = 23) -> list[Path]:
    """``n_good`` seeded images of varied sizes and formats, plus two corrupt files; returns the good ones."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    good = []
    for i in range(n_good):
        w, h = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        if i % 5 == 0:
            arr[: h // 2] = (255, 255, 255)  # saturates channel 1 (ReLU6 cap)
        sub = root / ("nested" if i % 4 == 0 else "")
        sub.mkdir(exist_ok=True)
        p = sub / f"img_{i:03d}.{'png' if i % 3 == 0 else 'jpg'}"
        Image.fromarray(arr).save(p)
        good.append(p)
    (root / "img_900_garbage.jpg").write_bytes(b"not an image\n" * 40)
    buf = good[0].read_bytes()
    (root / "img_901_truncated.png").write_bytes(buf[: len(buf) // 3])
    (root / "notes.txt").write_text("not an image file: ignored by extension")
    return sorted(good)


def test_target_pass_threshold_and_stats_match_cached_maps(tmp_path: Path, tiny_model) -> None:
    store = Store(tmp_path / "home")
    folder = tmp_path / "imgs"
    good = _write_folder(folder)
    target = folder_target(folder)
    assert len(target.paths) == len(good) + 2  # the two corrupt files are listed, the .txt is not
    cache = target_pass(store, tiny_model, "feat", target, batch_size=5, workers=0)
    assert not cache.hit
    d, h, w = cache.shape
    assert (d, h, w) == (5, 4, 4)

    # Corrupt images are skipped and counted.
    assert cache.n == len(good)
    kept = [target.paths[int(r)] for r in cache.rows]
    assert sorted(kept) == good
    assert all("img_90" not in p.name for p in kept)
    assert store.manifest("targets", cache.root.name)["failed_images"] == 2

    maps = cache.maps(torch.arange(cache.n))
    assert maps.shape == (cache.n, d, h, w)
    vals = maps.permute(1, 0, 2, 3).reshape(d, -1)
    _assert_exact_quantile(cache.threshold, vals)
    assert torch.equal(cache.img_max, maps.flatten(2).amax(2))
    assert torch.allclose(cache.img_mean, maps.flatten(2).mean(2), rtol=0, atol=1e-6)
    assert float(cache.threshold[1]) == 6.0  # saturated filter: the threshold is the cap itself
    assert float(cache.threshold[4]) == 0.0  # dead filter

    # The cached maps are the model's own output for each image (rows in target order).
    net = tiny_model.module
    pre = tiny_model.preprocess
    for r in (0, 5, cache.n - 1):
        x = normalize(apply_view_image(read_rgb(kept[r]), View(), pre.input_size), pre.mean, pre.std)
        ref = net.feat(net.pool(net.act(net.conv(x[None]))))[0]
        assert torch.allclose(maps[r], ref, atol=1e-6), r

    # A second pass is served from the store, identical.
    again = target_pass(store, tiny_model, "feat", target, batch_size=7, workers=0)
    assert again.hit
    assert torch.equal(again.threshold, cache.threshold)
    assert torch.equal(again.rows, cache.rows)
    assert torch.equal(again.maps([3, 0]), maps[[3, 0]])


def test_target_pass_maps_span_several_shards(tmp_path: Path, tiny_model) -> None:
    """More images than one shard holds (SHARD_IMAGES): rows across shards come back in the order asked."""
    n = SHARD_IMAGES + 9
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)).save(folder / f"m{i:04d}.png")
    store = Store(tmp_path / "home")
    # a shard per checkpoint, due once SHARD_IMAGES rows are waiting: 256 rows, then 9
    cache = target_pass(store, tiny_model, "feat", folder_target(folder), batch_size=32, workers=0)
    assert cache.n == n
    assert len(list(cache.root.glob("maps-*.safetensors"))) == 2 and cache.shard_starts() == [0, SHARD_IMAGES, n]
    every = cache.maps(torch.arange(cache.n))
    order = [n - 1, 0, SHARD_IMAGES, SHARD_IMAGES - 1, 3, SHARD_IMAGES + 1]
    assert torch.equal(cache.maps(order), every[order])
    assert torch.equal(every.flatten(2).amax(2), cache.img_max)
    # the per-image statistics are stored beside the maps, shard for shard, not in memory
    images = sorted(cache.root.glob("images-*.safetensors"))
    assert len(images) == 2
    assert set(load_file(str(cache.root / "stats.safetensors"))) == {"threshold", "shape"}
    assert [load_file(str(p))["max"].shape[0] for p in images] == [SHARD_IMAGES, 9]
    assert torch.equal(cache.rows, torch.arange(n))
    d = cache.shape[0]
    _assert_exact_quantile(cache.threshold, every.permute(1, 0, 2, 3).reshape(d, -1))


def test_folder_target_errors(tmp_path: Path) -> None:
    with pytest.raises(LaviseError):
        folder_target(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(LaviseError):
        folder_target(tmp_path / "empty")
