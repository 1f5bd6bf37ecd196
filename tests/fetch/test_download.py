"""`lavise download`: the source catalogue, registration, whole-dataset downloads, the CLI.

Every network test talks to a real HTTP server on 127.0.0.1 (``http_server`` in conftest.py:
an ephemeral port, fixture bytes, ``Range`` honoured, a transfer that can be cut off half-way).
The generic pieces are tested on their own: resumable HTTP in test_http.py, safe extraction in
test_archives.py (their tests moved there from this file).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from PIL import Image

from lavise_cli import download as dl
from lavise_cli.errors import DataError, LaviseError
from lavise_cli.store import Store

if TYPE_CHECKING:
    from conftest import FixtureServer

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture
def server(http_server: FixtureServer) -> FixtureServer:
    """The real 127.0.0.1 HTTP server of conftest.py (the generic fetch tests are in test_http.py)."""
    return http_server


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "home")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# Tiny fixture data
# ----------------------------------------------------------------------------------------------
def jpeg(width: int = 40, height: int = 30, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="JPEG")
    return buf.getvalue()


def png(width: int = 40, height: int = 30) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (1, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def instances_json(file_names: list[str]) -> dict[str, Any]:
    images = [{"id": i + 1, "file_name": f, "width": 40, "height": 30} for i, f in enumerate(file_names)]
    anns = [
        {
            "id": i + 1,
            "image_id": i + 1,
            "category_id": 1,
            "iscrowd": 0,
            "area": 100.0,
            "bbox": [5, 5, 10, 10],
            "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]],
        }
        for i in range(len(file_names))
    ]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "dog", "supercategory": "animal"}]}


def panoptic_json(file_names: list[str]) -> dict[str, Any]:
    images = [{"id": i + 1, "file_name": f, "width": 40, "height": 30} for i, f in enumerate(file_names)]
    anns = [
        {
            "image_id": i + 1,
            "file_name": f.replace(".jpg", ".png"),
            "segments_info": [{"id": 1, "category_id": 1, "iscrowd": 0, "area": 1200, "bbox": [0, 0, 40, 30]}],
        }
        for i, f in enumerate(file_names)
    ]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "dog", "isthing": 1}]}


def make_coco(root: Path, splits: tuple[str, ...] = ("train", "val"), images: bool = True) -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for s in splits:
        names = [f"{s}_{i:03d}.jpg" for i in range(2)]
        (root / "annotations" / f"instances_{s}2017.json").write_text(json.dumps(instances_json(names)))
        if images:
            (root / f"{s}2017").mkdir(exist_ok=True)
            for k, n in enumerate(names):
                (root / f"{s}2017" / n).write_bytes(jpeg(color=(50 * k, 100, 150)))
    return root


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# the source catalogue; the public names
# ----------------------------------------------------------------------------------------------
def test_mirror_rewrites_source_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    src = dl.SOURCES["coco-val-images"]
    assert src.resolved_url == "http://images.cocodataset.org/zips/val2017.zip"
    monkeypatch.setenv(dl.MIRROR_ENV, "http://127.0.0.1:9/mirror/")
    assert src.resolved_url == "http://127.0.0.1:9/mirror/val2017.zip"
    assert dl.glove_source("glove-wiki-gigaword-300")[0] == "http://127.0.0.1:9/mirror/glove-wiki-gigaword-300.gz"
    assert dl.glove_source("https://example.org/v.txt.gz") == ("https://example.org/v.txt.gz", None, None)


def test_sources_table() -> None:
    assert [s.filename for s in dl.sources_for("coco", "val")] == ["annotations_trainval2017.zip", "val2017.zip"]
    assert [s.filename for s in dl.sources_for("coco-panoptic", "all")] == [
        "panoptic_annotations_trainval2017.zip",
        "train2017.zip",
        "val2017.zip",
    ]
    assert {s.filename for s in dl.sources_for("vg")} >= {
        "images.zip",
        "images2.zip",
        "objects.json.zip",
        "object_synsets.json.zip",
    }
    for s in dl.SOURCES.values():
        assert s.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", s.sha256)
        assert s.size > 0
    with pytest.raises(LaviseError, match="unknown split"):
        dl.sources_for("coco", "test")


def test_public_names_stay_importable_from_download() -> None:
    """The split moved the generic pieces to their own modules; `lavise_cli.download` re-exports them."""
    import lavise_cli
    from lavise_cli.data import register
    from lavise_cli.fetch import archives, http

    for name in ("fetch", "part_path", "human_size", "USER_AGENT"):
        assert getattr(dl, name) is getattr(http, name), name
    for name in ("extract", "is_archive"):
        assert getattr(dl, name) is getattr(archives, name), name
    for name in ("register_coco", "register_vg", "downloads_dir", "remove_dataset", "SPLITS", "VG_IMAGE_DIRS"):
        assert getattr(dl, name) is getattr(register, name), name
    for name in ("register_coco", "register_vg", "download_dataset", "download_glove", "download_weights"):
        assert getattr(lavise_cli, name) is getattr(dl, name), name
    assert set(dl.__all__) <= set(dir(dl))


# ----------------------------------------------------------------------------------------------
# register_coco / register_vg
# ----------------------------------------------------------------------------------------------
def test_register_coco_generated(store: Store, tmp_path: Path) -> None:
    root = make_coco(tmp_path / "coco")
    entry = dl.register_coco(store, root, "mini")
    s = entry.manifest["settings"]
    assert s == {
        "format": "coco",
        "root": str(root.resolve()),
        "splits": {
            sp: {
                "annotations": str(root / "annotations" / f"instances_{sp}2017.json"),
                "images": str(root / f"{sp}2017"),
                "num_images": 2,
            }
            for sp in ("train", "val")
        },
    }
    assert entry.manifest["inputs"] == {
        f"{sp}.annotations": sha((root / "annotations" / f"instances_{sp}2017.json").read_bytes())
        for sp in ("train", "val")
    }
    assert entry.kind == "datasets" and store.exists("datasets", "mini")
    assert sorted(p.name for p in entry.path.iterdir()) == ["manifest.json"]  # nothing copied
    only_val = dl.register_coco(store, root, "mini-val", splits=["val"])
    assert list(only_val.manifest["settings"]["splits"]) == ["val"]


def test_register_coco_one_split_missing_is_fine(store: Store, tmp_path: Path) -> None:
    root = make_coco(tmp_path / "coco", splits=("val",))
    entry = dl.register_coco(store, root)
    assert list(entry.manifest["settings"]["splits"]) == ["val"] and entry.name == "coco"


def test_register_coco_bad_layouts(store: Store, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"annotations/instances_\{train,val\}2017.json"):
        dl.register_coco(store, empty)
    with pytest.raises(DataError, match="is not a folder"):
        dl.register_coco(store, tmp_path / "nope")
    no_images = make_coco(tmp_path / "noimg", splits=("val",), images=False)
    with pytest.raises(DataError, match=r"images folder val2017/ is missing"):
        dl.register_coco(store, no_images)
    broken = make_coco(tmp_path / "broken", splits=("val",))
    (broken / "annotations" / "instances_val2017.json").write_text('{"images": [')
    with pytest.raises(DataError, match="not valid JSON"):
        dl.register_coco(store, broken)
    (broken / "annotations" / "instances_val2017.json").write_text('{"images": []}')
    with pytest.raises(DataError, match="'annotations', 'categories'"):
        dl.register_coco(store, broken)
    with pytest.raises(DataError, match="split 'train' asked for"):
        dl.register_coco(store, make_coco(tmp_path / "v", splits=("val",)), splits=["train"])
    with pytest.raises(LaviseError, match="invalid entry name"):
        dl.register_coco(store, make_coco(tmp_path / "w"), "../x")
    assert store.list("datasets") == []


def test_register_coco_panoptic_generated(store: Store, tmp_path: Path) -> None:
    root = tmp_path / "pan"
    (root / "annotations" / "panoptic_val2017").mkdir(parents=True)
    (root / "annotations" / "panoptic_val2017.json").write_text(json.dumps(panoptic_json(["a.jpg"])))
    with pytest.raises(DataError, match="holds no PNG"):
        dl.register_coco(store, root, panoptic=True)
    (root / "annotations" / "panoptic_val2017" / "a.png").write_bytes(png())
    with pytest.raises(DataError, match="images folder val2017/ is missing"):
        dl.register_coco(store, root, panoptic=True)
    (root / "val2017").mkdir()
    (root / "val2017" / "a.jpg").write_bytes(jpeg())
    entry = dl.register_coco(store, root, "pan", panoptic=True)
    assert entry.manifest["settings"]["splits"]["val"] == {
        "annotations": str(root / "annotations" / "panoptic_val2017.json"),
        "images": str(root / "val2017"),
        "masks": str(root / "annotations" / "panoptic_val2017"),
        "num_images": 1,
    }
    assert entry.manifest["settings"]["format"] == "coco-panoptic"


@pytest.mark.skipif(not (SHARED / "coco_tiny").is_dir(), reason="shared/data/coco_tiny is absent")
def test_register_real_coco_tiny(store: Store) -> None:
    entry = dl.register_coco(store, SHARED / "coco_tiny", "coco-tiny")
    splits = entry.manifest["settings"]["splits"]
    assert {k: v["num_images"] for k, v in splits.items()} == {"train": 80, "val": 80}


@pytest.mark.skipif(not (SHARED / "coco128_panoptic").is_dir(), reason="shared/data/coco128_panoptic is absent")
def test_register_real_coco128_panoptic(store: Store) -> None:
    entry = dl.register_coco(store, SHARED / "coco128_panoptic", "coco128", panoptic=True)
    splits = entry.manifest["settings"]["splits"]
    assert {k: v["num_images"] for k, v in splits.items()} == {"train": 100, "val": 100}
    assert all(Path(v["masks"]).is_dir() for v in splits.values())
    with pytest.raises(DataError, match="no COCO instances annotations"):
        dl.register_coco(store, SHARED / "coco128_panoptic")


def test_register_vg(store: Store, tmp_path: Path) -> None:
    root = tmp_path / "vg"
    with pytest.raises(DataError, match="is not a folder"):
        dl.register_vg(store, root)
    (root / "VG_100K").mkdir(parents=True)
    with pytest.raises(DataError, match="objects.json"):
        dl.register_vg(store, root)
    (root / "objects.json").write_text(json.dumps([{"image_id": 1, "objects": []}]))
    (root / "VG_100K" / "1.jpg").write_bytes(jpeg())
    (root / "VG_100K" / "2.jpg").write_bytes(jpeg())
    entry = dl.register_vg(store, root)
    block = entry.manifest["settings"]["splits"]["train"]
    assert entry.manifest["settings"]["format"] == "vg" and block["num_images"] == 2
    assert block["images"] == str(root / "VG_100K") and "train.annotations" in entry.manifest["inputs"]


# ----------------------------------------------------------------------------------------------
# download_dataset through a mirror
# ----------------------------------------------------------------------------------------------
def serve_sources(server: FixtureServer, monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes]) -> None:
    """Serve ``files`` as the mirror and make SOURCES expect exactly those bytes."""
    monkeypatch.setenv(dl.MIRROR_ENV, server.base)
    table = dict(dl.SOURCES)
    for key, src in dl.SOURCES.items():
        if src.filename in files:
            data = files[src.filename]
            server.serve(src.filename, data)
            table[key] = dataclasses.replace(src, size=len(data), exact=True, sha256=sha(data))
    monkeypatch.setattr(dl, "SOURCES", table)


def coco_archives() -> dict[str, bytes]:
    names = ["000000000001.jpg", "000000000002.jpg"]
    ann = zip_bytes(
        {
            "annotations/instances_val2017.json": json.dumps(instances_json(names)).encode(),
            "annotations/instances_train2017.json": json.dumps(instances_json(["t.jpg"])).encode(),
        }
    )
    val = zip_bytes({f"val2017/{n}": jpeg() for n in names})
    return {"annotations_trainval2017.zip": ann, "val2017.zip": val}


def test_download_coco_val_via_mirror(server: FixtureServer, monkeypatch: pytest.MonkeyPatch, store: Store) -> None:
    files = coco_archives()
    serve_sources(server, monkeypatch, files)
    server.cut_after["/val2017.zip"] = len(files["val2017.zip"]) // 2
    said: list[str] = []
    with pytest.raises(DataError, match="resume"):
        dl.download_dataset(store, "coco", split="val", name="c", announce=said.append)
    assert "2 files" not in said[0] and "annotations_trainval2017.zip" in said[0]
    assert not store.exists("datasets", "c")

    entry = dl.download_dataset(store, "coco", split="val", name="c", announce=said.append)
    assert [r["path"] for r in server.requests] == ["/annotations_trainval2017.zip", "/val2017.zip", "/val2017.zip"]
    assert "Range" in server.requests[-1]["headers"]
    s = entry.manifest["settings"]
    data = store.root / "downloads" / "c" / "data"
    assert s["format"] == "coco" and list(s["splits"]) == ["val"] and s["root"] == str(data)
    assert s["splits"]["val"]["num_images"] == 2 and len(list((data / "val2017").iterdir())) == 2
    assert {d["file"]: d["sha256"] for d in entry.manifest["downloads"]} == {k: sha(v) for k, v in files.items()}
    assert not (store.root / "downloads" / "c" / "val2017.zip").exists()  # deleted once unpacked

    # Everything is there: a second run downloads nothing and keeps the entry.
    n = len(server.requests)
    again = dl.download_dataset(store, "coco", split="val", name="c", announce=said.append)
    assert len(server.requests) == n and "downloaded already" in said[-2]
    assert again.manifest["inputs"] == entry.manifest["inputs"]


def test_download_coco_panoptic_unpacks_inner_png_zip(
    server: FixtureServer, monkeypatch: pytest.MonkeyPatch, store: Store
) -> None:
    inner = zip_bytes({"panoptic_val2017/000000000001.png": png()})
    outer = zip_bytes(
        {
            "annotations/panoptic_val2017.json": json.dumps(panoptic_json(["000000000001.jpg"])).encode(),
            "annotations/panoptic_val2017.zip": inner,
        }
    )
    val = zip_bytes({"val2017/000000000001.jpg": jpeg()})
    serve_sources(server, monkeypatch, {"panoptic_annotations_trainval2017.zip": outer, "val2017.zip": val})
    entry = dl.download_dataset(store, "coco-panoptic", split="val")
    block = entry.manifest["settings"]["splits"]["val"]
    assert entry.name == "coco-panoptic" and Path(block["masks"], "000000000001.png").is_file()
    assert not Path(block["masks"]).with_suffix(".zip").exists()


def test_download_with_wrong_checksum_registers_nothing(
    server: FixtureServer, monkeypatch: pytest.MonkeyPatch, store: Store
) -> None:
    files = coco_archives()
    serve_sources(server, monkeypatch, files)
    table = dict(dl.SOURCES)
    table["coco-val-images"] = dataclasses.replace(table["coco-val-images"], sha256="1" * 64)
    monkeypatch.setattr(dl, "SOURCES", table)
    with pytest.raises(DataError, match="checksum mismatch for val2017.zip"):
        dl.download_dataset(store, "coco", split="val")
    d = store.root / "downloads" / "coco"
    assert not (d / "val2017.zip").exists() and not dl.part_path(d / "val2017.zip").exists()
    assert not store.exists("datasets", "coco")


def test_download_of_a_missing_source_names_the_mirror(
    server: FixtureServer, monkeypatch: pytest.MonkeyPatch, store: Store
) -> None:
    files = coco_archives()
    del files["val2017.zip"]  # the mirror lacks it
    serve_sources(server, monkeypatch, files)
    with pytest.raises(DataError) as exc:
        dl.download_dataset(store, "coco", split="val")
    assert str(exc.value).endswith(f"HTTP 404 Not Found; check the address (and {dl.MIRROR_ENV}, if set)")
    assert not store.exists("datasets", "coco")


def test_remove_dataset_deletes_its_downloads_unless_kept(
    server: FixtureServer, monkeypatch: pytest.MonkeyPatch, store: Store, tmp_path: Path
) -> None:
    serve_sources(server, monkeypatch, coco_archives())
    dl.download_dataset(store, "coco", split="val")
    folder = store.root / "downloads" / "coco"
    kept = dl.remove_dataset(store, "coco", keep_downloads=True)
    assert kept == dl.Removed("coco") and not store.exists("datasets", "coco")
    assert (folder / "data" / "val2017").is_dir()

    dl.download_dataset(store, "coco", split="val")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    removed = dl.remove_dataset(store, "coco")
    assert removed.downloads == folder and removed.freed == size > 0
    assert not folder.exists() and not store.exists("datasets", "coco")
    assert not list(folder.parent.glob(".old-*"))

    local = make_coco(tmp_path / "local")
    before = sorted(p.relative_to(local) for p in local.rglob("*"))
    dl.register_coco(store, local, "mine")
    assert dl.remove_dataset(store, "mine") == dl.Removed("mine")
    assert sorted(p.relative_to(local) for p in local.rglob("*")) == before
    with pytest.raises(LaviseError):
        dl.remove_dataset(store, "mine")


def test_download_glove_via_mirror(server: FixtureServer, monkeypatch: pytest.MonkeyPatch, store: Store) -> None:
    embeddings = pytest.importorskip("lavise_cli.embeddings")
    assert hasattr(embeddings, "register_embedding")
    import gzip

    text = "3 4\ndog 0.1 0.2 0.3 0.4\ncat 0.2 0.1 0.0 0.3\ncar -0.1 0.5 0.2 0.1\n"
    data = gzip.compress(text.encode())
    monkeypatch.setenv(dl.MIRROR_ENV, server.base)
    server.serve("glove-tiny-test.gz", data)
    entry = dl.download_glove(store, "glove-tiny-test", name="tiny")
    assert entry.kind == "embeddings" and entry.name == "tiny"
    assert (store.root / "downloads" / "embeddings" / "glove-tiny-test.gz").read_bytes() == data


def test_download_weights_unknown_model_suggests_names() -> None:
    pytest.importorskip("torchvision")
    with pytest.raises(LaviseError, match="did you mean: .*resnet18"):
        dl.download_weights("resnet19")
    with pytest.raises(LaviseError, match="choose one of: DEFAULT, IMAGENET1K_V1"):
        dl.download_weights("resnet18", "IMAGENET9K")


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def cli() -> Any:
    from typer.testing import CliRunner

    import lavise_cli.cli.download_cmd  # noqa: F401  (registers `download`)
    from lavise_cli.cli.app import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args))


def test_cli_help_has_examples(cli: Any) -> None:
    for sub in ([], ["coco"], ["coco-panoptic"], ["vg"], ["glove"], ["weights"]):
        result = cli("download", *sub, "--help")
        assert result.exit_code == 0, result.output
        assert "Example:" in result.output


def test_cli_coco_from_dir(cli: Any, tmp_path: Path) -> None:
    root = make_coco(tmp_path / "coco")
    home = tmp_path / "home"
    result = cli("--home", str(home), "download", "coco", "--from", str(root), "--name", "coco-tiny", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["name"] == "coco-tiny" and doc["kind"] == "datasets"
    assert doc["settings"]["format"] == "coco" and set(doc["settings"]["splits"]) == {"train", "val"}
    assert Store(home).exists("datasets", "coco-tiny")

    result = cli("--home", str(home), "download", "coco", "--from", str(root), "--split", "val", "--name", "v")
    assert result.exit_code == 0 and "registered dataset v" in result.stdout


@pytest.mark.skipif(not (SHARED / "coco_tiny").is_dir(), reason="shared/data/coco_tiny is absent")
def test_cli_coco_from_real_data(cli: Any, tmp_path: Path) -> None:
    result = cli(
        "--home",
        str(tmp_path),
        "download",
        "coco",
        "--from",
        str(SHARED / "coco_tiny"),
        "--name",
        "coco-tiny",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["settings"]["splits"]["val"]["num_images"] == 80


def test_cli_errors_are_one_line(cli: Any, tmp_path: Path) -> None:
    result = cli("--home", str(tmp_path), "download", "coco", "--from", str(tmp_path / "missing"))
    assert result.exit_code == DataError.exit_code
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.output
    result = cli("--home", str(tmp_path), "download", "coco-panoptic", "--from", str(make_coco(tmp_path / "c")))
    assert result.exit_code == DataError.exit_code and "no COCO panoptic annotations" in result.stderr
    result = cli("--home", str(tmp_path), "download", "coco", "--split", "test")
    assert result.exit_code != 0 and "Traceback" not in result.output


def test_cli_download_coco_val_via_mirror(
    cli: Any, server: FixtureServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    serve_sources(server, monkeypatch, coco_archives())
    result = cli("--home", str(tmp_path), "download", "coco", "--split", "val", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["name"] == "coco" and list(doc["settings"]["splits"]) == ["val"]
    assert "to download" in result.stderr
    assert {r["path"] for r in server.requests} == {"/annotations_trainval2017.zip", "/val2017.zip"}

    # removing the dataset removes what was downloaded for it; --keep-downloads keeps it
    dl = tmp_path / "downloads" / "coco"
    assert (dl / "data" / "val2017").is_dir()
    result = cli("--home", str(tmp_path), "store", "rm", "datasets", "coco", "--keep-downloads")
    assert result.exit_code == 0, result.output
    assert (dl / "data" / "val2017").is_dir()
    assert cli("--home", str(tmp_path), "download", "coco", "--split", "val").exit_code == 0
    result = cli("--home", str(tmp_path), "store", "rm", "datasets", "coco")
    assert result.exit_code == 0, result.output
    assert not dl.exists() and "downloaded files" in result.stderr
    assert not list((tmp_path / "downloads").glob(".old-*"))


def test_cli_store_rm_of_a_from_dataset_leaves_the_folder(cli: Any, tmp_path: Path) -> None:
    src = make_coco(tmp_path / "c")
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    assert cli("--home", str(tmp_path / "home"), "download", "coco", "--from", str(src), "--name", "mine").exit_code == 0
    result = cli("--home", str(tmp_path / "home"), "store", "rm", "datasets", "mine")
    assert result.exit_code == 0, result.output
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before


def test_cli_glove_from_a_folder(cli: Any, tmp_path: Path) -> None:
    """A folder holding exactly one vector file is that file; otherwise one line says what is needed."""
    pytest.importorskip("lavise_cli.embeddings")
    home = ("--home", str(tmp_path / "home"))
    folder = tmp_path / "glove"
    folder.mkdir()
    (folder / "README").write_text("not vectors")
    empty = cli(*home, "download", "glove", "--from", str(folder))
    assert empty.exit_code == DataError.exit_code and "Traceback" not in empty.output
    msg = " ".join(empty.stderr.split())
    assert "folder with no word-vector file" in msg and "does not exist" not in msg, msg
    (folder / "tiny.glove.txt").write_text("dog 0.1 0.2 0.3\ncat 0.2 0.1 0.0\n")
    one = cli(*home, "download", "glove", "--from", str(folder), "--json")
    assert one.exit_code == 0, one.output
    doc = json.loads(one.stdout)
    assert doc["name"] == "tiny.glove" and doc["settings"]["source"] == str((folder / "tiny.glove.txt").resolve())
    (folder / "other.vec").write_text("dog 0.1 0.2 0.3\n")
    two = cli(*home, "download", "glove", "--from", str(folder))
    assert two.exit_code == DataError.exit_code and "Traceback" not in two.output
    msg = " ".join(two.stderr.split())
    assert "2 word-vector files" in msg and "other.vec" in msg and "tiny.glove.txt" in msg, msg
    assert len([ln for ln in two.stderr.splitlines() if ln.strip()]) == 1  # one line, however long


def test_cli_glove_from_file(cli: Any, tmp_path: Path) -> None:
    pytest.importorskip("lavise_cli.embeddings")
    vectors = tmp_path / "tiny.glove.txt"
    vectors.write_text("dog 0.1 0.2 0.3\ncat 0.2 0.1 0.0\ncar -0.1 0.5 0.2\n")
    result = cli("--home", str(tmp_path / "home"), "download", "glove", "--from", str(vectors), "--name", "g", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["kind"] == "embeddings" and doc["name"] == "g"
    result = cli("--home", str(tmp_path / "home"), "download", "glove", "--from", str(tmp_path / "none.txt"))
    assert result.exit_code == DataError.exit_code and "Traceback" not in result.output
