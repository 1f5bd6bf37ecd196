"""Property-based fuzzing of the parsers (hypothesis): no input crashes lavise with a traceback.

Every generated input either works or ends in one clear ``error:`` line with exit code 2 or 3:
COCO instances JSON (register + preprocess), segmentation values (polygons and RLE), panoptic PNG
segment ids, GloVe lines, ``--filters`` and ``--mean``/``--std`` strings.  The test suite runs with
``LAVISE_DEBUG=1``, so an unexpected exception surfaces as itself rather than as the CLI's
"internal error" line.  Bounded (few examples, no deadline) and derandomized for CI.
"""

from __future__ import annotations

import itertools
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import SMALL_GLOVE_WORDS, Cli, write_glove
from lavise_cli.errors import LaviseError

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
QUICK = settings(FUZZ, max_examples=200)
_names = itertools.count()


def ok_or_one_line(result: Any) -> None:
    """Exit 0, or exit 2/3 with exactly one ``error:`` line on stderr and no traceback."""
    text = result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in text
    if result.exit_code == 0:
        return
    assert result.exit_code in (2, 3), text
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr


@pytest.fixture(scope="module")
def fuzz_home() -> Any:
    """One store for a whole test module, holding word vectors ``g`` for the generated labels."""
    with tempfile.TemporaryDirectory() as d:
        cli = Cli(Path(d) / "home")
        glove = write_glove(Path(d) / "g.txt", SMALL_GLOVE_WORDS + ["thing", "stuff"])
        res = cli("-q", "download", "glove", "--from", str(glove), "--name", "g")
        assert res.exit_code == 0, res.output
        yield cli, Path(d)


# ----------------------------------------------------------------------------------------------
# COCO instances JSON, polygons and RLE
# ----------------------------------------------------------------------------------------------

IMAGES = [("a.jpg", 16, 12), ("b.jpg", 20, 20)]  # (file, width, height)

weird = st.one_of(st.none(), st.booleans(), st.text(max_size=4), st.floats(allow_nan=True, allow_infinity=True),
                  st.integers(-(2**40), 2**40), st.lists(st.integers(-3, 3), max_size=3), st.just({}))
coord = st.one_of(st.floats(-30, 60, allow_nan=False), st.sampled_from([math.nan, math.inf, -math.inf, 1e308]),
                  st.integers(-5, 40))
polygon = st.lists(st.lists(coord, min_size=0, max_size=12), min_size=0, max_size=3)
rle_counts = st.one_of(st.lists(st.integers(-5, 300), min_size=0, max_size=10),
                       st.text(alphabet="0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abc", max_size=12))
rle = st.fixed_dictionaries({"counts": rle_counts,
                             "size": st.one_of(st.just([12, 16]), st.just([20, 20]),
                                               st.lists(st.integers(-3, 40), max_size=3), weird)})
segmentation = st.one_of(polygon, rle, weird)
image_id = st.one_of(st.sampled_from([1, 2]), weird)
category_id = st.one_of(st.sampled_from([1, 2, 3]), weird)


@st.composite
def annotation(draw: Any) -> Any:
    ann = {"id": draw(st.integers(0, 100)), "image_id": draw(image_id), "category_id": draw(category_id),
           "segmentation": draw(segmentation), "iscrowd": draw(st.one_of(st.sampled_from([0, 1]), weird)),
           "area": draw(st.one_of(st.floats(0, 100), weird)),
           "bbox": draw(st.one_of(st.lists(st.floats(0, 20), min_size=4, max_size=4), weird))}
    drop = draw(st.lists(st.sampled_from(sorted(ann)), max_size=2))
    return {k: v for k, v in ann.items() if k not in drop}


@st.composite
def image_entry(draw: Any) -> Any:
    k = draw(st.integers(0, 1))
    f, w, h = IMAGES[k]
    im = {"id": draw(st.one_of(st.just(k + 1), weird)), "file_name": draw(st.one_of(st.just(f), st.just("nope.jpg"),
                                                                                       weird)),
          "width": draw(st.one_of(st.just(w), weird)), "height": draw(st.one_of(st.just(h), weird))}
    drop = draw(st.lists(st.sampled_from(sorted(im)), max_size=1))
    return {kk: v for kk, v in im.items() if kk not in drop}


category = st.fixed_dictionaries({"id": st.one_of(st.sampled_from([1, 2, 3]), weird),
                                  "name": st.one_of(st.sampled_from(["dog", "cat", "traffic light", "", "zzqx"]),
                                                    weird)})

