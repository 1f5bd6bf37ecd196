"""Fixtures shared by the whole suite.

- ``shared_data``: the real data folder ``../shared/data`` (skips when absent);
- ``glove_file``: the real 100k-word GloVe 6B 50-d file (skips when absent);
- ``store``: an empty :class:`Store` under ``tmp_path / "home"``;
- ``small_glove``: a tiny GloVe-format text file (no header, ~45 words, seeded 16-d vectors);
- ``make_coco``: writes a small COCO instances layout (JSON + PIL-generated images);
- ``cli``: runs the ``lavise`` app with ``--home`` set to the ``store`` fixture's root;
- ``real_store`` / ``real_store_info``: the real data registered and preprocessed once per session;
- ``http_server``: a real HTTP server on 127.0.0.1 (:class:`FixtureServer`: serves bytes, honours
  ``Range`` unless told not to, can cut a transfer off half-way).
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lavise_cli.store import Store

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GLOVE_100K = SHARED_DATA / "glove" / "glove.6B.50d.top100k.txt.gz"



@pytest.fixture(autouse=True)
def _cpu_without_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--precision auto`` resolves as on a CPU without native bf16 (fp32) on every machine, so
    that tests comparing with fp32 references do not depend on the CPU they run on; tests of bf16
    ask for it (``precision="bf16"``), tests of ``auto`` fake the CPU flags themselves."""
    from lavise_cli import runtime

    monkeypatch.setattr(runtime, "_cpu_flags", lambda: frozenset())


# ----------------------------------------------------------------------------------------------
# Real data
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real COCO subsets and GloVe); skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (a user's checkout has no ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def glove_file() -> Path:
    """The real 100k-word GloVe 6B 50-d text file (gzip, no header); skips when absent."""
    if not GLOVE_100K.is_file():
        pytest.skip(f"real GloVe file {GLOVE_100K} is absent")
    return GLOVE_100K


# ----------------------------------------------------------------------------------------------
# A real HTTP server (downloads: tests/test_http.py, tests/test_download.py)
# ----------------------------------------------------------------------------------------------
class FixtureServer(ThreadingHTTPServer):
    """Serves ``files`` (path -> bytes) on an ephemeral 127.0.0.1 port and records each request.

    ``honour_ranges = False`` answers every request with the whole file (HTTP 200);
    ``cut_after[path] = n`` sends only ``n`` bytes of the body once, then drops the connection.
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _FixtureHandler)
        self.files: dict[str, bytes] = {}
        self.requests: list[dict[str, Any]] = []
        self.cut_after: dict[str, int] = {}  # path -> bytes sent before the connection is dropped (once)
        self.honour_ranges = True

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def serve(self, name: str, data: bytes) -> str:
        self.files["/" + name] = data
        return self.url(name)


class _FixtureHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FixtureServer

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        srv = self.server
        srv.requests.append({"path": self.path, "headers": dict(self.headers)})
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if m and srv.honour_ranges:
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        cut = srv.cut_after.pop(self.path, None)
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@pytest.fixture
def http_server() -> Iterator[FixtureServer]:
    srv = FixtureServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


# ----------------------------------------------------------------------------------------------
# A store and the command line
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """An empty artifact store rooted at ``tmp_path / "home"`` (the ``cli`` fixture's home)."""
    return Store(tmp_path / "home")


class Cli:
    """``cli(*args)`` runs ``lavise --home HOME *args`` in-process and returns the Typer result.

    ``home=`` picks another root for one call (``home=None`` leaves ``--home`` out, e.g. to test
    ``LAVISE_HOME``); ``env=`` sets environment variables for the call.  The result has
    ``exit_code``, ``stdout`` (results, JSON), ``stderr`` (messages) and ``output``.
    """

    _UNSET: Any = object()

    def __init__(self, home: Path):
        self.home = home

    def __call__(self, *args: str, home: Any = _UNSET, env: dict[str, str | None] | None = None) -> Any:
        from typer.testing import CliRunner

        from lavise_cli.cli import app

        home = self.home if home is self._UNSET else home
        argv = (["--home", str(home)] if home is not None else []) + [str(a) for a in args]
        return CliRunner().invoke(app, argv, env=env)

    def json(self, *args: str, **kw: Any) -> Any:
        """Run the command (which must take ``--json``) and parse its stdout; asserts success."""
        result = self(*args, "--json", **kw)
        assert result.exit_code == 0, f"lavise {' '.join(args)} failed:\n{result.output}"
        return json.loads(result.stdout)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "home")


# ----------------------------------------------------------------------------------------------
# A tiny GloVe file
# ----------------------------------------------------------------------------------------------

SMALL_GLOVE_WORDS = (
    "the of and person man woman dog cat horse sheep cow bird car bus truck bicycle boat "
    "traffic light stop sign fire hydrant hot sky grass tree wall table pizza chair couch bed road "
    "water house window door red blue green small big"
).split()
SMALL_GLOVE_DIM = 16


def write_glove(path: Path, words: Sequence[str], dim: int = SMALL_GLOVE_DIM, seed: int = 0) -> Path:
    """Write seeded random (not normalised) vectors in GloVe text format: ``word v1 ... vd``."""
    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(len(words), dim)) * rng.uniform(0.5, 3.0, size=(len(words), 1))
    with open(path, "w", encoding="utf-8") as fh:
        for w, v in zip(words, vecs):
            fh.write(w + " " + " ".join(f"{x:.6f}" for x in v) + "\n")
    return path


