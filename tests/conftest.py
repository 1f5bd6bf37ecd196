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

Helpers (plain names, imported as ``from conftest import ...``; this folder is on ``sys.path`` for
every test below it): ``Cli``, ``assert_clear_error``, and the planted world of ``test_planted.py``
and ``analyses/test_compare.py`` (``FACTORY``, ``write_split``, ``RED``, ``WORDS``, ...).

The synthetic data itself (GloVe files, COCO layouts, images, model factories) is made by
:mod:`lavise_cli.testing`, which the benchmarks use too; its names are importable from here.
"""

from __future__ import annotations

import json
import re
import socket
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from lavise_cli.store import Store
# The synthetic data, shared with benchmarks/ (tests import SMALL_GLOVE_WORDS and write_glove from here).
from lavise_cli.testing import SMALL_GLOVE_WORDS, CocoFactory, write_glove

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
# A real HTTP server (downloads: tests/fetch/test_http.py, tests/fetch/test_download.py)
# ----------------------------------------------------------------------------------------------
class FixtureServer(ThreadingHTTPServer):
    """Serves ``files`` (path -> bytes) on an ephemeral 127.0.0.1 port and records each request.

    ``honour_ranges = False`` answers every request with the whole file (HTTP 200);
    ``cut_after[path] = n`` sends only ``n`` bytes of the body once, then drops the connection;
    ``chunk_delay = s`` (seconds) sends bodies in 64 KB pieces, ``s`` apart: a slow server, for a
    download to be killed midway (tests/cli/test_interrupt.py).
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _FixtureHandler)
        self.files: dict[str, bytes] = {}
        self.requests: list[dict[str, Any]] = []
        self.cut_after: dict[str, int] = {}  # path -> bytes sent before the connection is dropped (once)
        self.honour_ranges = True
        self.chunk_delay = 0.0

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
        if srv.chunk_delay > 0:
            step = 1 << 16
            try:
                for i in range(0, len(body), step):
                    self.wfile.write(body[i:i + step])
                    self.wfile.flush()
                    time.sleep(srv.chunk_delay)
            except (BrokenPipeError, ConnectionResetError):  # the client was killed midway
                pass
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


# ----------------------------------------------------------------------------------------------
# A tiny GloVe file (lavise_cli.testing.write_glove)
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def small_glove(tmp_path: Path) -> Path:
    """A GloVe-format file (no header) of ~45 common words with seeded random 16-d vectors."""
    return write_glove(tmp_path / "small_glove.16d.txt", SMALL_GLOVE_WORDS)


# ----------------------------------------------------------------------------------------------
# A small COCO instances layout (lavise_cli.testing.CocoFactory)
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# The planted world (test_planted.py, analyses/test_compare.py): a colour model whose filter RED
# fires on red pixels, and generated COCO splits of sky, grass and a red "apple"
# ----------------------------------------------------------------------------------------------

SIZE = 56  # input size; feat is 7x7 (AvgPool 8)
RED = 2  # the planted filter

FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn


    class ColourNet(nn.Module):
        # Channels: 0 green, 1 blue, 2 red, 4 yellow -- each capped at 1.0 (saturates on its colour) --
        # 3 brightness (everywhere) and 5 darkness (uncapped; dead on these images).  Inputs in [0, 1].
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 1)
            with torch.no_grad():
                self.conv.weight.copy_(torch.tensor([
                    [-4.0, 4.0, -4.0],
                    [-4.0, -4.0, 4.0],
                    [4.0, -4.0, -4.0],
                    [0.1, 0.1, 0.1],
                    [4.0, 4.0, -8.0],
                    [-1.0, -1.0, -1.0],
                ]).view(6, 3, 1, 1))
                self.conv.bias.copy_(torch.tensor([0.0, 0.8, -0.8, 0.0, -4.0, 1.0]))
            self.pool = nn.AvgPool2d(8)
            self.feat = nn.Identity()

        def forward(self, x):
            cap = torch.tensor([1.0, 1.0, 1.0, float("inf"), 1.0, float("inf")]).view(1, 6, 1, 1)
            y = torch.minimum(torch.relu(self.conv(x)), cap)
            return self.feat(self.pool(y)).mean((2, 3))


    def build():
        return ColourNet(), {"input_size": 56, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    """
)

CATEGORIES = [
    {"id": 1, "name": "apple", "supercategory": "food"},
    {"id": 2, "name": "banana", "supercategory": "food"},
    {"id": 3, "name": "grass", "supercategory": "plant"},
    {"id": 4, "name": "sky", "supercategory": "sky"},
]
SKY, GRASS = (70, 120, 230), (40, 170, 50)
APPLE, BANANA = (220, 30, 30), (240, 200, 30)
# Concepts, then distractors (all in the shipped visual-noun list): the default vocabulary.
WORDS = ("the of and apple banana grass sky sand wall road tree water car dog ball cup flower house "
         "window table chair bird horse box bottle").split()


def _poly(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    return [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]


def write_split(root: Path, split: str, n: int, seed: int) -> None:
    """Objects as polygons; sky and grass as exact masks (RLE) of their visible pixels."""
    import numpy as np
    from PIL import Image

    from lavise_cli.testing import rle_counts

    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []

    def add(image_id: int, cat: int, segmentation: Any, box: tuple[int, int, int, int], area: float) -> None:
        x0, y0, x1, y1 = box
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                     "segmentation": segmentation, "area": area, "bbox": [x0, y0, x1 - x0, y1 - y0]})

    for i in range(n):
        iid = i + 1
        split_y = int(rng.integers(12, 45))  # the horizon: sky above, grass below
        arr = np.zeros((SIZE, SIZE, 3), np.float64)
        arr[:split_y] = SKY
        arr[split_y:] = GRASS
        free = np.ones((SIZE, SIZE), bool)
        objects = []
        if rng.random() < 0.85:
            objects.append((1, APPLE, rng.integers(22, 29, 2)))
        if rng.random() < 0.4:
            objects.append((2, BANANA, rng.integers(12, 21, 2)))
        for cat, colour, (w, h) in objects:
            for _ in range(100):  # objects do not overlap
                x0, y0 = int(rng.integers(0, SIZE - w + 1)), int(rng.integers(0, SIZE - h + 1))
                if free[y0:y0 + h, x0:x0 + w].all():
                    break
            free[y0:y0 + h, x0:x0 + w] = False
            arr[y0:y0 + h, x0:x0 + w] = colour
            add(iid, cat, [_poly(x0, y0, x0 + int(w), y0 + int(h))], (x0, y0, x0 + int(w), y0 + int(h)), float(w * h))
        for cat, rows in ((4, slice(0, split_y)), (3, slice(split_y, SIZE))):
            m = np.zeros((SIZE, SIZE), bool)
            m[rows] = True
            m &= free
            if m.any():
                ys, xs = np.nonzero(m)
                add(iid, cat, {"counts": rle_counts(m), "size": [SIZE, SIZE]},
                    (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1), float(m.sum()))
        arr += rng.normal(0, 6, arr.shape)  # texture, so that no two images are alike
        fn = f"{split}_{i:05d}.png"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / f"{split}2017" / fn)
        images.append({"id": iid, "file_name": fn, "width": SIZE, "height": SIZE})
    doc = {"images": images, "annotations": anns, "categories": CATEGORIES}
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))
