"""Concurrent identical commands, and commands killed at every stage.

Real ``lavise`` processes (``python -m lavise_cli``) run on a small generated COCO; a command is
killed (``kill -9``) once its stage has visibly started (its partial/temporary folder exists,
its worker processes are up, its download has begun), then run again: the rerun's result must
equal an uninterrupted run's, nothing temporary may be left anywhere under the home, and no
worker process may outlive the killed command.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from lavise_cli.store import Store, writer_tag

from conftest import SMALL_GLOVE_WORDS, Cli, FixtureServer, write_glove

TRAIN = ("train", "resnet18", "gen", "--weights", "none", "--input-size", "64", "--epochs", "3", "--workers", "0")
EXPLAIN = ("explain", "--filters", "0-7", "--images", "5")
REPORT = ("report", "--filters", "0-3", "--images", "4", "--thumb", "48", "--no-evaluate")


# ----------------------------------------------------------------------------------------------
# Real processes
# ----------------------------------------------------------------------------------------------
def lavise(home: Path, *args: str, log: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``lavise --home HOME ARGS`` as a real process (stdout/stderr to ``log``.out/.err)."""
    log = log or home.parent / f"log-{time.monotonic_ns()}"
    with open(f"{log}.out", "wb") as out, open(f"{log}.err", "wb") as err:
        p = subprocess.Popen([sys.executable, "-m", "lavise_cli", "--home", str(home), *args],
                             stdout=out, stderr=err, env=os.environ.copy())
    p.log = log  # type: ignore[attr-defined]
    return p


def finish(p: subprocess.Popen[bytes], timeout: float = 240) -> tuple[int, str, str]:
    rc = p.wait(timeout)
    return rc, Path(f"{p.log}.out").read_text(), Path(f"{p.log}.err").read_text()  # type: ignore[attr-defined]


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def descendants(pid: int) -> set[int]:
    """Every living process below ``pid`` (from /proc)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit() and (st := _stat(int(d))) is not None and st[0] not in ("Z", "X"):
            parent[int(d)] = int(st[1])
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {c for c, pp in parent.items() if pp in frontier} - out
        out |= frontier
    return out


def wait_for(cond: Callable[[], Any], p: subprocess.Popen[bytes], what: str, timeout: float = 120) -> Any:
    """Poll ``cond`` until it is true; fails when ``p`` ends first (the stage was never seen)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = cond()
        if got:
            return got
        if p.poll() is not None:
            pytest.fail(f"the command ended (rc {p.returncode}) before {what}: {Path(f'{p.log}.err').read_text()}")  # type: ignore[attr-defined]
        time.sleep(0.005)
    p.kill()
    pytest.fail(f"timed out waiting for {what}")


def kill9(p: subprocess.Popen[bytes]) -> None:
    """``kill -9`` the command, then check that none of its worker processes outlives it."""
    kids = descendants(p.pid)
    p.kill()
    p.wait(30)
    t0 = time.monotonic()
    while [k for k in kids if alive(k)] and time.monotonic() - t0 < 20:
        time.sleep(0.05)
    orphans = [k for k in kids if alive(k)]
    for k in orphans:
        os.kill(k, signal.SIGKILL)
    assert not orphans, f"worker processes {orphans} outlived the killed command"


LEFTOVER = re.compile(r"^\.(tmp|old|partial|extract)-|\.(tmp|old)@|\.tmp$|\.part$")


def leftovers(home: Path) -> list[str]:
    """Temporaries anywhere under ``home`` (lock files in ``.locks`` are not temporaries)."""
    found = []
    for d, dirs, files in os.walk(home):
        dirs[:] = [x for x in dirs if x != ".locks"]
        found += [os.path.join(d, x) for x in dirs + files if LEFTOVER.search(x)]
    return found


def glob1(pattern: str, root: Path) -> Callable[[], list[Path]]:
    return lambda: list(root.glob(pattern))


# ----------------------------------------------------------------------------------------------
# Data: a generated COCO big enough for preprocess to use its worker pool (>= 64 images a split)
# ----------------------------------------------------------------------------------------------
N_IMAGES = 72


def gen_coco(make_coco: Any) -> Path:
    cats = [1, 3, 10, 17, 18]
    root = None
    for split in ("train", "val"):
        images, anns = [], []
        for i in range(N_IMAGES):
            w, h = 32 + (i % 3) * 8, 32 + (i % 2) * 8
            images.append({"id": i + 1, "file_name": f"{split}_{i + 1:06d}.jpg", "width": w, "height": h})
            x = 2 + i % 9
            anns.append(make_coco.polygon(2 * i + 1, i + 1, cats[i % 5], [x, 2, x + 14, 2, x + 14, 16, x, 16]))
            anns.append(make_coco.polygon(2 * i + 2, i + 1, cats[(i * 3 + 1) % 5], [4, 18, 28, 18, 28, 30, 4, 30]))
        root = make_coco(root, split=split, images=images, annotations=anns)
    assert root is not None
    return root


