"""The artifact store (src/lavise_cli/store.py) and `lavise store`.

Atomic writes, the lock between processes, manifests and staleness, listing and removal, the
store root (``--home`` / ``LAVISE_HOME``), and input digests.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

import pytest

from lavise_cli.download import register_coco
from lavise_cli.embeddings import register_embedding
from lavise_cli.errors import LaviseError
from lavise_cli.store import KINDS, MANIFEST, FileDigests, Store, sha256_file

SPAWN = mp.get_context("spawn")


# The workers below run in spawned processes that import this module: keep its imports light
# (lavise_cli.data.index pulls in torch), so the heavy ones are made where they are needed.
def preprocess(*args: Any, **kw: Any) -> dict[str, Any]:
    from lavise_cli.data.index import preprocess as _preprocess

    return _preprocess(*args, **kw)


def load_index(*args: Any, **kw: Any) -> Any:
    from lavise_cli.data.index import load_index as _load_index

    return _load_index(*args, **kw)


def _leftovers(store: Store) -> list[str]:
    """Temporary or trash directories (``.tmp-*``, ``.old-*``) anywhere in the store."""
    found = []
    for k in KINDS:
        d = store.kind_dir(k)
        if d.is_dir():
            found += [c.name for c in d.iterdir() if c.name.startswith((".tmp-", ".old-"))]
    return found


def _write(store: Store, name: str, payload: str, kind: str = "results", **kw: Any) -> None:
    with store.writing(kind, name, **kw) as tmp:
        (tmp / "data.txt").write_text(payload)


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------


def test_writing_publishes_entry_with_manifest(store: Store) -> None:
    with store.writing("results", "r1", inputs={"a": "1"}, settings={"k": 2}, extra={"note": "x"}) as tmp:
        (tmp / "data.bin").write_bytes(b"\0" * 1234)
    e = store.get("results", "r1")
    assert e.path == store.root / "results" / "r1"
    assert (e.path / "data.bin").read_bytes() == b"\0" * 1234
    m = json.loads((e.path / MANIFEST).read_text())
    assert m["kind"] == "results" and m["name"] == "r1"
    assert m["inputs"] == {"a": "1"} and m["settings"] == {"k": 2} and m["note"] == "x"
    assert m["size"] == 1234 and e.size == 1234
    assert m["created"] and "lavise_version" in m
    assert _leftovers(store) == []


def test_exception_inside_writing_leaves_no_entry(store: Store) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with store.writing("results", "r1") as tmp:
            (tmp / "data.txt").write_text("partial")
            raise RuntimeError("boom")
    assert not store.exists("results", "r1")
    assert not store.path("results", "r1").exists()
    assert store.list() == []
    assert _leftovers(store) == []


def test_exception_inside_writing_keeps_older_complete_entry(store: Store) -> None:
    _write(store, "r1", "old", inputs={"v": 1})
    before = store.get("results", "r1")
    with pytest.raises(KeyboardInterrupt):
        with store.writing("results", "r1", inputs={"v": 2}) as tmp:
            (tmp / "data.txt").write_text("new, half written")
            (tmp / "more.txt").write_text("x")
            raise KeyboardInterrupt
    after = store.get("results", "r1")
    assert after.manifest == before.manifest
    assert (after.path / "data.txt").read_text() == "old"
    assert not (after.path / "more.txt").exists()
    assert store.is_current("results", "r1", {"v": 1})
    assert _leftovers(store) == []


def test_rewrite_replaces_the_whole_entry(store: Store) -> None:
    with store.writing("results", "r1") as tmp:
        (tmp / "a.txt").write_text("a")
        (tmp / "b.txt").write_text("b")
    with store.writing("results", "r1") as tmp:
        (tmp / "a.txt").write_text("A")
    p = store.path("results", "r1")
    assert sorted(x.name for x in p.iterdir()) == ["a.txt", MANIFEST]
    assert (p / "a.txt").read_text() == "A"
    assert _leftovers(store) == []


def test_entry_exists_only_once_manifest_is_written(store: Store) -> None:
    with store.writing("results", "r1") as tmp:
        (tmp / "data.txt").write_text("x")
        assert not store.exists("results", "r1")
        assert store.manifest("results", "r1") is None
        assert store.list("results") == []
        with pytest.raises(LaviseError):
            store.get("results", "r1")
    assert store.exists("results", "r1")

    # A folder at the entry's place without a manifest, or with a half-written one, is no entry.
    bare = store.path("results", "bare")
    bare.mkdir(parents=True)
    (bare / "data.txt").write_text("x")
    half = store.path("results", "half")
    half.mkdir(parents=True)
    (half / MANIFEST).write_text('{"kind": "results", "name": "ha')
    assert not store.exists("results", "bare") and not store.exists("results", "half")
    assert [e.name for e in store.list()] == ["r1"]


def _crash_while_writing(root: str, name: str) -> None:
    """In a child process: start writing an entry, then die without any clean-up."""
    st = Store(root)
    with st.writing("results", name) as tmp:
        (tmp / "data.txt").write_text("half written")
        os._exit(17)


def test_killed_writer_leaves_nothing_that_looks_complete(store: Store) -> None:
    _write(store, "r1", "old")
    old_manifest = store.manifest("results", "r1")
    p = SPAWN.Process(target=_crash_while_writing, args=(str(store.root), "r1"))
    p.start()
    p.join(60)
    assert p.exitcode == 17
    # The temporary folder is left behind, but the complete older entry is what readers see.
    assert any(x.startswith(".tmp-r1") for x in _leftovers(store))
    assert store.manifest("results", "r1") == old_manifest
    assert (store.path("results", "r1") / "data.txt").read_text() == "old"
    assert [e.name for e in store.list()] == ["r1"]

    p = SPAWN.Process(target=_crash_while_writing, args=(str(store.root), "fresh"))
    p.start()
    p.join(60)
    assert p.exitcode == 17
    assert not store.exists("results", "fresh")
    assert store.clean_temporaries() == 2
    assert _leftovers(store) == []
    assert store.manifest("results", "r1") == old_manifest
    assert store.clean_temporaries() == 0


def _locked_writer(root: str, name: str, log: str, barrier: Any, hold: float) -> None:
    st = Store(root)
    barrier.wait(30)
    with st.writing("results", name) as tmp:
        start = time.time()
        (tmp / "pid.txt").write_text(str(os.getpid()))
        time.sleep(hold)
        end = time.time()
    with open(log, "a") as fh:
        fh.write(f"{os.getpid()} {start!r} {end!r}\n")


def test_two_processes_writing_the_same_entry_are_serialised(store: Store, tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    barrier = SPAWN.Barrier(2)
    procs = [SPAWN.Process(target=_locked_writer, args=(str(store.root), "shared", str(log), barrier, 0.5))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    rows = [ln.split() for ln in log.read_text().splitlines()]
    assert len(rows) == 2 and rows[0][0] != rows[1][0]
    (_, s1, e1), (_, s2, e2) = sorted((int(a), float(b), float(c)) for a, b, c in rows)
    first, second = sorted([(s1, e1), (s2, e2)])
    assert first[1] <= second[0], f"the two writes overlapped: {first} and {second}"
    # The entry holds the complete output of one of them.
    pid = int((store.path("results", "shared") / "pid.txt").read_text())
    assert pid in {int(r[0]) for r in rows}
    assert _leftovers(store) == []


# ----------------------------------------------------------------------------------------------
# Manifests, staleness, listing
# ----------------------------------------------------------------------------------------------


def test_is_current_compares_inputs(store: Store) -> None:
    inputs = {"train.annotations": "ab" * 32, "embedding": {"name": "g", "source": "cd" * 32}, "seed": 0}
    assert not store.is_current("indexes", "x", inputs)  # no entry yet
    with store.writing("indexes", "x", inputs=inputs):
        pass
    assert store.is_current("indexes", "x", json.loads(json.dumps(inputs)))
    assert store.is_current("indexes", "x", dict(reversed(list(inputs.items()))))
    assert not store.is_current("indexes", "x", {**inputs, "train.annotations": "ef" * 32})
    assert not store.is_current("indexes", "x", {**inputs, "seed": 1})
    assert not store.is_current("indexes", "x", {k: v for k, v in inputs.items() if k != "seed"})


def test_latest_list_remove(store: Store) -> None:
    assert store.latest("results") is None and store.list() == []
    _write(store, "b", "1")
    _write(store, "a", "2")
    _write(store, "c", "3", kind="explainers")
    _write(store, "k", "4", kind="features")
    assert store.latest("results").name == "a"
    _write(store, "b", "5")  # rewritten: now the most recent
    assert store.latest("results").name == "b"
    assert [(e.kind, e.name) for e in store.list("results")] == [("results", "a"), ("results", "b")]
    assert {(e.kind, e.name) for e in store.list()} == {
        ("results", "a"), ("results", "b"), ("explainers", "c"), ("features", "k")}
    # Caches live under the cache root (root/cache when the root is given).
    assert store.path("features", "k").parent.parent == store.cache == store.root / "cache"

    store.remove("results", "b")
    assert not store.exists("results", "b") and not store.path("results", "b").exists()
    assert store.latest("results").name == "a"
    store.remove("features", "k")
    assert sorted(e.name for e in store.list()) == ["a", "c"]
    assert _leftovers(store) == []
    with pytest.raises(LaviseError, match="no result named 'b'"):
        store.remove("results", "b")
    with pytest.raises(LaviseError, match="unknown store kind"):
        store.list("nonsense")
    for bad in ("", "../x", ".hidden", "a/b"):
        with pytest.raises(LaviseError, match="invalid entry name"):
            store.path("results", bad)


def test_update_manifest_merges_fields(store: Store) -> None:
    _write(store, "r1", "x", inputs={"a": 1})
    (store.path("results", "r1") / "extra.bin").write_bytes(b"1" * 100)
    store.update_manifest("results", "r1", score=0.5)
    m = store.manifest("results", "r1")
    assert m["score"] == 0.5 and m["inputs"] == {"a": 1}
    assert m["size"] >= 101
    with pytest.raises(LaviseError):
        store.update_manifest("results", "missing", score=1)


def test_lavise_home_env_and_explicit_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAVISE_HOME", str(tmp_path / "from-env"))
    assert Store().root == (tmp_path / "from-env").resolve()
    assert Store().cache == (tmp_path / "from-env").resolve() / "cache"
    assert Store(tmp_path / "explicit").root == (tmp_path / "explicit").resolve()
    monkeypatch.delenv("LAVISE_HOME")
    default = Store()
    assert default.root.name == "lavise" and default.root != (tmp_path / "from-env").resolve()


def test_file_digests_recompute_after_a_change(store: Store, tmp_path: Path) -> None:
    f = tmp_path / "ann.json"
    f.write_text('{"images": []}')
    digests = FileDigests(store)
    d1 = digests(f)
    assert d1 == sha256_file(f)
    assert FileDigests(store)(f) == d1  # remembered across instances
    assert d1 in json.loads((store.cache / "digests.json").read_text()).values()

    f.write_text('{"images": [1]}')  # new size and mtime
    d2 = digests(f)
    assert d2 == sha256_file(f) != d1

    st = f.stat()
    f.write_text('{"images": [2]}')  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert digests(f) == sha256_file(f) != d2

    # The memory is keyed by (path, size, mtime): a same-size rewrite with the mtime put back is
    # not noticed (documented behaviour, this is what makes large files hash only once).
    st = f.stat()
    before = digests(f)
    f.write_text('{"images": [3]}')
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert digests(f) == before


# ----------------------------------------------------------------------------------------------
# Stale entries are rebuilt
# ----------------------------------------------------------------------------------------------


def _add_annotation(root: Path, split: str = "val") -> None:
    p = root / "annotations" / f"instances_{split}2017.json"
    d = json.loads(p.read_text())
    d["annotations"].append({"id": 99, "image_id": 3, "category_id": 18, "iscrowd": 0, "area": 1.0,
                             "bbox": [30, 2, 10, 10], "segmentation": [[30, 2, 40, 2, 40, 12, 30, 12]]})
    p.write_text(json.dumps(d))


def test_preprocess_rebuilds_after_reregistering_changed_annotations(
    store: Store, make_coco: Any, small_glove: Path
) -> None:
    root = make_coco()
    register_coco(store, root, "tiny")
    register_embedding(store, small_glove, name="small")
    s1 = preprocess(store, "tiny", workers=1)
    assert not s1["cached"] and s1["splits"]["val"]["pairs"] == 6
    created = store.get("indexes", "tiny").created
    s2 = preprocess(store, "tiny", workers=1)
    assert s2["cached"] and s2["splits"] == s1["splits"]
    assert store.get("indexes", "tiny").created == created

    _add_annotation(root)  # a dog in image 3: one more (image, concept) pair
    register_coco(store, root, "tiny")
    with pytest.raises(LaviseError, match="stale"):
        load_index(store, "tiny")  # never silently reused
    s3 = preprocess(store, "tiny", workers=1)
    assert not s3["cached"] and s3["splits"]["val"]["pairs"] == 7
    assert store.get("indexes", "tiny").created != created
    assert load_index(store, "tiny").splits["val"].pair_image.shape == (7,)


def test_preprocess_rebuilds_after_embedding_changed(store: Store, make_coco: Any, small_glove: Path,
                                                    tmp_path: Path) -> None:
    register_coco(store, make_coco(), "tiny")
    register_embedding(store, small_glove, name="small")
    s1 = preprocess(store, "tiny", workers=1)
    assert s1["unmapped"] == []
    # The same embedding name, now from a file without "dog": the index is rebuilt.
    words = [ln for ln in small_glove.read_text().splitlines() if not ln.startswith("dog ")]
    other = tmp_path / "other.txt"
    other.write_text("\n".join(words) + "\n")
    register_embedding(store, other, name="small")
    s2 = preprocess(store, "tiny", workers=1)
    assert not s2["cached"] and s2["unmapped"] == ["dog"]


def test_preprocess_notices_annotations_changed_in_place(store: Store, make_coco: Any, small_glove: Path) -> None:
    root = make_coco()
    register_coco(store, root, "tiny")
    register_embedding(store, small_glove, name="small")
    assert preprocess(store, "tiny", workers=1)["splits"]["val"]["pairs"] == 6
    _add_annotation(root)  # edited in place, not registered again
    s = preprocess(store, "tiny", workers=1)
    assert not s["cached"] and s["splits"]["val"]["pairs"] == 7


# ----------------------------------------------------------------------------------------------
# `lavise store`
# ----------------------------------------------------------------------------------------------


def test_cli_store_lists_entries_with_sizes(cli: Any, store: Store, make_coco: Any, small_glove: Path) -> None:
    empty = cli.json("store")
    assert empty["entries"] == [] and Path(empty["root"]) == store.root
    register_coco(store, make_coco(), "tiny")
    register_embedding(store, small_glove, name="small")
    with store.writing("features", "abc123") as tmp:
        (tmp / "z.bin").write_bytes(b"\1" * 4096)

    doc = cli.json("store")
    assert Path(doc["root"]) == store.root and Path(doc["cache"]) == store.cache
    got = {(e["kind"], e["name"]): e for e in doc["entries"]}
    assert set(got) == {("datasets", "tiny"), ("embeddings", "small"), ("features", "abc123")}
    assert got[("features", "abc123")]["size"] == 4096
    assert got[("embeddings", "small")]["size"] > 0
    for e in doc["entries"]:
        assert e["size"] == store.get(e["kind"], e["name"]).size and e["created"]
        assert Path(e["path"]) == store.path(e["kind"], e["name"])

    only = cli.json("store", "--kind", "features")
    assert [e["name"] for e in only["entries"]] == ["abc123"]

    table = cli("store")
    assert table.exit_code == 0, table.output
    for word in ("datasets", "tiny", "embeddings", "small", "features", "abc123", "4.0 KiB"):
        assert word in table.stdout


def test_sizes_count_what_is_on_disk_now(cli: Any, store: Store) -> None:
    """An explainer's results/ (explanations, heatmaps, reports) is written after its manifest: it counts."""
    with store.writing("explainers", "ex") as tmp:
        (tmp / "explainer.safetensors").write_bytes(b"\0" * 1000)
    assert store.get("explainers", "ex").size == 1000
    results = store.path("explainers", "ex") / "results"
    (results / "heatmaps").mkdir(parents=True)
    (results / "heatmaps" / "filter-0001.png").write_bytes(b"\0" * 50_000)
    (results / "report.html").write_bytes(b"\0" * 7_000)
    assert store.get("explainers", "ex").size == 58_000
    (entry,) = cli.json("store")["entries"]
    assert entry["size"] == 58_000
    table = cli("store")
    assert "56.6 KiB" in table.stdout, table.stdout


