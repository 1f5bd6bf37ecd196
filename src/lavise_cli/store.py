"""The artifact store: where every dataset, embedding, cache, explainer and result lives.

Layout (``root`` defaults to platformdirs' user data dir for ``lavise``; caches live under the
user cache dir, or under ``root/cache`` when ``--home``/``LAVISE_HOME`` is given)::

    root/datasets/<name>/manifest.json     registered reference datasets (the data stays where it is)
    root/downloads/<name>/                 downloaded archives and their extracted data (resumable)
    root/indexes/<name>/manifest.json      preprocessed mask indexes (RLE), one per dataset
    root/embeddings/<name>/manifest.json   word vectors in gensim's native, memory-mappable format
    root/explainers/<name>/manifest.json   trained explainers (safetensors) and their results
    root/results/<name>/manifest.json      free-standing results
    cache/features/<key>/manifest.json     cached pooled masked features of a reference pass
    cache/targets/<key>/manifest.json      cached feature maps and statistics of a target pass

An entry is complete exactly when its ``manifest.json`` exists.  Entries are written into a
temporary sibling directory and renamed into place only after the manifest is written, so an
interrupted write never leaves an entry that looks complete.  Writers of the same entry are
serialised by an ``fcntl`` lock.  A manifest records the digests of the inputs an entry was
made from; :meth:`Store.is_current` compares them with the inputs a caller has now, so a stale
entry is rebuilt rather than silently reused.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import functools
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from platformdirs import user_cache_dir, user_data_dir

from . import __version__
from .errors import LaviseError

DATA_KINDS = ("datasets", "indexes", "embeddings", "explainers", "results")
CACHE_KINDS = ("features", "targets")
KINDS = DATA_KINDS + CACHE_KINDS
MANIFEST = "manifest.json"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def dir_size(path: Path) -> int:
    """Bytes under ``path`` (files only, symlinks not followed)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def current_umask() -> int:
    """The process's umask (read from /proc where it can be, so that it is never changed, even briefly)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(fd: int) -> None:
    """Give a file made by ``tempfile.mkstemp`` (always 0600) the mode a plain ``open`` would: 0666 & ~umask."""
    os.fchmod(fd, 0o666 & ~current_umask())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename (mode per the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        follow_umask(fd)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def stable_digest(obj: Any) -> str:
    """sha256 of a JSON-serialisable object, independent of key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    path: Path
    manifest: dict[str, Any]

    @functools.cached_property
    def size(self) -> int:
        """Bytes the entry holds on disk now, its manifest aside: what was added after it was
        written (an explainer's ``results/``: explanations, heatmaps, reports) counts too."""
        try:
            return dir_size(self.path) - (self.path / MANIFEST).stat().st_size
        except OSError:  # removed meanwhile
            return int(self.manifest.get("size", 0))

    @property
    def created(self) -> str:
        return str(self.manifest.get("created", ""))