def prepared_home(home: Path, coco: Path, glove: Path, preprocessed: bool = True) -> Path:
    """``home`` with dataset ``gen`` registered (and preprocessed) against embedding ``small`` (in-process)."""
    from lavise_cli.data.index import preprocess
    from lavise_cli.download import register_coco
    from lavise_cli.embeddings import register_embedding

    st = Store(home)
    register_coco(st, coco, "gen")
    register_embedding(st, glove, name="small")
    if preprocessed:
        preprocess(st, "gen", embedding="small", workers=1)
    return home


def explainer_tensors(home: Path) -> dict[str, Any]:
    (entry,) = Store(home).list("explainers")
    return load_file(str(next(entry.path.glob("*.safetensors"))))


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# Two identical commands at once
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_identical_trains_at_once_on_a_cold_cache(tmp_path: Path, make_coco: Any, small_glove: Path) -> None:
    home = prepared_home(tmp_path / "home", gen_coco(make_coco), small_glove)
    # a feature pass long enough (72 images at 160 px) for the two runs to meet in it
    args = [*TRAIN, "--input-size", "160"]
    procs = [lavise(home, *args, "--json", log=tmp_path / f"run{i}") for i in range(2)]
    results = [finish(p) for p in procs]
    for rc, _out, err in results:
        assert rc == 0, err
    docs = [json.loads(out) for _rc, out, _err in results]
    # the second waited for the first's feature pass and reused it (without the lock both ran it)
    assert sorted(d["feature_cache"] for d in docs) == ["hit", "miss"]
    assert docs[0]["losses"] == docs[1]["losses"] and docs[0]["path"] == docs[1]["path"]
    assert leftovers(home) == []


# ----------------------------------------------------------------------------------------------
# kill -9 at every stage, then run again
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_at_every_stage_then_rerun_equals_an_uninterrupted_run(
    tmp_path: Path, make_coco: Any, http_server: FixtureServer
) -> None:
    from lavise_cli.data.index import load_index
    from lavise_cli.embeddings import load_embedding

    coco = gen_coco(make_coco)
    # word vectors bigger than a download chunk (1 MB), so that a part of them reaches the disk
    glove = write_glove(tmp_path / "glove.txt", [*SMALL_GLOVE_WORDS, *(f"filler{i}" for i in range(12_000))])
    ref = Cli(prepared_home(tmp_path / "ref", coco, glove))  # uninterrupted, in-process
    home = tmp_path / "home"
    again = Cli(home)  # the reruns, in-process too: only the killed commands need their own process
    logs = tmp_path / "logs"
    logs.mkdir()

    # download: killed while the word vectors arrive; the rerun resumes from the .part file
    http_server.chunk_delay = 0.05  # 64 KB every 50 ms
    url = http_server.serve("small.txt", glove.read_bytes())
    p = lavise(home, "download", "glove", url, "--name", "small", log=logs / "dl")
    wait_for(lambda: any(f.stat().st_size > 0 for f in (home / "downloads").rglob("*.part")), p, "the download")
    kill9(p)
    http_server.chunk_delay = 0.0
    again.json("download", "glove", url, "--name", "small")
    ranges = [r["headers"]["Range"] for r in http_server.requests if "Range" in r["headers"]]
    assert ranges and not ranges[0].startswith("bytes=0-")  # resumed, not restarted
    assert (load_embedding(Store(home), "small").vectors == load_embedding(Store(ref.home), "small").vectors).all()

    # preprocess: killed while its worker pool checks the images; the workers die with it
    again.json("download", "coco", "--from", str(coco), "--name", "gen")
    p = lavise(home, "preprocess", "gen", "--embedding", "small", "--workers", "2", log=logs / "pre")
    wait_for(lambda: len(descendants(p.pid)) >= 2, p, "the worker pool")
    kill9(p)
    again.json("preprocess", "gen", "--embedding", "small")
    a, b = load_index(Store(home), "gen"), load_index(Store(ref.home), "gen")
    assert a.concepts == b.concepts
    for s in ("train", "val"):
        assert a.splits[s].pair_concept.tolist() == b.splits[s].pair_concept.tolist()
        assert a.splits[s].offsets.tolist() == b.splits[s].offsets.tolist()

    # train: killed in its feature pass, then (run again) in its training
    reference = ref.json(*TRAIN)
    p = lavise(home, *TRAIN, log=logs / "feat")
    wait_for(glob1("cache/features/.partial-*", home), p, "the feature pass")
    kill9(p)
    p = lavise(home, *TRAIN, log=logs / "train")
    wait_for(glob1("explainers/.partial-*", home), p, "the training")
    kill9(p)
    doc = again.json(*TRAIN)
    assert doc["losses"] == reference["losses"]
    ta, tb = explainer_tensors(home), explainer_tensors(ref.home)
    assert ta.keys() == tb.keys() and all((ta[k] == tb[k]).all() for k in ta)

    # explain: killed in its target pass (its piece started: it resumes from its state)
    reference = ref.json(*EXPLAIN)
    p = lavise(home, *EXPLAIN, log=logs / "explain")
    wait_for(glob1("cache/targets/.partial-*/state-p*.json", home), p, "the target pass")
    kill9(p)
    assert not list((home / "cache" / "targets").glob("[!.]*")), "the killed target pass published"
    assert again.json(*EXPLAIN)["filters"] == reference["filters"]

    # report: killed while it renders the thumbnails
    reference = ref.json(*REPORT)
    p = lavise(home, *REPORT, log=logs / "report")
    wait_for(glob1("explainers/*/results/.*_files.tmp@*", home), p, "the report's thumbnails")
    kill9(p)
    doc = again.json(*REPORT)
    assert Path(doc["report"]).is_file()
    files = Path(doc["thumbnails"])
    assert files.is_dir() and any(files.iterdir())
    assert tree_digest(files) == tree_digest(Path(reference["thumbnails"]))

    again.json("store")  # any command sweeps what the killed ones left
    assert leftovers(home) == []