def _cache(store: Store, kind: str, name: str, inputs: dict[str, Any], settings: dict[str, Any],
           size: int = 100) -> None:
    with store.writing(kind, name, inputs=inputs, settings=settings) as tmp:
        (tmp / "z.bin").write_bytes(b"\1" * size)


MODEL_A = {"model": "resnet18", "weights": "none", "weights_digest": "aa"}
MODEL_B = {"model": "resnet50", "weights": "none", "weights_digest": "bb"}


def _gc_store(store: Store) -> dict[str, str]:
    """Two indexes, one explainer (resnet18 layer4 on index one), and caches that are or are not referred to."""
    from lavise_cli.cleanup import index_digest

    _write(store, "one", "x", kind="indexes", inputs={"dataset": "one"})
    _write(store, "two", "x", kind="indexes", inputs={"dataset": "two"})
    d1 = index_digest(store.get("indexes", "one").manifest)
    d2 = index_digest(store.get("indexes", "two").manifest)
    _write(store, "ex", "x", kind="explainers", inputs={"model": MODEL_A, "layer": "layer4", "datasets": [d1]},
           settings={"model": "resnet18", "layer": "layer4", "datasets": ["one"]})
    feat = lambda model, layer, index, ds: ({"model": model, "layer": layer, "index": index, "split": "train"},  # noqa: E731
                                            {"model": model["model"], "layer": layer, "dataset": ds, "split": "train"})
    _cache(store, "features", "f-used", *feat(MODEL_A, "layer4", d1, "one"))
    _cache(store, "features", "f-other-index", *feat(MODEL_A, "layer4", d2, "two"), size=300)  # no explainer
    _cache(store, "features", "f-stale-index", *feat(MODEL_A, "layer4", "gone:2020", "one"), size=500)
    _cache(store, "features", "f-other-layer", *feat(MODEL_A, "layer3", d1, "one"), size=700)
    tgt = lambda model, layer, ds: ({"model": model, "layer": layer, "target": {"datasets": ds, "split": "val"}},  # noqa: E731
                                    {"layer": layer, "target": "one/val"})
    _cache(store, "targets", "t-used", *tgt(MODEL_A, "layer4", [d1]))
    _cache(store, "targets", "t-folder", *tgt(MODEL_A, "layer4", None))  # an --image-dir target: kept
    _cache(store, "targets", "t-other-model", *tgt(MODEL_B, "layer4", [d1]), size=1100)
    _cache(store, "targets", "t-stale-index", *tgt(MODEL_A, "layer4", ["gone:2020"]), size=1300)
    return {"d1": d1, "d2": d2}


