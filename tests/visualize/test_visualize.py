"""`lavise heatmap` and `lavise report`: exact regions, clear errors, and the page in a real browser.

The store is built from generated images whose activation regions are known: a "CNN" of one
fixed stride-8 convolution (8 x 8 cells of a 64 px input) whose filter 0 fires only on the white
squares drawn into the images, its filter 1 only on the red ones.  The report is opened from
disk in Debian's headless Chromium, driven over the DevTools protocol on a pipe (no extra
package, no network port).
"""

from __future__ import annotations

import base64
import csv
import fcntl
import io
import json
import os
import re
import select
import shutil
import stat
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from conftest import assert_clear_error, write_glove
from lavise_cli.data.images import View, apply_view_image, read_rgb
from lavise_cli.data.index import preprocess
from lavise_cli.download import register_coco
from lavise_cli.embeddings import register_embedding
from lavise_cli.explain import regions
from lavise_cli.pipeline import evaluate_methods, explanation_doc, open_session, run_explain, vocabulary_for
from lavise_cli.store import Store
from lavise_cli.train import TrainSettings, train
from lavise_cli import visualize as viz

FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Squares(nn.Module):
        \"\"\"Filter 0: brightness above 0.5 (white squares); 1: red minus green; 2: blue minus red;
        3: darkness; 4: green minus red; 5: brightness.  One cell = 8 x 8 input pixels.\"\"\"

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, kernel_size=8, stride=8)
            w = torch.zeros(6, 3, 8, 8)
            b = torch.zeros(6)
            w[0] = 1 / 192
            b[0] = -0.5
            w[1, 0], w[1, 1] = 1 / 64, -1 / 64
            w[2, 2], w[2, 0] = 1 / 64, -1 / 64
            w[3] = -1 / 192
            b[3] = 0.5
            w[4, 1], w[4, 0] = 1 / 64, -1 / 64
            w[5] = 1 / 192
            with torch.no_grad():
                self.conv.weight.copy_(w)
                self.conv.bias.copy_(b)
            self.act = nn.ReLU()
            self.head = nn.Linear(6, 2)
            with torch.no_grad():
                self.head.weight.zero_()
                self.head.bias.zero_()

        def forward(self, x):
            return self.head(self.act(self.conv(x)).mean((2, 3)))


    def build():
        return Squares(), {"input_size": 64, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    """
)

SIZE = 64  # the model's input size
CELL = 8  # input pixels per feature-map cell
CATEGORIES = [{"id": 1, "name": "dog", "supercategory": "a"}, {"id": 2, "name": "cat", "supercategory": "a"},
              {"id": 3, "name": "car", "supercategory": "v"}]
COLOURS = {1: (255, 255, 255), 2: (255, 0, 0), 3: (0, 0, 255)}
GLOVE_WORDS = ("the of and dog cat car puppy kitten truck box ball sky snow brick tomato cherry lemon ocean "
               "grass tree road water house window door table chair red blue green").split()



def write_coco(root: Path, split: str, n: int, seed: int) -> dict[str, list[tuple[int, int, int]]]:
    """``n`` 64 px images on a noisy grey ground with white+red, white+blue or red squares of 3 x 3 cells.

    Returns, per file name, the squares drawn as ``(category, x0, y0)`` in pixels.  The images
    are at the model's input size and the squares sit on the 8 px cell grid, so a cell is either
    all square or all ground and a square's cells all have the same activation.
    """
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
    images, anns, drawn = [], [], {}
    for i in range(n):
        ground = rng.integers(70, 110, size=(SIZE, SIZE, 3), dtype=np.uint8)
        im = Image.fromarray(ground, "RGB")
        dr = ImageDraw.Draw(im)
        cats = ([1, 2], [1, 3], [2])[i % 3]
        spots = [(0, 0), (4, 4)] if i % 2 == 0 else [(4, 0), (0, 4)]
        squares = []
        for c, (cx, cy) in zip(cats, spots):
            cx += int(rng.integers(0, 2))
            cy += int(rng.integers(0, 2))
            x0, y0, e = cx * CELL, cy * CELL, 3 * CELL
            dr.rectangle([x0, y0, x0 + e - 1, y0 + e - 1], fill=COLOURS[c])
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c, "iscrowd": 0,
                         "segmentation": [[x0, y0, x0 + e, y0, x0 + e, y0 + e, x0, y0 + e]],
                         "area": float(e * e), "bbox": [x0, y0, e, e]})
            squares.append((c, x0, y0))
        fn = f"{split}_{i:05d}.png"
        im.save(root / f"{split}2017" / fn)
        images.append({"id": i + 1, "file_name": fn, "width": SIZE, "height": SIZE})
        drawn[fn] = squares
    doc = {"images": images, "annotations": anns, "categories": CATEGORIES}
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))
    return drawn


@pytest.fixture(scope="module")
def squares(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("visualize")
    factory = base / "squares.py"
    factory.write_text(FACTORY)
    store = Store(base / "home")
    write_coco(base / "coco", "train", 18, seed=1)
    drawn = write_coco(base / "coco", "val", 12, seed=2)
    register_coco(store, base / "coco", "squares")
    register_embedding(store, write_glove(base / "glove.16d.txt", GLOVE_WORDS, dim=16), name="g16")
    preprocess(store, "squares", embedding="g16", workers=1)
    res = train(store, f"{factory}:build", ["squares"], layers=["act"], name="squares",
                settings=TrainSettings(epochs=4, patience=4, seed=0), device="cpu", workers=0)
    ses = open_session(store, device="cpu", workers=0)
    return {"store": store, "home": base / "home", "base": base, "explainer": res[0].name, "session": ses,
            "drawn": drawn}


def run_cli(home: Path, *args: Any) -> Any:
    from typer.testing import CliRunner

    from lavise_cli.cli import app

    return CliRunner().invoke(app, ["--home", str(home), *[str(a) for a in args]])



# ----------------------------------------------------------------------------------------------
# Pure parts: outline, highlight, layout
# ----------------------------------------------------------------------------------------------


def test_outline_is_the_inner_boundary() -> None:
    region = torch.zeros(12, 12, dtype=torch.bool)
    region[3:9, 2:10] = True
    edge = viz.outline(region, 1)
    expected = region.clone()
    expected[4:8, 3:9] = False
    assert torch.equal(edge, expected)
    thick = viz.outline(region, 2)
    expected2 = region.clone()
    expected2[5:7, 4:8] = False
    assert torch.equal(thick, expected2)
    # The image border is no boundary; an empty or a full region has no outline.
    full = torch.ones(6, 6, dtype=torch.bool)
    assert not viz.outline(full, 1).any()
    assert not viz.outline(~full, 1).any()
    left = torch.zeros(6, 6, dtype=torch.bool)
    left[:, :3] = True
    assert torch.equal(viz.outline(left, 1).nonzero()[:, 1].unique(), torch.tensor([2]))
    # Batched the same as one by one.
    both = torch.stack([region, ~region])
    assert torch.equal(viz.outline(both, 2), torch.stack([viz.outline(region, 2), viz.outline(~region, 2)]))


def test_highlight_keeps_the_region_dims_the_rest_and_draws_the_outline() -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 20, 20, generator=g) * 0.8 + 0.1
    region = torch.zeros(20, 20, dtype=torch.bool)
    region[5:15, 4:12] = True
    out = viz.highlight(img, region, dim=0.3, width=2, color=(255, 0, 255))
    edge = viz.outline(region, 2)
    inner = region & ~edge
    assert torch.equal(out[:, inner], img[:, inner])
    assert torch.equal(out[:, ~region], img[:, ~region] * 0.3)
    assert torch.equal(out[:, edge], torch.tensor([1.0, 0.0, 1.0])[:, None].expand(3, int(edge.sum())))
    assert edge.sum() > 0 and inner.sum() > 0
    batch = viz.highlight(torch.stack([img, img]), torch.stack([region, ~region]), dim=0.3, width=2,
                          color=(255, 0, 255))
    assert torch.equal(batch[0], out)


def test_layout_size_is_the_grid_plus_text() -> None:
    lay = viz.heatmap_layout(7, 100, cols=3)
    assert (lay.cols, lay.rows) == (3, 3)
    assert lay.width == 3 * 100 + 4 * viz.PAD
    assert lay.height == viz.PAD + lay.title_h + 3 * (100 + lay.caption_h + viz.PAD)
    assert lay.tiles[0] == (viz.PAD, viz.PAD + lay.title_h)
    assert lay.tiles[4] == (viz.PAD + 100 + viz.PAD, viz.PAD + lay.title_h + 100 + lay.caption_h + viz.PAD)
    # Tiles never overlap and stay inside the figure.
    for x, y in lay.tiles:
        assert 0 <= x and x + 100 <= lay.width and 0 <= y and y + 100 <= lay.height
    assert len({t for t in lay.tiles}) == 7
    assert viz.heatmap_layout(3, 50).cols == 3 and viz.heatmap_layout(12, 50).cols == 5


# ----------------------------------------------------------------------------------------------
# A heatmap from generated images with known regions
# ----------------------------------------------------------------------------------------------


def test_heatmap_highlights_exactly_the_region(squares: dict[str, Any]) -> None:
    ses = squares["session"]
    vocab = vocabulary_for(ses)
    ex = run_explain(ses, [0, 1], "attention", vocab, p=6, s=3, k=3)
    doc = explanation_doc(ses, ex)
    n = 4
    for entry in doc["filters"]:
        u = entry["filter"]
        fig = viz.render_heatmap(ses, entry, n, doc=doc)
        lay = viz.heatmap_layout(n, SIZE)
        assert fig.size == (lay.width, lay.height) == (4 * SIZE + 5 * viz.PAD, lay.height)
        arr = np.asarray(fig).astype(np.int16)
        assert arr.std() > 20 and len(np.unique(arr.reshape(-1, 3), axis=0)) > 50  # not blank
        tops = entry["top_images"][:n]
        rows = [t["row"] for t in tops]
        maps = ses.cache.maps(rows)
        # The region by its definition: F_u upsampled bilinearly to the input size, >= T_u, with the
        # nearest-neighbour footprint of the cells >= T_u.
        up = F.interpolate(maps[:, u:u + 1], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
        bilinear = up >= ses.cache.threshold[u]
        hot = (maps[:, u:u + 1] >= ses.cache.threshold[u]).float()
        want = bilinear | (F.interpolate(hot, size=(SIZE, SIZE), mode="nearest-exact")[:, 0] > 0.5)
        for q, t in enumerate(tops):
            x, y = lay.tiles[q]
            tile = arr[y:y + SIZE, x:x + SIZE]
            orig = apply_view_image(read_rgb(t["path"]), View(), SIZE)
            kept = (orig.clamp(0, 1) * 255).round().to(torch.int16).permute(1, 2, 0).numpy()
            dimmed = (orig * viz.DIM * 255).round().to(torch.int16).permute(1, 2, 0).numpy()
            assert (kept != dimmed).any(2).all()  # every pixel tells "kept" from "dimmed" apart
            is_outline = (tile == np.array(viz.OUTLINE)).all(2)
            highlighted = (tile == kept).all(2) | is_outline
            is_dimmed = (tile == dimmed).all(2)
            assert np.array_equal(highlighted, want[q].numpy()), (u, q)
            assert np.array_equal(is_dimmed, ~want[q].numpy()), (u, q)
            assert is_outline.any() and (highlighted & ~is_outline).any()
            # And the region is the one known from the drawing: the square this filter fires on (white
            # for 0, red for 1) between its outer cells' centres, where the upsampled map stays at
            # the square's value (the 0.995 quantile here: squares fill more than 0.5 % of cells);
            # up to the image's edge where the square touches it (bilinear, align_corners=False,
            # holds the border cell's value out to the edge).
            cat = {0: 1, 1: 2}[u]
            known = np.zeros((SIZE, SIZE), bool)
            square = np.zeros((SIZE, SIZE), bool)

            def span(a: int) -> slice:
                return slice(a + CELL // 2 if a > 0 else 0, a + 5 * CELL // 2 if a + 3 * CELL < SIZE else SIZE)

            for c, x0, y0 in squares["drawn"][Path(t["path"]).name]:
                if c == cat:
                    known[span(y0), span(x0)] = True
                    square[y0:y0 + 3 * CELL, x0:x0 + 3 * CELL] = True
            assert known.any() and np.array_equal(bilinear[q].numpy(), known), (u, q)
            # With the cells at T, the region is the whole square: its cells' footprint.
            assert np.array_equal(want[q].numpy(), square), (u, q)


def test_heatmap_paths_write_pngs_atomically(squares: dict[str, Any], tmp_path: Path) -> None:
    ses = squares["session"]
    ex = run_explain(ses, [0, 3], "attention", vocabulary_for(ses), p=5, s=3, k=3)
    doc = explanation_doc(ses, ex)
    paths = viz.heatmap_paths(ses, doc, tmp_path / "pics", 3)
    assert [p.name for p in paths] == ["filter-0000.png", "filter-0003.png"]
    assert sorted(os.listdir(tmp_path / "pics")) == ["filter-0000.png", "filter-0003.png"]  # no temporaries
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size == (3 * SIZE + 4 * viz.PAD, viz.heatmap_layout(3, SIZE).height)


def page_masks(page: Path) -> tuple[int, dict[tuple[int, int], np.ndarray]]:
    """The regions a written report page carries: (thumb, {(filter, q): bool (thumb, thumb)})."""
    import re

    text = page.read_text(encoding="utf-8")
    thumb = int(re.search(r'data-thumb="(\d+)"', text).group(1))
    out = {}
    for card in re.finditer(r'<section class="card"[^>]*?data-filter="(\d+)".*?</section>', text, re.S):
        for q, m in enumerate(re.findall(r'data-m="([^"]*)"', card.group(0))):
            out[(int(card.group(1)), q)] = viz.decode_mask(m, thumb, thumb)
    return thumb, out


def test_mask_text_round_trips() -> None:
    g = torch.Generator().manual_seed(3)
    cases = [np.zeros((5, 7), bool), np.ones((5, 7), bool), np.zeros((200, 200), bool), np.ones((200, 200), bool),
             (torch.rand(33, 17, generator=g) > 0.5).numpy()]
    blob = np.zeros((128, 128), bool)
    blob[40:70, 20:90] = True
    cases.append(blob)
    for m in cases:
        assert np.array_equal(viz.decode_mask(viz.encode_mask(m), *m.shape), m)
    assert viz.encode_mask(np.zeros((200, 200), bool)) == base64.b64encode(bytes([0xC0, 0xB8, 0x02])).decode()
    assert len(viz.encode_mask(blob)) < 100  # a blob: two short runs per row
    with pytest.raises(ValueError):
        viz.decode_mask(viz.encode_mask(blob), 128, 127)
    # A batch at once is each mask's own text, runs of any length (varints of 1, 2 and 3 bytes).
    batch = (torch.rand(40, 130, 129, generator=g) < torch.rand(40, 1, 1, generator=g) ** 4).numpy()
    batch[0], batch[1], batch[2, 64:, :] = True, False, True
    texts = viz.encode_masks(batch)
    for m, t in zip(batch, texts):
        assert np.array_equal(viz.decode_mask(t, *m.shape), m)
        assert t == viz.encode_mask(m)
    assert viz.encode_masks(np.zeros((0, 4, 4), bool)) == []


@pytest.mark.parametrize("thumb", [SIZE, 40])
def test_report_regions_are_the_explain_regions(squares: dict[str, Any], tmp_path: Path, thumb: int) -> None:
    ses = squares["session"]
    ex = run_explain(ses, [0, 1, 4], "attention", vocabulary_for(ses), p=6, s=3, k=3)
    doc = explanation_doc(ses, ex)
    n = 5
    page = viz.build_report(ses, doc, None, tmp_path / "r.html", n_images=n, thumb=thumb)
    got_thumb, masks = page_masks(page)
    assert got_thumb == thumb and len(masks) == 3 * n
    for entry in doc["filters"]:
        u = entry["filter"]
        tops = entry["top_images"][:n]
        maps = ses.cache.maps([t["row"] for t in tops])
        # explain's regions, sampled at the thumbnail's size (at the input size: evaluate's region itself).
        want = regions(maps, torch.full((len(tops),), u), ses.cache.threshold, thumb).numpy()
        for q in range(len(tops)):
            assert np.array_equal(masks[(u, q)], want[q]), (u, q)
            if u in (0, 1):  # white and red squares: a square's region in every top image
                assert masks[(u, q)].any() and not masks[(u, q)].all(), (u, q)
    # One thumbnail per distinct image, the whole image at the thumbnail's size.
    rows = {t["row"]: t["path"] for f in doc["filters"] for t in f["top_images"][:n]}
    files = sorted(p.name for p in (tmp_path / "r_files").iterdir())
    assert files == sorted(viz.thumbnail_name(r) for r in rows) and len(files) < 3 * n
    r0 = min(rows)
    with Image.open(tmp_path / "r_files" / viz.thumbnail_name(r0)) as im:
        assert im.size == (thumb, thumb) and im.format == "JPEG"
        pix = np.asarray(im.convert("RGB")).astype(np.float32)
    ref = (apply_view_image(read_rgb(rows[r0]), View(), thumb) * 255).permute(1, 2, 0).numpy()
    # The same picture, squares in place (block means: JPEG blurs the pixel noise of the ground).
    def blocks(a: np.ndarray) -> np.ndarray:
        k = thumb // 8
        return a[:8 * k, :8 * k].reshape(8, k, 8, k, 3).mean((1, 3))

    assert np.abs(blocks(pix) - blocks(ref)).mean() < 5  # (chroma subsampling blurs the red edges)
    assert np.abs(blocks(pix) - blocks(ref[::-1].copy())).mean() > 20
    text = page.read_text()
    srcs = re.findall(r'<img loading="lazy" src="([^"]+)"', text)
    assert len(srcs) == 3 * n and len(set(srcs)) == len(files)  # pairs share their image's file


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------


def test_cli_heatmap_no_explainer_yet(tmp_path: Path) -> None:
    assert_clear_error(run_cli(tmp_path / "empty", "heatmap", "-f", "0"), "train")
    assert_clear_error(run_cli(tmp_path / "empty", "-q", "report"), "train")


def test_cli_heatmap_filter_out_of_range_and_bad_options(squares: dict[str, Any]) -> None:
    home = squares["home"]
    assert_clear_error(run_cli(home, "heatmap", "-f", "6"), "filter 6 is out of range", "6 filters")
    assert_clear_error(run_cli(home, "heatmap", "-f", "0,99999"), "99999")
    assert_clear_error(run_cli(home, "-q", "report", "-f", "2-40"), "out of range")
    assert_clear_error(run_cli(home, "-q", "heatmap"), "--filters")
    assert_clear_error(run_cli(home, "-q", "heatmap", "-f", "x"), "cannot read filter")
    assert_clear_error(run_cli(home, "-q", "heatmap", "-f", "0", "-n", "0"), "--images")
    assert_clear_error(run_cli(home, "-q", "heatmap", "-f", "0", "--method", "magic"), "unknown method")


def test_cli_heatmap_matches_explain(squares: dict[str, Any], tmp_path: Path) -> None:
    home = squares["home"]
    r = run_cli(home, "-q", "heatmap", "-f", "0,1", "-n", "3", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    e = run_cli(home, "-q", "explain", "-f", "0,1", "--json")
    assert e.exit_code == 0, e.output
    words = json.loads(e.stdout)
    assert doc["explanation"] == words["saved"]  # the very result file explain writes
    for h, f in zip(doc["heatmaps"], words["filters"]):
        assert h["filter"] == f["filter"]
        assert h["words"] == f["words"]
        assert h["images"] == [t["path"] for t in f["top_images"][:3]]
        png = Path(h["png"])
        assert png.is_file() and png.name == f"filter-{f['filter']:04d}.png"
        assert str(squares["home"]) in str(png)  # in the store, under the explainer
    r = run_cli(home, "-q", "heatmap", "-f", "2", "--out", tmp_path / "pics")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str((tmp_path / "pics" / "filter-0002.png").resolve())


def test_cli_report_with_recall(squares: dict[str, Any], tmp_path: Path) -> None:
    home = squares["home"]
    page = tmp_path / "out" / "layer.html"
    r = run_cli(home, "-q", "report", "--out", page, "-n", "4", "--thumb", "48", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["report"] == str(page.resolve()) and res["evaluated"] and res["filters"] == 6
    assert res["images"] == 6 * 4  # highlighted (filter, image) pairs on the page
    # One thumbnail per distinct image among them, named by its target row.
    saved = json.loads(Path(res["explanation"]).read_text())
    rows = {t["row"] for f in saved["filters"] for t in f["top_images"][:4]}
    files = page.parent / "layer_files"
    assert sorted(p.name for p in files.iterdir()) == sorted(f"i{r:06d}.jpg" for r in rows)
    assert res["thumbnail_files"] == len(rows) < 6 * 4
    with Image.open(files / f"i{min(rows):06d}.jpg") as im:
        assert im.size == (48, 48) and im.format == "JPEG"
    text = page.read_text()
    assert "R@5" in text and text.count('class="card"') == 6 and text.count('loading="lazy"') == 24
    assert text.count("data-m=") == 24  # every pair's region, drawn by the page
    assert "http://" not in text and "https://" not in text  # nothing to fetch from the network
    # Unlabelled target: no recall, still a page.
    plain = tmp_path / "plain"
    plain.mkdir()
    for i in range(4):
        Image.new("RGB", (40, 30), (60 * i, 255 - 40 * i, 128)).save(plain / f"p{i}.png")
    r = run_cli(home, "-q", "report", "--image-dir", plain, "--out", tmp_path / "plain.html", "-n", "2", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["evaluated"] is False
    assert "Not evaluated" in (tmp_path / "plain.html").read_text()


def test_cli_report_reuses_the_saved_explanation_only_from_the_same_inputs(squares: dict[str, Any],
                                                                           tmp_path: Path) -> None:
    import re

    home = squares["home"]
    words = tmp_path / "words.txt"
    words.write_text("dog\ncat\ncar\ntruck\n")
    common = ("-q", "report", "--vocab", words, "-n", "2", "--thumb", "32", "--no-evaluate", "--json")

    def report(name: str) -> dict[str, Any]:
        r = run_cli(home, *common, "--out", tmp_path / f"{name}.html")
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    def page(name: str) -> str:  # but for the time it was made and its folder's name
        text = (tmp_path / f"{name}.html").read_text()
        return re.sub(r"<th>made</th><td>[^<]*</td>", "", text).replace(f"{name}_files", "F_files")

    first = report("a")
    assert first["explanation_reused"] is False
    second = report("b")
    assert second["explanation_reused"] is True and second["explanation"] == first["explanation"]
    assert page("a") == page("b") and "dog" in page("a")
    # `explain` with the same settings writes that very file (with its inputs): report reads it back.
    e = run_cli(home, "-q", "explain", "--all", "--vocab", words, "--json")
    assert e.exit_code == 0, e.output
    assert json.loads(e.stdout)["saved"] == first["explanation"]
    assert report("c")["explanation_reused"] is True
    # The same file name with other words (the same key: path and size) is another input: explained
    # again, and the page shows the new words.
    words.write_text("sky\nsnow\ngrass\nroad\n")
    third = report("d")
    assert third["explanation_reused"] is False and third["explanation"] == first["explanation"]
    saved = json.loads(Path(third["explanation"]).read_text())
    named = {w["word"] for f in saved["filters"] for w in f["words"]}
    assert named and named <= {"sky", "snow", "grass", "road"}
    assert "dog" not in page("d")


def test_cli_report_link_is_percent_encoded_and_files_follow_the_umask(squares: dict[str, Any],
                                                                       tmp_path: Path) -> None:
    home = squares["home"]
    folder = tmp_path / "my reports #1 100%"
    page = folder / "layer 4.html"
    old = os.umask(0o022)
    try:
        r = run_cli(home, "report", "--out", page, "-n", "2", "--thumb", "32", "--no-evaluate")
        h = run_cli(home, "-q", "heatmap", "-f", "1", "-n", "2", "--out", folder / "pics")
    finally:
        os.umask(old)
    assert r.exit_code == 0 and h.exit_code == 0, r.output + h.output
    (link,) = [ln for ln in r.stderr.splitlines() if "open it with a browser" in ln]
    uri = link.split("open it with a browser: ", 1)[1].strip()
    assert uri == page.resolve().as_uri()
    assert " " not in uri and "#" not in uri and "%23" in uri and "%25" in uri and "%20" in uri
    from urllib.parse import unquote, urlparse

    assert Path(unquote(urlparse(uri).path)) == page.resolve()  # the link opens the page
    # The paths of the summary, whole on lines of their own.
    assert f"page {page.resolve()}" in r.stdout.splitlines()
    # Heatmaps, the report and its thumbnails: all as the umask says (0644), none 0600.
    files = [page, *(folder / "layer 4_files").glob("*.jpg"), *(folder / "pics").glob("*.png")]
    assert len(files) > 3
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, (f, oct(f.stat().st_mode))
    # The explainer file too (safetensors alone writes 0600); the fixture ran under this process's umask.
    from lavise_cli.store import current_umask

    ex = squares["store"].path("explainers", squares["explainer"]) / "explainer.safetensors"
    assert stat.S_IMODE(ex.stat().st_mode) == 0o666 & ~current_umask()


# ----------------------------------------------------------------------------------------------
# The report in a real headless browser
# ----------------------------------------------------------------------------------------------


class Chrome:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``).

    The browser reads JSON commands (each ending in a NUL byte) on its fd 3 and answers on fd 4.
    """

    def __init__(self, exe: str, profile: Path, width: int = 1280, height: int = 900):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        # High copies, so that placing them at 3 and 4 in the child cannot clobber one another.
        hi_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD_CLOEXEC, 10)
        hi_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def place() -> None:
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--remote-debugging-pipe", f"--user-data-dir={profile}",
                 f"--window-size={width},{height}", "about:blank"]
        self.proc = subprocess.Popen([exe, *flags], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, close_fds=False, preexec_fn=place)
        os.close(hi_r)
        os.close(hi_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            self.call("Page.enable", session=True)
            self.call("Runtime.enable", session=True)
            self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                      deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.close()
            raise

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe (it exited)")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, session: bool = False, timeout: float = 30, **params: Any) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self._w, data):]
        deadline = time.monotonic() + timeout
        while True:
            m = self._read(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self.events):
                if m.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read(deadline))

    def goto(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", session=True, url=url)
        self.wait_event("Page.loadEventFired")

    def js(self, expression: str, timeout: float = 60) -> Any:
        r = self.call("Runtime.evaluate", session=True, timeout=timeout, expression=expression, awaitPromise=True,
                      returnByValue=True)
        if "exceptionDetails" in r:
            raise AssertionError(f"JavaScript error: {r['exceptionDetails']}")
        return r["result"].get("value")

    def screenshot(self) -> Image.Image:
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._r)
        os.close(self._w)


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); the report's browser test "
                    "needs it")
    return exe