instances_doc = st.one_of(
    st.fixed_dictionaries({"images": st.lists(image_entry(), max_size=3),
                           "annotations": st.lists(annotation(), max_size=6),
                           "categories": st.lists(category, max_size=4)}),
    st.dictionaries(st.sampled_from(["images", "annotations", "categories", "info"]),
                    st.one_of(weird, st.lists(weird, max_size=2)), max_size=4),
    weird,
)


def _write_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for f, w, h in IMAGES:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f)


def _valid_instances() -> dict[str, Any]:
    return {"images": [{"id": k + 1, "file_name": f, "width": w, "height": h} for k, (f, w, h) in enumerate(IMAGES)],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                             "segmentation": [[1, 1, 10, 1, 10, 10]], "area": 40.0, "bbox": [1, 1, 9, 9]}],
            "categories": [{"id": 1, "name": "dog"}]}


def _run_instances(fuzz: Any, doc: Any, raw: bytes | None = None) -> None:
    cli, base = fuzz
    name = f"c{next(_names)}"
    root = base / name
    _write_images(root / "val2017")
    (root / "annotations").mkdir(parents=True)
    ann = root / "annotations" / "instances_val2017.json"
    ann.write_bytes(raw if raw is not None else json.dumps(doc).encode())
    res = cli("-q", "download", "coco", "--from", str(root), "--name", name)
    ok_or_one_line(res)
    if res.exit_code == 0:
        ok_or_one_line(cli("-q", "preprocess", name, "--embedding", "g"))


def test_valid_instances_file_preprocesses(fuzz_home: Any) -> None:
    cli, base = fuzz_home
    _run_instances(fuzz_home, _valid_instances())
    name = f"c{next(_names) - 1}"
    doc = cli.json("-q", "preprocess", name, "--embedding", "g")
    assert doc["mapped"] == 1


@FUZZ
@given(doc=instances_doc)
def test_fuzz_coco_instances(fuzz_home: Any, doc: Any) -> None:
    _run_instances(fuzz_home, doc)


@FUZZ
@given(segs=st.lists(segmentation, min_size=1, max_size=4), iscrowd=st.sampled_from([0, 1]))
def test_fuzz_segmentations(fuzz_home: Any, segs: list[Any], iscrowd: int) -> None:
    """A valid file but for its segmentation values (polygons and RLE)."""
    doc = _valid_instances()
    doc["annotations"] = [{"id": k + 1, "image_id": 1 + k % 2, "category_id": 1, "iscrowd": iscrowd,
                           "segmentation": s, "area": 1.0, "bbox": [0, 0, 1, 1]} for k, s in enumerate(segs)]
    _run_instances(fuzz_home, doc)


@FUZZ
@given(raw=st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode)))
def test_fuzz_instances_bytes(fuzz_home: Any, raw: bytes) -> None:
    _run_instances(fuzz_home, None, raw=raw)


# ----------------------------------------------------------------------------------------------
# COCO panoptic: PNG segment ids and segments_info
# ----------------------------------------------------------------------------------------------

seg_id = st.one_of(st.sampled_from([0, 1, 2, 300, 65793, 16777215]), weird)


@st.composite
def panoptic_case(draw: Any) -> Any:
    w, h = 16, 12
    ids = draw(st.lists(st.sampled_from([0, 1, 2, 300, 65793, 16777215, 7]), min_size=1, max_size=4))
    grid = np.array(draw(st.lists(st.sampled_from(ids), min_size=w * h, max_size=w * h)), dtype=np.int64)
    png_kind = draw(st.sampled_from(["rgb", "rgb", "rgb", "gray", "wrong-size", "garbage", "missing", "rgba"]))
    segments = draw(st.lists(st.fixed_dictionaries({"id": seg_id, "category_id": category_id}), max_size=5))
    ann = {"image_id": draw(image_id), "file_name": draw(st.one_of(st.just("a.png"), weird)),
           "segments_info": draw(st.one_of(st.just(segments), weird))}
    cats = draw(st.lists(st.fixed_dictionaries({"id": st.one_of(st.sampled_from([1, 2, 3]), weird),
                                                "name": st.sampled_from(["sky-other-merged", "grass", "dog",
                                                                         "wall-other"]),
                                                "isthing": st.sampled_from([0, 1])}), min_size=0, max_size=3))
    return grid.reshape(h, w), png_kind, ann, cats