def test_cli_store_gc_keeps_a_young_cache_that_a_running_train_may_still_need(cli: Any, store: Store) -> None:
    _gc_store(store)
    young = {r["name"] for r in cli.json("store", "gc", "--dry-run")["removed"]}
    assert young == {"f-stale-index", "t-stale-index"}  # only what a rebuilt index made useless


def test_cli_store_gc_removes_only_unreferenced_caches(cli: Any, store: Store, monkeypatch: Any) -> None:
    monkeypatch.setattr("lavise_cli.cleanup.GRACE_SECONDS", 0.0)
    _gc_store(store)
    doomed = {"f-other-index", "f-stale-index", "f-other-layer", "t-other-model", "t-stale-index"}
    kept = {"f-used", "t-used", "t-folder"}
    dry = cli.json("store", "gc", "--dry-run")
    assert dry["dry_run"] and {r["name"] for r in dry["removed"]} == doomed
    assert all(store.exists(r["kind"], r["name"]) for r in dry["removed"])  # a dry run removes nothing
    on_disk = sum(sum(f.stat().st_size for f in store.path(r["kind"], r["name"]).rglob("*") if f.is_file())
                  for r in dry["removed"])
    assert dry["freed"] == on_disk and on_disk > 300 + 500 + 700 + 1100 + 1300
    reasons = {r["name"]: r["reason"] for r in dry["removed"]}
    assert "rebuilt or removed" in reasons["f-stale-index"] and "no explainer" in reasons["f-other-layer"]
    assert "rebuilt or removed" in reasons["t-stale-index"] and "no explainer" in reasons["t-other-model"]

    r = cli("store", "gc")
    assert r.exit_code == 0, r.output
    assert "5 unreferenced cache(s)" in r.stderr and "freed" in r.stderr, r.stderr
    left = {e.name for e in store.list("features") + store.list("targets")}
    assert left == kept
    again = cli("store", "gc")
    assert again.exit_code == 0 and "nothing to remove" in again.stderr
    # Removing the explainer leaves its caches unreferenced (the --image-dir target too).
    cli("store", "rm", "explainers", "ex")
    assert {r["name"] for r in cli.json("store", "gc")["removed"]} == kept