def assert_clear_error(result: Any, *needles: str) -> str:
    """Exit code != 0, no traceback, and exactly one line on stderr: ``error: ...`` holding ``needles``."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def read_glove(path: Path) -> dict[str, np.ndarray]:
    """The raw vectors of a GloVe text file (plain or gzip), as float64."""
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    out: dict[str, np.ndarray] = {}
    with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
        for line in fh:
            parts = line.rstrip("\n").split(" ")
            out[parts[0]] = np.asarray(parts[1:], dtype=np.float64)
    return out


@pytest.fixture
def small_glove(tmp_path: Path) -> Path:
    """A GloVe-format file (no header) of ~45 common words with seeded random 16-d vectors."""
    return write_glove(tmp_path / "small_glove.16d.txt", SMALL_GLOVE_WORDS)


# ----------------------------------------------------------------------------------------------
# A small COCO instances layout
# ----------------------------------------------------------------------------------------------


def rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts of a binary ``(H, W)`` mask (column-major, starting with 0s)."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    counts: list[int] = []
    current, run = 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = int(v), 1
    counts.append(run)
    return counts


def polygon_ann(ann_id: int, image_id: int, category_id: int, *polygons: Sequence[float]) -> dict[str, Any]:
    """A polygon annotation (``polygons``: flat ``x1, y1, x2, y2, ...`` lists, at least 3 points)."""
    xs = [p[i] for p in polygons for i in range(0, len(p), 2)]
    ys = [p[i] for p in polygons for i in range(1, len(p), 2)]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "iscrowd": 0,
        "segmentation": [list(map(float, p)) for p in polygons],
        "area": 0.0,
        "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
    }


def crowd_ann(ann_id: int, image_id: int, category_id: int, mask: np.ndarray) -> dict[str, Any]:
    """A crowd annotation whose segmentation is the uncompressed RLE of ``mask`` ``(H, W)``."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)] \
        if len(xs) else [0.0, 0.0, 0.0, 0.0]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "iscrowd": 1,
        "segmentation": {"counts": rle_counts(mask), "size": [h, w]},
        "area": float(mask.sum()),
        "bbox": bbox,
    }


IMAGE_KINDS = ("rgb", "gray", "cmyk", "rgba", "truncated", "garbage", "missing")