@pytest.mark.slow
def test_sigterm_is_handled_like_ctrl_c(tmp_path: Path, make_coco: Any, small_glove: Path) -> None:
    home = prepared_home(tmp_path / "home", make_coco(split="train"), small_glove)
    endless = [*TRAIN, "--epochs", "1000000", "--patience", "1000000"]  # trains until it is stopped
    p = lavise(home, *endless, log=tmp_path / "train")
    wait_for(glob1("explainers/.partial-*/run.json", home), p, "the training")
    time.sleep(1.0)  # some epochs (a few ms each) done
    p.send_signal(signal.SIGTERM)
    rc, _out, err = finish(p, 60)
    assert rc == 143, err
    assert "Traceback" not in err and "interrupted" in err
    # no temporaries: only the checkpoint that `--resume` continues from
    (left,) = leftovers(home)
    assert Path(left).parent.name == "explainers" and (Path(left) / "checkpoint.pt").is_file()
    Cli(home).json(*TRAIN)  # run again (in-process): it sweeps the checkpoint when it is done
    assert leftovers(home) == []


_SIGTERM_POOL = """
import os, sys, time
from lavise_cli.cli.common import Terminated, handle_sigterm
from lavise_cli.data.pool import pool_map

if __name__ == "__main__":
    handle_sigterm()
    try:
        pool_map(time.sleep, [(0.5,)] * 400, 2, None, "sleeping")  # 100 s of work
    except Terminated:
        print("terminated", flush=True)
        sys.exit(143)
"""


@pytest.mark.slow
def test_sigterm_ends_the_worker_pool_at_once(tmp_path: Path) -> None:
    script = tmp_path / "pool.py"
    script.write_text(_SIGTERM_POOL)
    with open(tmp_path / "out", "wb") as out:
        p = subprocess.Popen([sys.executable, str(script)], stdout=out, env=os.environ.copy())
    t0 = time.monotonic()
    while len(descendants(p.pid)) < 2 and time.monotonic() - t0 < 30:
        time.sleep(0.01)
    workers = descendants(p.pid)
    assert len(workers) >= 2
    p.send_signal(signal.SIGTERM)
    try:
        rc = p.wait(20)  # not after the 100 s of queued work
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("SIGTERM did not end the pool's work")
    assert rc == 143 and (tmp_path / "out").read_text() == "terminated\n"
    t0 = time.monotonic()
    while [w for w in workers if alive(w)] and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert not [w for w in workers if alive(w)]


# ----------------------------------------------------------------------------------------------
# The sweep itself (no processes to kill: temporaries named after a finished process)
# ----------------------------------------------------------------------------------------------
def _dead_tag() -> str:
    p = subprocess.run([sys.executable, "-c", "from lavise_cli.store import writer_tag; print(writer_tag())"],
                       capture_output=True, text=True, check=True, env=os.environ.copy())
    return p.stdout.strip()


