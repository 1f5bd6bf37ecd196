"""The cached feature pass (src/lavise_cli/features.py).

The cached ``z`` of every (image, concept, view) is checked against a direct computation written
here from scratch: PIL decodes the JPEG, torchvision.transforms.functional crops, resizes, flips
and normalises it, a forward hook takes the layer's output, and the concept's binary mask (known
exactly: it is written as an uncompressed-RLE crowd annotation) is cropped like the image,
reduced to the fraction of each feature-grid cell that it covers (exactly: every pixel is
repeated grid-size times, so that cells fall on whole sub-pixels, then averaged per cell) and
flipped like the image.  The crop boxes fall on whole pixels; the grid cells do not always.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
import torchvision.transforms.v2.functional as TF2
from PIL import Image
from torchvision.transforms import InterpolationMode

from lavise_cli.passes import features as features_mod
from lavise_cli.data.images import named_views
from lavise_cli.data.index import DatasetIndex, load_index, preprocess
from lavise_cli.download import register_coco
from lavise_cli.embeddings import register_embedding
from lavise_cli.features import feature_key, pooled_masked, reference_features
from lavise_cli.models import TargetModel, load_model
from lavise_cli.store import Store
from lavise_cli.testing import rle_counts

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SIZE = 96  # resnet18 at 96 px: layer3 is 256 x 6 x 6, layer4 512 x 3 x 3
LAYERS = ["layer3", "layer4"]
VIEW_NAMES = ["full", "flip", "crop", "crop-flip"]
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
WORDS = ["the", "person", "car", "dog", "cat", "sky"]


def _masks(h: int, w: int, seed: int) -> dict[int, np.ndarray]:
    """Asymmetric masks (neither left-right nor top-bottom symmetric, crossing cell edges)."""
    rng = np.random.default_rng(seed)
    person = np.zeros((h, w), np.uint8)
    person[2 : h // 2 + 3, 3 : 3 + w // 5] = 1  # vertical bar of an L, top-left
    person[h // 2 : h // 2 + 5, 3 : w // 2 + 4] = 1  # its foot
    car = np.zeros((h, w), np.uint8)
    car[h // 3 : h - 2, w - w // 3 - 1 : w - 1] = 1
    car &= (rng.random((h, w)) < 0.8).astype(np.uint8)  # ragged, so fractions are not only 0/1
    car[h // 3, w - 2] = 1
    return {1: person, 3: car}


def write_dataset(root: Path, sizes: list[tuple[int, int]]) -> dict[str, dict[int, np.ndarray]]:
    """A COCO instances layout (split train): noise JPEGs of the given (width, height), each with a
    person and a car crowd mask (and a dog on the first). Returns file name -> {category id: mask}."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "train2017").mkdir(parents=True, exist_ok=True)
    images, anns, truth = [], [], {}
    for k, (w, h) in enumerate(sizes):
        name = f"img_{k:03d}.jpg"
        rng = np.random.default_rng(100 + k)
        # smooth-ish content with a left-right gradient, so a flip changes the features
        arr = rng.integers(0, 256, size=(h, w, 3)).astype(np.float64) * 0.5
        arr += np.linspace(0, 120, w)[None, :, None]
        Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB").save(root / "train2017" / name, quality=92)
        images.append({"id": k + 1, "file_name": name, "width": w, "height": h})
        masks = _masks(h, w, k)
        if k == 0:
            dog = np.zeros((h, w), np.uint8)
            dog[h - h // 4 :, : w // 3] = 1
            masks[18] = dog
        truth[name] = masks
        for cat, m in masks.items():
            ys, xs = np.nonzero(m)
            anns.append({"id": len(anns) + 1, "image_id": k + 1, "category_id": cat, "iscrowd": 1,
                         "segmentation": {"counts": rle_counts(m), "size": [h, w]}, "area": float(m.sum()),
                         "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]})
    doc = {"images": images, "annotations": anns, "categories": CATEGORIES}
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(doc))
    return truth


def make_store(home: Path, data_root: Path, glove: Path) -> tuple[Store, DatasetIndex]:
    st = Store(home)
    register_coco(st, data_root, "gen")
    register_embedding(st, glove, name="tiny")
    preprocess(st, "gen", embedding="tiny", workers=1)
    return st, load_index(st, "gen")


def write_glove(path: Path) -> Path:
    rng = np.random.default_rng(0)
    with open(path, "w") as fh:
        for word in WORDS:
            fh.write(word + " " + " ".join(f"{x:.5f}" for x in rng.normal(size=8)) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two non-square images (landscape 60x40, portrait 50x70): crop boxes on whole pixels, grid
    cells (6x6 and 3x3) on whole pixels in some directions and splitting pixels in others."""
    base = tmp_path_factory.mktemp("features")
    truth = write_dataset(base / "coco", [(60, 40), (50, 70)])
    glove = write_glove(base / "glove.8d.txt")
    st, ix = make_store(base / "home", base / "coco", glove)
    return {"base": base, "truth": truth, "glove": glove, "store": st, "index": ix}


@pytest.fixture(scope="module")
def r18() -> TargetModel:
    return load_model("resnet18", "none", input_size=SIZE)


# ------------------------------------------------------------------------------------------
# The direct computation
# ------------------------------------------------------------------------------------------


def direct_features(model: TargetModel, image_file: Path, box: tuple[float, ...], flip: bool
                    ) -> tuple[dict[str, torch.Tensor], tuple[int, int, int, int]]:
    """F(x) of every layer in LAYERS for one image under one view, from scratch; and the crop box."""
    with Image.open(image_file) as im:
        arr = np.asarray(im.convert("RGB"))
    h0, w0 = arr.shape[:2]
    x0, y0, x1, y1 = box
    for a, s in ((x0, w0), (y0, h0), (x1, w0), (y1, h0)):
        assert float(a * s).is_integer(), "test images must put the crop on whole pixels"
    left, top, right, bottom = (int(v) for v in np.rint([x0 * w0, y0 * h0, x1 * w0, y1 * h0]))
    # torchvision's v2 pipeline (what transforms.v2.Resize runs): crop and resize the uint8 image
    # natively, then scale to [0, 1]
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    x = TF.crop(x, top, left, bottom - top, right - left)
    x = TF2.resize(x, [SIZE, SIZE], interpolation=InterpolationMode.BILINEAR, antialias=True)
    assert x.dtype == torch.uint8
    x = x.float() / 255.0
    if flip:
        x = TF.hflip(x)
    x = TF.normalize(x, list(model.preprocess.mean), list(model.preprocess.std))
    out: dict[str, torch.Tensor] = {}
    mods = dict(model.module.named_modules())
    handles = [mods[name].register_forward_hook(lambda _m, _i, o, name=name: out.__setitem__(name, o.detach()))
               for name in LAYERS]
    try:
        with torch.no_grad():
            model.module(x[None].contiguous())
    finally:
        for h in handles:
            h.remove()
    return {k: v[0].float() for k, v in out.items()}, (left, top, right, bottom)


def direct_z(feat: torch.Tensor, mask: np.ndarray, crop: tuple[int, int, int, int], flip: bool) -> torch.Tensor:
    """mean_hw(F * M'): M' the mask cropped like the image, area-averaged onto the grid, flipped."""
    left, top, right, bottom = crop
    _, gh, gw = feat.shape
    m = mask[top:bottom, left:right].astype(np.float64)
    hc, wc = m.shape
    # each pixel repeated (gh, gw) times: cell (i, j) is then exactly hc x wc sub-pixels
    fine = np.repeat(np.repeat(m, gh, axis=0), gw, axis=1)
    m = torch.from_numpy(fine.reshape(gh, hc, gw, wc).mean(axis=(1, 3))).float()  # fraction of each cell covered
    if flip:
        m = torch.flip(m, dims=[-1])
    return (feat * m).mean(dim=(1, 2))


def _rows(f: Any) -> dict[tuple[int, int, int], int]:
    keys = list(zip(f.image.tolist(), f.concept.tolist(), f.view.tolist()))
    assert len(set(keys)) == len(keys), "duplicate (image, concept, view) rows"
    return {k: r for r, k in enumerate(keys)}


def _assert_fp16_close(cached: torch.Tensor, ref: torch.Tensor) -> None:
    assert cached.dtype == torch.float16
    scale = float(ref.abs().max())
    assert scale > 0
    torch.testing.assert_close(cached.float(), ref, rtol=2e-3, atol=2e-3 * scale)


# ------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------


def test_cached_z_equals_direct_masked_forward_and_pool(data: dict[str, Any], r18: TargetModel) -> None:
    st, ix = data["store"], data["index"]
    split = ix.splits["train"]
    views = named_views(",".join(VIEW_NAMES))
    res = reference_features(st, r18, LAYERS, split, ix.digest, views=views, batch_size=2, workers=0)
    assert set(res) == set(LAYERS)
    cat_ids = {c["name"]: c["id"] for c in CATEGORIES}
    direct = {(i, v): direct_features(r18, split.image_path(i), view.box, view.flip)
              for i in range(len(split.images)) for v, view in enumerate(views)}
    checked = 0
    for layer in LAYERS:
        f = res[layer]
        assert not f.hit and f.layer == layer
        assert f.z.shape[1] == {"layer3": 256, "layer4": 512}[layer]
        assert tuple(direct[(0, 0)][0][layer].shape[1:]) == {"layer3": (6, 6), "layer4": (3, 3)}[layer]
        rows = _rows(f)
        n_pairs = sum(len(m) for m in data["truth"].values())
        assert len(rows) == n_pairs * len(views)
        for i, info in enumerate(split.images):
            for cname, cid in cat_ids.items():
                if cid not in data["truth"][info["file"]]:
                    continue
                mask = data["truth"][info["file"]][cid]
                c = ix.concepts.index(cname)
                per_view = {}
                for v, (vname, view) in enumerate(zip(VIEW_NAMES, views)):
                    feats, crop = direct[(i, v)]
                    ref = direct_z(feats[layer], mask, crop, view.flip)
                    cached = f.z[rows[(i, c, v)]]
                    _assert_fp16_close(cached, ref)
                    per_view[vname] = ref
                    if view.flip:
                        # the check can fail: the same pair with the mask left unflipped is far off
                        wrong = direct_z(feats[layer], mask, crop, False)
                        assert not torch.allclose(cached.float(), wrong, rtol=2e-3,
                                                  atol=2e-3 * float(wrong.abs().max()))
                    checked += 1
                # the views really differ
                for a, b in (("full", "flip"), ("full", "crop"), ("crop", "crop-flip")):
                    assert not torch.allclose(per_view[a], per_view[b], rtol=1e-2, atol=1e-3)
    assert checked == 2 * 5 * 4


def test_second_call_is_a_cache_hit_with_identical_tensors(data: dict[str, Any], r18: TargetModel) -> None:
    st, ix = data["store"], data["index"]
    split = ix.splits["train"]
    views = named_views("full,flip")
    first = reference_features(st, r18, ["layer4"], split, ix.digest, views=views, workers=0)["layer4"]
    second = reference_features(st, r18, ["layer4"], split, ix.digest, views=views, workers=0)["layer4"]
    assert not first.hit and second.hit
    assert first.key == second.key == feature_key(r18, "layer4", split, ix.digest, views)
    for name in ("z", "image", "concept", "view"):
        a, b = getattr(first, name), getattr(second, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert st.exists("features", first.key)
    # nothing of the pass is left behind
    assert not list(st.kind_dir("features").glob(".partial-*"))


def test_changed_inputs_are_a_cache_miss(data: dict[str, Any], r18: TargetModel) -> None:
    st, ix = data["store"], data["index"]
    split = ix.splits["train"]
    full = named_views("full")
    base = reference_features(st, r18, ["layer4"], split, ix.digest, views=full, workers=0)["layer4"]
    again = reference_features(st, r18, ["layer4"], split, ix.digest, views=full, workers=0)["layer4"]
    assert again.hit
    # another layer: a miss for it, a hit for the cached one, in the same call
    mixed = reference_features(st, r18, ["layer4", "layer2"], split, ix.digest, views=full, workers=0)
    assert mixed["layer4"].hit and not mixed["layer2"].hit
    assert mixed["layer2"].z.shape == (base.z.shape[0], 128)
    # other views
    crop = reference_features(st, r18, ["layer4"], split, ix.digest, views=named_views("crop"), workers=0)["layer4"]
    assert not crop.hit and crop.key != base.key
    assert not torch.equal(crop.z, base.z)
    # another input size (the model's preprocessing)
    r18_64 = load_model("resnet18", "none", input_size=64)
    other = reference_features(st, r18_64, ["layer4"], split, ix.digest, views=full, workers=0)["layer4"]
    assert not other.hit and other.key != base.key


def test_pooled_masked_equals_a_loop() -> None:
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        n, d, h, w, p = 3, 5, 4, 6, 9
        feat = torch.randn(n, d, h, w, generator=g)
        owner = torch.randint(0, n, (p,), generator=g)
        masks = torch.rand(p, h, w, generator=g)
        expect = torch.zeros(p, d)
        for k in range(p):
            for c in range(d):
                total = 0.0
                for y in range(h):
                    for x in range(w):
                        total += float(feat[owner[k], c, y, x]) * float(masks[k, y, x])
                expect[k, c] = total / (h * w)
        torch.testing.assert_close(pooled_masked(feat, owner, masks), expect, rtol=1e-5, atol=1e-6)


class _Interrupt:
    """Wraps the real image reader: counts calls, and raises KeyboardInterrupt on call ``at``."""

    def __init__(self, real: Any, at: int | None):
        self.real, self.at, self.calls = real, at, 0
        self.lock = threading.Lock()

    def __call__(self, path: Any) -> torch.Tensor:
        with self.lock:
            self.calls += 1
            n = self.calls
        if self.at is not None and n == self.at:
            raise KeyboardInterrupt
        return self.real(path)


def test_interrupted_pass_resumes_and_equals_an_uninterrupted_one(
    tmp_path: Path, r18: TargetModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = [(60, 40), (40, 60), (80, 40), (60, 40), (40, 40), (60, 80)]
    truth = write_dataset(tmp_path / "coco", sizes)
    glove = write_glove(tmp_path / "glove.8d.txt")
    views = named_views("full,crop-flip")
    real_read = features_mod.read_rgb

    # uninterrupted, in its own store
    st_a, ix_a = make_store(tmp_path / "home_a", tmp_path / "coco", glove)
    ref = reference_features(st_a, r18, ["layer4"], ix_a.splits["train"], ix_a.digest, views=views,
                             batch_size=1, workers=0)["layer4"]

    # interrupted after two images (one shard per image), then resumed
    st_b, ix_b = make_store(tmp_path / "home_b", tmp_path / "coco", glove)
    split = ix_b.splits["train"]
    monkeypatch.setattr(features_mod, "SHARD_PAIRS", 1)
    stop = _Interrupt(real_read, at=3)
    monkeypatch.setattr(features_mod, "read_rgb", stop)
    with pytest.raises(KeyboardInterrupt):
        reference_features(st_b, r18, ["layer4"], split, ix_b.digest, views=views, batch_size=1, workers=0)
    key = feature_key(r18, "layer4", split, ix_b.digest, views)
    assert not st_b.exists("features", key)
    partials = list(st_b.kind_dir("features").glob(".partial-*"))
    assert len(partials) == 1
    state = json.loads((partials[0] / "state-p000000000.json").read_text())
    assert state["next"] == 2 and state["shards"] == 2
    assert len(list((partials[0] / key).glob("z-p000000000-*.safetensors"))) == 2

    count = _Interrupt(real_read, at=None)
    monkeypatch.setattr(features_mod, "read_rgb", count)
    resumed = reference_features(st_b, r18, ["layer4"], split, ix_b.digest, views=views, batch_size=1,
                                 workers=0)["layer4"]
    assert count.calls == len(sizes) - 2, "the resumed pass read the finished images again"
    assert not resumed.hit and st_b.exists("features", key)
    assert not list(st_b.kind_dir("features").glob(".partial-*"))
    for name in ("z", "image", "concept", "view"):
        assert torch.equal(getattr(resumed, name), getattr(ref, name)), name
    assert len(resumed.z) == sum(len(m) for m in truth.values()) * len(views)
    again = reference_features(st_b, r18, ["layer4"], split, ix_b.digest, views=views, workers=0)["layer4"]
    assert again.hit and torch.equal(again.z, ref.z)