def write_image(path: Path, width: int, height: int, kind: str = "rgb", seed: int = 0) -> None:
    """A seeded noise image of ``kind``: ``rgb`` (JPEG), ``gray`` (L JPEG), ``cmyk`` (CMYK JPEG),
    ``rgba`` (PNG with alpha, whatever the file name says), ``truncated`` (a JPEG cut in half),
    ``garbage`` (bytes that are no image), ``missing`` (nothing written)."""
    if kind not in IMAGE_KINDS:
        raise ValueError(f"unknown image kind {kind!r}; one of {IMAGE_KINDS}")
    if kind == "missing":
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "garbage":
        path.write_bytes(b"this is not an image at all\n" * 20)
        return
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")
    if kind == "rgb":
        rgb.save(path, format="JPEG", quality=90)
    elif kind == "gray":
        rgb.convert("L").save(path, format="JPEG", quality=90)
    elif kind == "cmyk":
        rgb.convert("CMYK").save(path, format="JPEG", quality=90)
    elif kind == "rgba":
        im = rgb.convert("RGBA")
        im.putalpha(128)
        im.save(path, format="PNG")
    elif kind == "truncated":
        import io

        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=95)
        data = buf.getvalue()
        path.write_bytes(data[: len(data) // 2])


DEFAULT_CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 10, "name": "traffic light", "supercategory": "outdoor"},
    {"id": 17, "name": "cat", "supercategory": "animal"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
]


def _default_split(split: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Three images (non-square ones included) with polygons, a multi-instance union and a crowd RLE."""
    images = [
        {"id": 1, "file_name": f"{split}_000001.jpg", "width": 40, "height": 24},
        {"id": 2, "file_name": f"{split}_000002.jpg", "width": 32, "height": 32},
        {"id": 3, "file_name": f"{split}_000003.jpg", "width": 48, "height": 30},
    ]
    crowd = np.zeros((30, 48), np.uint8)
    crowd[4:20, 25:45] = 1
    anns = [
        polygon_ann(1, 1, 1, [2, 2, 8, 2, 8, 12, 20, 12, 20, 18, 2, 18]),  # an L-shape, top-left
        polygon_ann(2, 1, 3, [25, 5, 38, 5, 38, 20, 25, 20]),
        polygon_ann(3, 2, 18, [2, 2, 12, 2, 12, 12, 2, 12]),  # two dogs: one mask, their union
        polygon_ann(4, 2, 18, [18, 18, 30, 18, 30, 30, 18, 30]),
        polygon_ann(5, 2, 10, [20, 2, 28, 2, 28, 10]),
        crowd_ann(6, 3, 1, crowd),
        polygon_ann(7, 3, 17, [2, 20, 20, 20, 20, 28, 2, 28]),
    ]
    return images, anns


class CocoFactory:
    """``make_coco(...)`` writes one split of a COCO instances layout and returns its root.

    ``root`` defaults to ``tmp_path / "coco"``; call again with another ``split`` for a second
    split in the same root.  ``images``: dicts with ``id``, ``file_name``, ``width``, ``height``
    and optionally ``kind`` (see :func:`write_image`; default ``rgb``) and ``file_size``
    (``(width, height)`` of the file written, when it should differ from the JSON's) -- these
    two keys are not written to the JSON.  ``annotations`` / ``categories``: COCO dicts (use
    ``make_coco.polygon(...)`` and ``make_coco.crowd(...)``).  Left out, a default split is
    written: 3 images (40x24, 32x32, 48x30) with an L-shaped person polygon, a car, two dog
    instances, a traffic light triangle, a crowd-RLE person and a cat.
    """

    polygon = staticmethod(polygon_ann)
    crowd = staticmethod(crowd_ann)
    rle_counts = staticmethod(rle_counts)
    write_image = staticmethod(write_image)
    default_categories = DEFAULT_CATEGORIES
    LOCAL_KEYS = ("kind", "file_size")

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path

    def __call__(
        self,
        root: Path | None = None,
        *,
        split: str = "val",
        images: list[dict[str, Any]] | None = None,
        annotations: list[dict[str, Any]] | None = None,
        categories: list[dict[str, Any]] | None = None,
    ) -> Path:
        root = Path(root) if root is not None else self.tmp_path / "coco"
        d_images, d_anns = _default_split(split)
        images = d_images if images is None else images
        annotations = d_anns if annotations is None else annotations
        categories = DEFAULT_CATEGORIES if categories is None else categories
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        img_dir = root / f"{split}2017"
        img_dir.mkdir(parents=True, exist_ok=True)
        for k, im in enumerate(images):
            w, h = im.get("file_size", (im["width"], im["height"]))
            write_image(img_dir / im["file_name"], int(w), int(h), im.get("kind", "rgb"), seed=k)
        doc = {
            "info": {"description": "generated by tests/conftest.py"},
            "licenses": [],
            "images": [{key: v for key, v in im.items() if key not in self.LOCAL_KEYS} for im in images],
            "annotations": annotations,
            "categories": categories,
        }
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))
        return root


@pytest.fixture
def make_coco(tmp_path: Path) -> CocoFactory:
    return CocoFactory(tmp_path)


# ----------------------------------------------------------------------------------------------
# The real data, registered and preprocessed once per session
# ----------------------------------------------------------------------------------------------


@dataclass
class RealStoreInfo:
    store: Store
    timings: dict[str, float] = field(default_factory=dict)  # seconds: "glove_register", "preprocess:<name>"
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)  # preprocess summaries by dataset


@pytest.fixture(scope="session")
def real_store_info(tmp_path_factory: pytest.TempPathFactory) -> RealStoreInfo:
    """The real data in a fresh store: datasets ``coco-tiny`` and ``coco-panoptic``, embedding
    ``glove50`` (the 100k GloVe file), both datasets preprocessed.  Skips when the data is absent."""
    tiny, pan = SHARED_DATA / "coco_tiny", SHARED_DATA / "coco128_panoptic"
    for p in (tiny, pan, GLOVE_100K):
        if not p.exists():
            pytest.skip(f"real data {p} is absent")
    from lavise_cli.data.index import preprocess
    from lavise_cli.download import register_coco
    from lavise_cli.embeddings import register_embedding

    st = Store(tmp_path_factory.mktemp("real-home"))
    info = RealStoreInfo(st)
    register_coco(st, tiny, "coco-tiny")
    register_coco(st, pan, "coco-panoptic", panoptic=True)
    t0 = time.perf_counter()
    register_embedding(st, GLOVE_100K, name="glove50")
    info.timings["glove_register"] = time.perf_counter() - t0
    for name in ("coco-tiny", "coco-panoptic"):
        t0 = time.perf_counter()
        info.summaries[name] = preprocess(st, name, embedding="glove50")
        info.timings[f"preprocess:{name}"] = time.perf_counter() - t0
    return info


@pytest.fixture(scope="session")
def real_store(real_store_info: RealStoreInfo) -> Store:
    """A store holding the real data, registered and preprocessed once per session (read it only)."""
    return real_store_info.store


# ----------------------------------------------------------------------------------------------
# Bugs stay visible
# ----------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _lavise_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    """``LAVISE_DEBUG=1``: an unexpected exception in a command keeps its traceback in tests
    (the CLI's last-resort guard would turn it into one "internal error" line). Tests of that
    guard unset it for their call: ``cli(..., env={"LAVISE_DEBUG": None})``."""
    monkeypatch.setenv("LAVISE_DEBUG", "1")