def test_clean_temporaries_removes_dead_writers_debris_and_keeps_the_rest(store: Store) -> None:
    dead, live = _dead_tag(), writer_tag()
    ex = store.kind_dir("explainers")
    results = ex / "e1" / "results"
    results.mkdir(parents=True)
    (ex / "e1" / "manifest.json").write_text("{}")
    dl = store.root / "downloads" / "gen"
    dl.mkdir(parents=True)
    debris = [ex / f".tmp-e2{dead}", ex / f".old-e1{dead}", results / f".report-x_files.tmp{dead}",
              results / f".report-x_files.old{dead}", dl / f".extract-data{dead}",
              store.kind_dir("targets") / f".tmp-abc{dead}"]
    for d in debris:
        d.mkdir(parents=True)
        (d / "f.png").write_bytes(b"x")
    files = [results / f".report-x.html{dead}.tmp", store.cache / f".digests.json{dead}.tmp"]
    for f in files:
        f.write_bytes(b"x")
    kept = [ex / f".tmp-e3{live}", results / f".report-y_files.tmp{live}"]
    for d in kept:
        d.mkdir(parents=True)
    kept_files = [dl / "train2017.zip.part", results / f".page.html{live}.tmp"]
    for f in kept_files:
        f.write_bytes(b"x")

    # resumable partials: a feature pass with work to resume, a training checkpoint
    feats = store.kind_dir("features")
    resumable = feats / ".partial-aaa"
    (resumable / "k1").mkdir(parents=True)
    (resumable / "state.json").write_text(json.dumps({"next": 3, "shards": 1, "skipped": [], "keys": ["k1"]}))
    (resumable / "k1" / f".z-00001.safetensors{dead}.tmp").write_bytes(b"x")
    checkpoint = ex / ".partial-e4"
    checkpoint.mkdir()
    (checkpoint / "checkpoint.pt").write_bytes(b"x")
    (checkpoint / f".checkpoint.pt{dead}.tmp").write_bytes(b"x")
    # finished or empty partials are debris
    with store.writing("features", "k2"):
        pass
    finished = feats / ".partial-bbb"
    finished.mkdir()
    (finished / "state.json").write_text(json.dumps({"next": 3, "shards": 1, "skipped": [], "keys": ["k2"]}))
    empty = feats / ".partial-ccc"
    empty.mkdir()
    no_checkpoint = ex / ".partial-e5"
    no_checkpoint.mkdir()
    (no_checkpoint / "run.json").write_text("{}")
    # a partial whose writer holds its lock is left alone, whatever it holds
    busy = feats / ".partial-ddd"
    busy.mkdir()

    with store.lock("features", ".partial-ddd"):
        n = store.clean_temporaries()
    gone = debris + files + [finished, empty, no_checkpoint,
                             resumable / "k1" / f".z-00001.safetensors{dead}.tmp",
                             checkpoint / f".checkpoint.pt{dead}.tmp"]
    assert [p for p in gone if p.exists()] == []
    assert n == len(gone)
    for p in kept + kept_files + [resumable / "state.json", checkpoint / "checkpoint.pt", busy]:
        assert p.exists(), p
    assert store.exists("features", "k2")
    assert store.clean_temporaries() == 1  # the busy partial, now that nobody holds it


_POOL = """
import multiprocessing as mp, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from lavise_cli.procs import die_with_parent

if __name__ == "__main__":
    ctx = mp.get_context(sys.argv[1])
    ex = ProcessPoolExecutor(2, mp_context=ctx, initializer=die_with_parent, initargs=(os.getpid(),))
    futs = [ex.submit(time.sleep, 60) for _ in range(2)]
    time.sleep(1.0)
    print(*ex._processes, flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("context", ["fork", "forkserver"])
def test_pool_workers_die_with_their_parent(tmp_path: Path, context: str) -> None:
    # fork: the kernel's parent-death signal; forkserver (a worker's parent is the server): the watcher thread
    script = tmp_path / "pool.py"
    script.write_text(_POOL)
    p = subprocess.Popen([sys.executable, str(script), context], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    assert p.stdout is not None
    workers = [int(x) for x in p.stdout.readline().split()]
    assert len(workers) == 2 and all(alive(w) for w in workers)
    p.kill()
    p.wait(30)
    t0 = time.monotonic()
    while [w for w in workers if alive(w)] and time.monotonic() - t0 < 20:
        time.sleep(0.05)
    orphans = [w for w in workers if alive(w)]
    for w in orphans:
        os.kill(w, signal.SIGKILL)
    assert not orphans