def test_cli_store_describes_caches(cli: Any, store: Store) -> None:
    _gc_store(store)
    doc = cli.json("store")
    by_name = {e["name"]: e for e in doc["entries"]}
    assert by_name["f-used"]["model"] == "resnet18" and by_name["f-used"]["layer"] == "layer4"
    assert by_name["f-used"]["dataset"] == "one/train"
    assert by_name["t-used"]["dataset"] == "one/val" and by_name["t-used"]["model"] == "resnet18"
    assert by_name["t-other-model"]["model"] == "resnet50"
    assert "model" not in by_name["one"]  # an index: nothing to add
    table = cli("store", env={"COLUMNS": "80"})
    flat = " ".join(table.stdout.split())
    assert "resnet18 · layer4 · one/train" in flat and "resnet50 · layer4 · one/val" in flat, table.stdout


def test_index_digest_is_what_caches_and_explainers_record(store: Store, make_coco: Any, small_glove: Path) -> None:
    from lavise_cli.cleanup import index_digest

    register_coco(store, make_coco(), "tiny")
    register_embedding(store, small_glove, name="small")
    preprocess(store, "tiny", workers=1)
    assert index_digest(store.get("indexes", "tiny").manifest) == load_index(store, "tiny").digest


def test_cli_store_paths_stay_whole_in_a_narrow_terminal(cli: Any, tmp_path: Path) -> None:
    home = tmp_path / ("a-rather-long-folder-name-" * 4) / "home"
    _write(Store(home), "r1", "x")
    r = cli("store", home=home, env={"COLUMNS": "60"})
    assert r.exit_code == 0, r.output
    assert str(home.resolve()) in r.stdout.replace("\n", "")  # whole, not cut to "…"
    assert "…" not in r.stdout