@FUZZ
@given(case=panoptic_case())
def test_fuzz_panoptic(fuzz_home: Any, case: Any) -> None:
    grid, png_kind, ann, cats = case
    cli, base = fuzz_home
    name = f"p{next(_names)}"
    root = base / name
    _write_images(root / "val2017")
    masks = root / "annotations" / "panoptic_val2017"
    masks.mkdir(parents=True)
    rgb = np.stack([grid % 256, grid // 256 % 256, grid // 65536 % 256], axis=-1).astype(np.uint8)
    png = masks / "a.png"
    if png_kind == "rgb":
        Image.fromarray(rgb).save(png)
    elif png_kind == "rgba":
        Image.fromarray(np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], -1)).save(png)
    elif png_kind == "gray":
        Image.fromarray(rgb[..., 0]).save(png)
    elif png_kind == "wrong-size":
        Image.fromarray(rgb[:5, :7]).save(png)
    elif png_kind == "garbage":
        png.write_bytes(b"not a png" * 5)
    else:
        Image.fromarray(rgb).save(masks / "other.png")
    doc = {"images": [{"id": 1, "file_name": "a.jpg", "width": 16, "height": 12}], "annotations": [ann],
           "categories": cats}
    (root / "annotations" / "panoptic_val2017.json").write_text(json.dumps(doc))
    res = cli("-q", "download", "coco-panoptic", "--from", str(root), "--name", name)
    ok_or_one_line(res)
    if res.exit_code == 0:
        ok_or_one_line(cli("-q", "preprocess", name, "--embedding", "g"))


# ----------------------------------------------------------------------------------------------
# GloVe lines
# ----------------------------------------------------------------------------------------------

number = st.one_of(st.floats(-5, 5, allow_nan=False).map(lambda x: f"{x:.4f}"),
                   st.sampled_from(["nan", "inf", "-inf", "1e400", "abc", "", "0x1p3", "1,5"]))
glove_line = st.one_of(
    st.builds(lambda w, v: " ".join([w] + v), st.sampled_from(["dog", "cat", "new york", "é", ""]),
              st.lists(number, min_size=3, max_size=5)),
    st.text(max_size=20),
)


@FUZZ
@given(lines=st.lists(glove_line, min_size=1, max_size=6), header=st.booleans())
def test_fuzz_glove_lines(fuzz_home: Any, lines: list[str], header: bool) -> None:
    cli, base = fuzz_home
    f = base / f"v{next(_names)}.txt"
    text = "\n".join(lines) + "\n"
    if header:
        text = f"{len(lines)} 4\n" + text
    f.write_text(text, encoding="utf-8", errors="surrogatepass") if False else f.write_bytes(
        text.encode("utf-8", errors="replace"))
    res = cli("-q", "download", "glove", "--from", str(f), "--name", f.stem)
    ok_or_one_line(res)
    if res.exit_code == 0:  # whatever was registered holds only finite vectors of one length
        from lavise_cli.embeddings import load_embedding
        from lavise_cli.store import Store

        emb = load_embedding(Store(cli.home), f.stem)
        assert np.isfinite(np.asarray(emb.vectors)).all()


# ----------------------------------------------------------------------------------------------
# --filters, --mean / --std
# ----------------------------------------------------------------------------------------------

filter_text = st.one_of(
    st.text(alphabet="0123456789-, x", max_size=16),
    st.lists(st.one_of(st.integers(-5, 600).map(str),
                       st.tuples(st.integers(-5, 600), st.integers(-5, 600)).map(lambda t: f"{t[0]}-{t[1]}")),
             max_size=4).map(",".join),
    st.text(max_size=10),
)


@QUICK
@given(text=filter_text, d=st.integers(1, 512))
def test_fuzz_filters(text: str, d: int) -> None:
    from lavise_cli.explain import parse_filters

    try:
        got = parse_filters(text, d)
    except LaviseError as e:
        assert "\n" not in str(e)
        return
    assert got == sorted(set(got)) and all(0 <= f < d for f in got)


float_text = st.one_of(
    st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), number), max_size=4).map(",".join),
    st.text(max_size=16),
)


@QUICK
@given(text=float_text, positive=st.booleans())
def test_fuzz_mean_std(text: str, positive: bool) -> None:
    from lavise_cli.cli.train_cmd import parse_floats

    try:
        got = parse_floats(text, 3, "--std" if positive else "--mean", positive=positive)
    except LaviseError as e:
        assert "\n" not in str(e)
        return
    assert got is not None and len(got) == 3 and all(math.isfinite(v) for v in got)
    if positive:
        assert min(got) > 0


@FUZZ
@given(mean=float_text, std=float_text)
def test_fuzz_mean_std_cli(fuzz_home: Any, mean: str, std: str) -> None:
    cli, _ = fuzz_home
    # the options are checked before anything is loaded: a missing dataset is fine here
    res = cli("-q", "train", "resnet18", "no-such-dataset", "--weights", "none", "--mean", mean, "--std", std)
    ok_or_one_line(res)
    assert res.exit_code != 0