LOAD_IMAGES = """
(async () => {
  const imgs = Array.from(document.querySelectorAll('.card img'));
  for (const img of imgs) {
    img.scrollIntoView({block: 'center'});
    if (!img.complete || img.naturalWidth === 0) {
      await new Promise(done => {
        img.addEventListener('load', done, {once: true});
        img.addEventListener('error', done, {once: true});
        setTimeout(done, 10000);
      });
    }
  }
  window.scrollTo(0, 0);
  return imgs.map(i => [i.closest('.card').dataset.filter, i.getAttribute('src'), i.complete, i.naturalWidth]);
})()
"""


OVERLAYS_DRAWN = """
(async () => {
  for (let i = 0; i < 100; i++) {
    const n = document.querySelectorAll('.card .t canvas.ov').length;
    if (n === document.querySelectorAll('.card .t').length) return n;
    await new Promise(done => setTimeout(done, 50));
  }
  return document.querySelectorAll('.card .t canvas.ov').length;
})()
"""


def test_report_in_a_headless_browser(squares: dict[str, Any], tmp_path: Path) -> None:
    exe = chromium()
    ses = squares["session"]
    vocab = vocabulary_for(ses)
    filters = list(range(6))
    n = 5
    ex = run_explain(ses, filters, "attention", vocab, p=8, s=3, k=3)
    doc = explanation_doc(ses, ex)
    evaluation = evaluate_methods(ses, ["attention"], vocab, cuts=(5, 10), p=8, filters=filters)
    # Distinct recalls (and one filter never counted) make the sort order unambiguous.
    planted = [0.25, None, 0.9, 0.5, 0.05, 0.7]
    evaluation["per_filter"]["attention"]["recall@5"] = planted
    confidence = [0.1, 0.6, 0.3, 0.95, 0.0, 0.45]
    for f, c in zip(doc["filters"], confidence):
        assert 0.0 <= f["confidence"] <= 1.0
        f["confidence"] = c
    page = viz.build_report(ses, doc, evaluation, tmp_path / "site" / "report.html", n_images=n, thumb=64)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser = Chrome(exe, tmp_path / "profile")
    try:
        browser.call("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(downloads),
                     eventsEnabled=True)
        browser.goto(page.as_uri())
        # Every filter card and every image, present and loaded (they are lazy: scroll to each).
        cards = browser.js("Array.from(document.querySelectorAll('.card')).map(c => +c.dataset.filter)")
        assert cards == filters
        imgs = browser.js(LOAD_IMAGES)
        assert len(imgs) == len(filters) * n
        assert all(c and w == 64 for _, _, c, w in imgs), [i for i in imgs if not (i[2] and i[3] == 64)]
        assert {int(f) for f, *_ in imgs} == set(filters)
        assert browser.js("document.querySelectorAll('img[loading=\"lazy\"]').length") == len(filters) * n
        # Every pair's region is drawn over its image by the page: one canvas each, pixel for pixel
        # the region the library computes (thumbnail size = input size here: evaluate's very region),
        # dimmed outside and outlined on its inner boundary.
        assert browser.js(OVERLAYS_DRAWN) == len(filters) * n
        wow = viz.outline_width(64)
        for u in (0, 1, 3):
            tops = doc["filters"][u]["top_images"][:n]
            maps = ses.cache.maps([t["row"] for t in tops])
            want = regions(maps, torch.full((len(tops),), u), ses.cache.threshold, SIZE).numpy()
            got_px = browser.js(f"Array.from(document.querySelectorAll('#f{u} canvas.ov')).map(c => Array.from("
                                f"c.getContext('2d').getImageData(0, 0, c.width, c.height).data))")
            assert len(got_px) == len(tops)
            for q, px in enumerate(got_px):
                px = np.array(px, dtype=np.int32).reshape(SIZE, SIZE, 4)
                edge = viz.outline(torch.from_numpy(want[q]), wow).numpy()
                dim_alpha = round(255 * (1 - viz.DIM))
                assert np.array_equal(px[..., 3] == dim_alpha, ~want[q]), (u, q)
                assert np.array_equal((px[..., 3] == 255) & (px[..., :3] == viz.OUTLINE).all(2), edge), (u, q)
                assert np.array_equal(px[..., 3] == 0, want[q] & ~edge), (u, q)
        # And on screen: the tile of filter 0's first image looks like the library's own highlight of
        # its thumbnail (up to JPEG decoding and alpha blending), not like the plain image.
        box = browser.js("(() => { const t = document.querySelector('#f0 .t'); t.scrollIntoView({block: 'center'});"
                         " const r = t.getBoundingClientRect(); return [r.left, r.top]; })()")
        time.sleep(0.3)
        x0, y0 = round(box[0]), round(box[1])
        full = browser.screenshot()
        full.save(tmp_path / "tile.png")
        tile = np.asarray(full)[y0:y0 + SIZE, x0:x0 + SIZE].astype(np.float32)
        row0 = doc["filters"][0]["top_images"][0]["row"]
        with Image.open(page.parent / "report_files" / f"i{row0:06d}.jpg") as im:
            thumb_img = torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1).float() / 255
        reg0 = torch.from_numpy(regions(ses.cache.maps([row0]), torch.tensor([0]), ses.cache.threshold, SIZE).numpy())
        want_tile = viz.to_uint8(viz.highlight(thumb_img, reg0[0], width=wow)).numpy().astype(np.float32)
        plain = viz.to_uint8(thumb_img).numpy().astype(np.float32)
        inner = (slice(3, -3), slice(3, -3))  # rounded corners aside
        assert np.abs(tile[inner] - want_tile[inner]).mean() < 4, np.abs(tile[inner] - want_tile[inner]).mean()
        assert np.abs(tile[inner] - plain[inner]).mean() > 20
        assert ((np.abs(tile - np.array(viz.OUTLINE)) < 3).all(2)).sum() >= 0.9 * viz.outline(reg0[0], wow).sum()
        # The page's decoder reads the library's run lengths (long runs, a region from the first pixel).
        for m in (np.zeros((SIZE, SIZE), bool), np.ones((SIZE, SIZE), bool), want[0], ~want[0]):
            dec = browser.js(f"Array.from(decodeMask({json.dumps(viz.encode_mask(m))}, {SIZE * SIZE}))")
            assert np.array_equal(np.array(dec, bool).reshape(SIZE, SIZE), m)
        # The recall table and the settings are at the top.
        head = browser.js("document.querySelector('header').innerText")
        assert "R@5" in head and "attention" in head and squares["explainer"] in head
        # Sort by confidence (shown on each card): high first, then low first; inactive filters have none.
        active = [u for u in filters if not doc["filters"][u]["inactive"]]
        for how, sign in (("confidence", -1), ("confidence-asc", 1)):
            order = browser.js(f"(() => {{ const s = document.getElementById('sort'); s.value = '{how}';"
                               " s.dispatchEvent(new Event('input')); return Array.from(document.querySelectorAll("
                               "'.card')).map(c => +c.dataset.filter); })()")
            want = sorted(active, key=lambda u: sign * confidence[u]) + [u for u in filters if u not in active]
            assert order == want, how
        assert "confidence 0.95" in browser.js("document.getElementById('f3').textContent")
        # Sort by recall: high first, the uncounted filter last.
        order = browser.js("(() => { const s = document.getElementById('sort'); s.value = 'recall';"
                           " s.dispatchEvent(new Event('input')); return Array.from(document.querySelectorAll("
                           "'.card')).map(c => +c.dataset.filter); })()")
        want = sorted(filters, key=lambda u: (planted[u] is None, -(planted[u] or 0)))
        assert order == want == [2, 5, 3, 0, 4, 1]
        # Filter by minimum recall and by word.
        shown = browser.js("(() => { const m = document.getElementById('minrec'); m.value = '0.5';"
                           " m.dispatchEvent(new Event('input')); return Array.from(document.querySelectorAll("
                           "'.card:not([hidden])')).map(c => +c.dataset.filter); })()")
        assert shown == [2, 5, 3]
        word = doc["filters"][4]["words"][0]["word"]
        shown = browser.js(f"(() => {{ document.getElementById('minrec').value = ''; const w = document."
                           f"getElementById('word'); w.value = {json.dumps(word[:3])}; w.dispatchEvent(new "
                           f"Event('input')); return Array.from(document.querySelectorAll('.card:not([hidden])'))"
                           f".map(c => +c.dataset.filter); }})()")
        assert 4 in shown
        assert all(any(word[:3] in w["word"] for w in doc["filters"][u]["words"]) for u in shown)
        browser.js("(() => { const w = document.getElementById('word'); w.value = ''; "
                   "w.dispatchEvent(new Event('input')); })()")
        # Human evaluation: the rating controls appear; rate two filters, export the CSV.
        assert browser.js("getComputedStyle(document.querySelector('.rate')).display") == "none"
        browser.js("document.getElementById('evalmode').click()")
        assert browser.js("getComputedStyle(document.querySelector('.rate')).display") != "none"
        assert browser.js("getComputedStyle(document.querySelector('.rec')).display") == "none"  # unbiased
        browser.js("document.querySelector('input[name=\"r3\"][value=\"4\"]').click()")
        browser.js("document.querySelector('input[name=\"r0\"][value=\"2\"]').click()")
        text = browser.js("ratingsCSV()")
        rows = list(csv.reader(io.StringIO(text)))
        expect = [["filter", "rating", "words"]] + [
            [str(u), r, "; ".join(w["word"] for w in doc["filters"][u]["words"])] for u, r in ((0, "2"), (3, "4"))]
        assert rows == expect
        browser.js("document.getElementById('export').click()")
        deadline = time.monotonic() + 15
        got: list[Path] = []
        while time.monotonic() < deadline:
            got = [p for p in downloads.iterdir() if p.suffix == ".csv"]
            if got:
                break
            time.sleep(0.1)
        assert len(got) == 1, list(downloads.iterdir())
        assert got[0].read_text() == text
        # A screenshot of the top of the page: not blank.
        browser.js("window.scrollTo(0, 0)")
        shot = browser.screenshot()
        shot.save(tmp_path / "report.png")
        arr = np.asarray(shot).astype(np.float32)
        assert shot.size == (1280, 900)
        assert arr.std() > 10 and len(np.unique(arr.reshape(-1, 3), axis=0)) > 100
        # No script error anywhere on the way.
        errors = [m for m in browser.events if m.get("method") == "Runtime.exceptionThrown" or (
            m.get("method") == "Runtime.consoleAPICalled" and m["params"].get("type") == "error")]
        assert not errors, errors
    finally:
        browser.close()