def test_cli_store_rm(cli: Any, store: Store) -> None:
    _write(store, "r1", "x")
    _write(store, "r2", "y")
    result = cli("store", "rm", "results", "r1")
    assert result.exit_code == 0, result.output
    assert not store.exists("results", "r1") and store.exists("results", "r2")
    assert [e["name"] for e in cli.json("store")["entries"]] == ["r2"]


@pytest.mark.parametrize("args, needle", [
    (("results", "nope"), "no result named 'nope'"),
    (("explainers", "r2"), "no explainer named 'r2'"),
    (("nonsense", "r2"), "unknown store kind 'nonsense'"),
])
def test_cli_store_rm_unknown_is_one_clear_line(cli: Any, store: Store, args: tuple[str, str],
                                                needle: str) -> None:
    _write(store, "r2", "y")
    result = cli("store", "rm", *args)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr
    assert store.exists("results", "r2")


def test_cli_home_option_and_env(cli: Any, tmp_path: Path) -> None:
    env_home, opt_home = tmp_path / "env-home", tmp_path / "opt-home"
    _write(Store(env_home), "in-env", "x")
    _write(Store(opt_home), "in-opt", "x")
    by_env = cli.json("store", home=None, env={"LAVISE_HOME": str(env_home)})
    assert Path(by_env["root"]) == env_home.resolve()
    assert [e["name"] for e in by_env["entries"]] == ["in-env"]
    by_opt = cli.json("store", home=opt_home, env={"LAVISE_HOME": str(env_home)})
    assert Path(by_opt["root"]) == opt_home.resolve()
    assert [e["name"] for e in by_opt["entries"]] == ["in-opt"]
