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
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from platformdirs import user_cache_dir, user_data_dir

from . import __version__
from .errors import LaviseError
from .procs import proc_stat, process_alive

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


# -- temporaries -----------------------------------------------------------------------------
# Every temporary file or folder is named with its writer's tag, ``@<pid>_<start>_<random>``
# (``start``: the process's start time, so a reused pid is not taken for the writer), which
# lets :meth:`Store.clean_temporaries` tell the debris of a dead writer from work in progress.
_TAG = re.compile(r"@(\d+)_(\d+)_[0-9a-f]{6}")
# Names of temporaries: ``.tmp-*``/``.old-*``/``.extract-*`` folders, ``.x.tmp@…``/``.x.old@…``
# (report thumbnails) and ``*.tmp`` files.
_TEMP = re.compile(r"^\.(tmp|old|extract)-|\.(tmp|old)@|\.tmp$")
_UNTAGGED_AGE = 3600.0  # seconds after which an untagged temporary (an older version's) counts as dead


def writer_tag() -> str:
    """A fresh tag naming a temporary after this process (see :func:`writer_alive`)."""
    pid = os.getpid()
    st = proc_stat(pid)
    return f"@{pid}_{st[1] if st else 0}_{uuid.uuid4().hex[:6]}"


def temp_sibling(path: Path) -> Path:
    """A temporary file name beside ``path`` (hidden, tagged with this process, ending ``.tmp``)."""
    return path.parent / f".{path.name}{writer_tag()}.tmp"


def writer_alive(name: str) -> bool | None:
    """Whether the process whose tag is in ``name`` still runs; None when ``name`` has no tag."""
    m = _TAG.search(name)
    if m is None:
        return None
    pid, start = int(m.group(1)), m.group(2)
    if pid == os.getpid():
        return True
    return process_alive(pid, start)


def is_temporary(name: str) -> bool:
    return bool(_TEMP.search(name))


def _dead_temporary(path: Path) -> bool:
    alive = writer_alive(path.name)
    if alive is not None:
        return not alive
    if path.name.startswith(".old-") or ".old@" in path.name:
        return True  # half-deleted trash: nothing reads it
    try:
        return time.time() - path.lstat().st_mtime > _UNTAGGED_AGE
    except FileNotFoundError:
        return False


def _remove(path: Path) -> bool:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return False
    except OSError:
        shutil.rmtree(path, ignore_errors=True)
    return True


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``fcntl`` lock on a folder itself (no lock file is left behind)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename (mode per the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
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


def atomic_write_json(path: Path, obj: Any, *, compact: bool = False) -> None:
    """Write JSON atomically: indented and key-sorted (manifests), or ``compact`` (large result documents)."""
    text = json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj, indent=2, sort_keys=True)
    atomic_write_bytes(path, (text + "\n").encode())


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
    def try_lock(self, kind: str, name: str) -> Iterator[bool]:
        """Like :meth:`lock` without waiting: yields False (holding nothing) when another holds it."""
        lock_dir = self.kind_dir(kind) / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f"{name}.lock", "a+") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
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
            tmp = final.parent / f".tmp-{name}{writer_tag()}"
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
            old = final.parent / f".old-{final.name}{writer_tag()}"
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
        """Remove what interrupted writers left behind; returns how many were removed.

        A temporary (``.tmp-*``, ``.old-*``, ``.extract-*``, a report's ``*.tmp@*`` folder, a
        ``*.tmp`` file) goes when the process named in it is gone; a resumable ``.partial-*``
        folder goes only when nothing holds its lock and it holds nothing to resume from.  The
        scan is shallow (kind folders, entries and two levels below them, the downloads), so it
        is cheap enough to run at the start of every command.
        """
        n = 0
        for k in KINDS:
            d = self.kind_dir(k)
            for child in _children(d):
                if child.name == ".locks":
                    continue
                if child.name.startswith(".partial-"):
                    n += self._clean_partial(k, child)
                elif is_temporary(child.name):
                    n += _dead_temporary(child) and _remove(child)
                elif not child.name.startswith(".") and child.is_dir():
                    n += _clean_tree(child, depth=3)
        n += _clean_tree(self.cache, depth=0)
        n += _clean_tree(self.root / "downloads", depth=2)
        return n

    def _clean_partial(self, kind: str, path: Path) -> int:
        with contextlib.ExitStack() as held:
            # the folder's lock, and the lock of each piece of a pass (ranks and shares run their
            # pieces without the folder's lock): a writer at work in it keeps it whole
            names = [path.name] + [f"{path.name}-{p.stem[len('state-'):]}" for p in path.glob("state-p*.json")]
            for name in names:
                if not held.enter_context(self.try_lock(kind, name)):
                    return 0
            n = _clean_tree(path, depth=1, everything=True)
            if kind != "explainers":
                try:
                    keys = json.loads((path / "state.json").read_text()).get("keys")
                except (OSError, ValueError):
                    keys = []  # no state: nothing done yet that a resumed pass could use
                done = keys is not None and all(self.exists(kind, key) for key in keys)
            else:  # a training checkpoint (`lavise train --resume`)
                done = not (path / "checkpoint.pt").exists()
            if done:
                n += _remove(path)
            return n


def _children(d: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(d)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _clean_tree(d: Path, depth: int, everything: bool = False) -> int:
    """Remove the dead temporaries in ``d`` and ``depth`` levels below (every temporary with ``everything``)."""
    n = 0
    for child in _children(d):
        if is_temporary(child.name):
            if everything or _dead_temporary(child):
                n += _remove(child)
        elif depth > 0 and not child.name.startswith(".locks") and child.is_dir() and not child.is_symlink() \
                and child.name != "data":
            n += _clean_tree(child, depth - 1, everything)
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
    trash = path.parent / f".old-{path.name}{writer_tag()}"
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