def test_text_wraps_within_its_width_and_marks_overflow() -> None:
    f = viz.font(viz.FONT_SIZE)
    segs = [(w, viz.INK) for w in "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()]
    lines = viz.wrap_segments(segs, f, 100, 2, sep=", ")
    assert len(lines) == 2 and lines[-1][-1][0] == "…"
    for line in lines:
        assert sum(f.getlength(t) for t, _ in line) + f.getlength(", ") * (len(line) - 1) <= 100
    assert [t for t, _ in viz.wrap_segments(segs[:2], f, 500, 1)[0]] == ["alpha", "beta"]
    (cut,), = viz.wrap_segments([("supercalifragilisticexpialidocious", viz.INK)], f, 60, 1)
    assert cut[0].endswith("…") and f.getlength(cut[0]) <= 60


def test_render_figure_from_plain_tensors() -> None:
    imgs = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    reg = torch.zeros(2, 40, 40, dtype=torch.bool)
    reg[:, 10:30, 5:25] = True
    fig = viz.render_figure(imgs, reg, title="filter 9  ·  toy", words=[],
                            captions=[("#1", [{"word": "dog"}]), ("#2", [{"word": "kite", "novel": True}])],
                            note="inactive: its top 0.5 % never rises above 0")
    lay = viz.heatmap_layout(2, 40)
    assert fig.size == (lay.width, lay.height)
    x, y = lay.tiles[1]
    tile = np.asarray(fig)[y:y + 40, x:x + 40]
    assert (tile[10, 5:25] == viz.OUTLINE).all()  # the region's top edge is outlined
    header = np.asarray(fig)[:lay.title_h]
    assert (header != 255).any(axis=2).sum() > 200  # the title and the note are drawn