class Store:
    """The artifact store rooted at ``root`` (data) and ``cache`` (caches)."""

    def __init__(self, root: str | os.PathLike[str] | None = None, cache: str | os.PathLike[str] | None = None):
        env = os.environ.get("LAVISE_HOME")
        if root is None and env:
            root = env
        if root is not None:
            self.root = Path(root).expanduser().resolve()
            self.cache = Path(cache).expanduser().resolve() if cache else self.root / "cache"
        else:
            self.root = Path(user_data_dir("lavise", appauthor=False))
            self.cache = Path(cache) if cache else Path(user_cache_dir("lavise", appauthor=False))

    # -- paths -------------------------------------------------------------------------------
    def kind_dir(self, kind: str) -> Path:
        if kind not in KINDS:
            raise LaviseError(f"unknown store kind {kind!r}; kinds are: {', '.join(KINDS)}")
        return (self.cache if kind in CACHE_KINDS else self.root) / kind

    def path(self, kind: str, name: str) -> Path:
        if not name or "/" in name or name.startswith(".") or name in {"..", "."}:
            raise LaviseError(f"invalid entry name {name!r}: use letters, digits, '-', '_' and '.'")
        return self.kind_dir(kind) / name

    # -- reading -----------------------------------------------------------------------------
    def manifest(self, kind: str, name: str) -> dict[str, Any] | None:
        p = self.path(kind, name) / MANIFEST
        try:
            return json.loads(p.read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            return None

    def exists(self, kind: str, name: str) -> bool:
        return self.manifest(kind, name) is not None

    def get(self, kind: str, name: str) -> Entry:
        m = self.manifest(kind, name)
        if m is None:
            known = ", ".join(e.name for e in self.list(kind)) or "none"
            raise LaviseError(f"no {kind[:-1]} named {name!r} in the store (known: {known})")
        return Entry(kind, name, self.path(kind, name), m)

    def list(self, kind: str | None = None) -> list[Entry]:
        kinds = [kind] if kind else list(KINDS)
        out: list[Entry] = []
        for k in kinds:
            d = self.kind_dir(k)
            if not d.is_dir():
                continue
            for child in sorted(d.iterdir()):
                if child.name.startswith(".") or not child.is_dir():
                    continue
                m = self.manifest(k, child.name)
                if m is not None:
                    out.append(Entry(k, child.name, child, m))
        return out

    def latest(self, kind: str) -> Entry | None:
        entries = self.list(kind)
        return max(entries, key=lambda e: e.created) if entries else None

    def is_current(self, kind: str, name: str, inputs: dict[str, Any]) -> bool:
        """True when the entry exists and was made from exactly ``inputs``."""
        m = self.manifest(kind, name)
        return m is not None and m.get("inputs") == json.loads(json.dumps(inputs, default=str))

    # -- writing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, kind: str, name: str) -> Iterator[None]:
        """An exclusive ``fcntl`` lock on one entry name; not re-entrant (``writing`` takes it itself)."""
        lock_dir = self.kind_dir(kind) / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f"{name}.lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def writing(
        self,
        kind: str,
        name: str,
        *,
        inputs: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        locked: bool = True,
    ) -> Iterator[Path]:
        """Build an entry in a temporary directory; publish it atomically on success.

        Yields the temporary directory.  On normal exit the manifest is written there and the
        directory replaces any previous entry of the same name; on an exception the temporary
        directory is removed and the previous entry (if any) is left untouched.
        """
        final = self.path(kind, name)
        final.parent.mkdir(parents=True, exist_ok=True)
        ctx = self.lock(kind, name) if locked else contextlib.nullcontext()
        with ctx:
            tmp = final.parent / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                yield tmp
                manifest = {
                    "kind": kind,
                    "name": name,
                    "inputs": inputs or {},
                    "settings": settings or {},
                    "lavise_version": __version__,
                    "created": _now(),
                    **(extra or {}),
                }
                manifest["size"] = dir_size(tmp)
                atomic_write_json(tmp / MANIFEST, json.loads(json.dumps(manifest, default=str)))
                self._publish(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise

    def _publish(self, tmp: Path, final: Path) -> None:
        old = None
        if final.exists():
            old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            # Hide the old manifest first so that no reader sees a half-replaced entry as complete.
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def update_manifest(self, kind: str, name: str, **fields: Any) -> None:
        """Merge ``fields`` into an existing entry's manifest (atomically, under the lock)."""
        with self.lock(kind, name):
            m = self.manifest(kind, name)
            if m is None:
                raise LaviseError(f"no {kind[:-1]} named {name!r} in the store")
            m.update(fields)
            m["size"] = dir_size(self.path(kind, name))
            atomic_write_json(self.path(kind, name) / MANIFEST, m)

    def remove(self, kind: str, name: str) -> None:
        entry = self.get(kind, name)
        with self.lock(kind, name):
            discard(entry.path)

    def clean_temporaries(self) -> int:
        """Remove leftovers of interrupted writes; returns how many were removed."""
        n = 0
        for k in KINDS:
            d = self.kind_dir(k)
            if not d.is_dir():
                continue
            for child in d.iterdir():
                if child.name.startswith((".tmp-", ".old-")):
                    shutil.rmtree(child, ignore_errors=True)
                    n += 1
        return n


class FileDigests:
    """sha256 of input files, remembered by (path, size, mtime) so large files hash once."""

    def __init__(self, store: Store):
        self.path = store.cache / "digests.json"

    def __call__(self, file: str | os.PathLike[str]) -> str:
        p = Path(file).resolve()
        st = p.stat()
        key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
        try:
            known = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            known = {}
        if key in known:
            return known[key]
        digest = sha256_file(p)
        known[key] = digest
        with contextlib.suppress(OSError):
            atomic_write_json(self.path, known)
        return digest


def discard(path: Path) -> None:
    """Delete a folder as one step: renamed aside first (``.old-*``, which
    :meth:`Store.clean_temporaries` sweeps), so an interrupted delete never leaves it half there."""
    trash = path.parent / f".old-{path.name}-{uuid.uuid4().hex[:8]}"
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
