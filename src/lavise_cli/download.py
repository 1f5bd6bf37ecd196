"""Getting reference data onto the machine: downloads, safe extraction, registration.

Everything here works without the command line (``lavise download`` is a thin shell over it):

* :func:`fetch` streams one URL into a file, resumably (HTTP ``Range``), verifying checksums;
* :func:`extract` unpacks a zip or tar archive, refusing any member that would land outside
  the target folder, and never leaves a half-written tree that looks complete;
* :func:`register_coco` / :func:`register_vg` check a local copy laid out as the dataset ships
  and record it in the store (the offline route; the data stays where it is);
* :func:`download_dataset`, :func:`download_glove` and :func:`download_weights` combine the
  above for COCO 2017 (instances or panoptic), Visual Genome, word vectors and torchvision
  weights.

Every source URL can be redirected to a mirror with the environment variable
``LAVISE_MIRROR``: ``http://images.cocodataset.org/zips/val2017.zip`` then becomes
``$LAVISE_MIRROR/val2017.zip``.  Checksums still apply to files fetched from a mirror.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import lzma
import os
import re
import shutil
import stat
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO

from . import __version__
from .errors import DataError, LaviseError
from .store import Entry, FileDigests, Store, atomic_write_json, writer_tag

if TYPE_CHECKING:  # pragma: no cover
    from rich.progress import Progress

MIRROR_ENV = "LAVISE_MIRROR"
USER_AGENT = f"lavise-cli/{__version__}"
DEFAULT_GLOVE = "glove-wiki-gigaword-300"
GENSIM_DATA_URL = "https://github.com/RaRe-Technologies/gensim-data/releases/download/{name}/{name}.gz"
SPLITS = ("train", "val")
DATASET_KINDS = ("coco", "coco-panoptic", "vg")

Announce = Callable[[str], None]


# ----------------------------------------------------------------------------------------------
# The official sources
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One file of an official distribution.

    ``size`` is in bytes; it is the exact size when ``exact`` is true (then a download of any
    other size is refused) and an approximation for the announcement otherwise.  ``sha256`` /
    ``md5`` are the digests the publisher (or the reference loaders that everyone checks
    against) give for the file; ``None`` where no reliable digest is known.
    """

    url: str
    size: int
    exact: bool = False
    sha256: str | None = None
    md5: str | None = None
    description: str = ""

    @property
    def filename(self) -> str:
        return PurePosixPath(urllib.parse.urlparse(self.url).path).name

    @property
    def resolved_url(self) -> str:
        return resolve_url(self.url)


_COCO = "http://images.cocodataset.org"
_VG = "http://visualgenome.org/static/data/dataset"

# COCO digests: the sha256 values recorded for the official archives by TensorFlow Datasets,
# Hugging Face datasets and ParlAI (they agree); the sizes are exact.  Visual Genome publishes
# no digests and its sizes here are approximate.
SOURCES: dict[str, Source] = {
    "coco-annotations": Source(
        f"{_COCO}/annotations/annotations_trainval2017.zip",
        252_907_541,
        exact=True,
        sha256="113a836d90195ee1f884e704da6304dfaaecff1f023f49b6ca93c4aaae470268",
        description="COCO 2017 train/val annotations (instances, captions, keypoints)",
    ),
    "coco-train-images": Source(
        f"{_COCO}/zips/train2017.zip",
        19_336_861_798,
        exact=True,
        sha256="69a8bb58ea5f8f99d24875f21416de2e9ded3178e903f1f7603e283b9e06d929",
        description="COCO 2017 train images (118,287)",
    ),
    "coco-val-images": Source(
        f"{_COCO}/zips/val2017.zip",
        815_585_330,
        exact=True,
        sha256="4f7e2ccb2866ec5041993c9cf2a952bbed69647b115d0f74da7ce8f4bef82f05",
        description="COCO 2017 val images (5,000)",
    ),
    "coco-panoptic-annotations": Source(
        f"{_COCO}/annotations/panoptic_annotations_trainval2017.zip",
        860_725_834,
        exact=True,
        sha256="c05f76d2129b6b561eb70efe16e7006df62f73fb92889132d373b9d90e31a370",
        description="COCO 2017 panoptic annotations (JSON + PNG segment maps)",
    ),
    "vg-images-1": Source(
        "https://cs.stanford.edu/people/rak248/VG_100K_2/images.zip",
        9_900_000_000,
        description="Visual Genome 1.4 images, part 1 (VG_100K/)",
    ),
    "vg-images-2": Source(
        "https://cs.stanford.edu/people/rak248/VG_100K_2/images2.zip",
        5_500_000_000,
        description="Visual Genome 1.4 images, part 2 (VG_100K_2/)",
    ),
    "vg-objects": Source(
        f"{_VG}/objects.json.zip",
        413_000_000,
        description="Visual Genome 1.4 objects",
    ),
    "vg-object-synsets": Source(
        f"{_VG}/object_synsets.json.zip",
        1_000_000,
        description="Visual Genome 1.4 object synsets",
    ),
    "vg-image-data": Source(
        f"{_VG}/image_data.json.zip",
        1_700_000,
        description="Visual Genome 1.4 image metadata",
    ),
}

# gensim-data models: (file size in bytes, md5 of the .gz) as published in gensim-data's list.json.
GENSIM_MODELS: dict[str, tuple[int, str]] = {
    "glove-wiki-gigaword-50": (69_182_535, "c289bc5d7f2f02c6dc9f2f9b67641813"),
    "glove-wiki-gigaword-100": (134_300_434, "40ec481866001177b8cd4cb0df92924f"),
    "glove-wiki-gigaword-200": (264_336_934, "59652db361b7a87ee73834a6c391dfc1"),
    "glove-wiki-gigaword-300": (394_362_229, "29e9329ac2241937d55b852e8284e89b"),
    "glove-twitter-25": (109_885_004, "50db0211d7e7a2dcd362c6b774762793"),
    "glove-twitter-50": (209_216_938, "c168f18641f8c8a00fe30984c4799b2b"),
    "glove-twitter-100": (405_932_991, "b04f7bed38756d64cf55b58ce7e97b15"),
    "glove-twitter-200": (795_373_100, "e52e8392d1860b95d5308a525817d8f9"),
    "word2vec-google-news-300": (1_743_563_840, "a5e5354d40acb95f9ec66d5977d140ef"),
}


def resolve_url(url: str) -> str:
    """``url``, or ``$LAVISE_MIRROR/<basename>`` when the mirror variable is set."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if not mirror:
        return url
    return mirror.rstrip("/") + "/" + PurePosixPath(urllib.parse.urlparse(url).path).name


def sources_for(kind: str, split: str = "all") -> list[Source]:
    """The files to download for a dataset ``kind`` and ``split`` (train, val or all)."""
    if kind not in DATASET_KINDS:
        raise LaviseError(f"unknown dataset kind {kind!r}; kinds are: {', '.join(DATASET_KINDS)}")
    splits = _splits(split)
    if kind == "vg":
        keys = ["vg-objects", "vg-object-synsets", "vg-image-data", "vg-images-1", "vg-images-2"]
    else:
        keys = ["coco-panoptic-annotations" if kind == "coco-panoptic" else "coco-annotations"]
        keys += [f"coco-{s}-images" for s in splits]
    return [SOURCES[k] for k in keys]


def _splits(split: str) -> list[str]:
    if split == "all":
        return list(SPLITS)
    if split not in SPLITS:
        raise LaviseError(f"unknown split {split!r}; use train, val or all")
    return [split]


def human_size(n: float) -> str:
    """Bytes in binary units (KiB, MiB, GiB: powers of 1024), as the download progress bar shows them."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# ----------------------------------------------------------------------------------------------
# fetch: one resumable, verified download
# ----------------------------------------------------------------------------------------------
class _Restart(Exception):
    """The server did not honour the Range request: start again from byte 0."""


def part_path(dest: Path) -> Path:
    """Where :func:`fetch` keeps the bytes of an unfinished download of ``dest``."""
    return dest.with_name(dest.name + ".part")


def fetch(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    size: int | None = None,
    progress: Progress | None = None,
    chunk: int = 1 << 20,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Download ``url`` to ``dest``; resumable; verified; atomic.

    Bytes go to ``dest.part`` first.  When that file exists (an earlier attempt was cut off) the
    request asks for the rest (``Range: bytes=N-``) and appends when the server answers 206; on
    a 200 it starts again from scratch.  When done, ``size``/``sha256``/``md5`` are checked (a
    mismatch deletes the part file and raises :class:`DataError`) and the part file is renamed
    to ``dest``.  Returns ``{"path", "url", "size", "sha256"}`` (sha256 always computed).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    task = progress.add_task(dest.name, total=size) if progress is not None else None
    for _attempt in range(3):
        try:
            _transfer(url, part, size=size, progress=progress, task=task, chunk=chunk, timeout=timeout)
            break
        except _Restart:
            part.unlink(missing_ok=True)
    else:  # pragma: no cover - a server that keeps answering with the wrong range
        raise DataError(f"download of {url} failed: the server keeps sending the wrong byte range")
    digests = _verify(part, label=dest.name, url=url, sha256=sha256, md5=md5, size=size)
    os.replace(part, dest)
    return {"path": dest, "url": url, "size": digests["size"], "sha256": digests["sha256"]}


def _open(url: str, offset: int, timeout: float) -> Any:
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _transfer(
    url: str,
    part: Path,
    *,
    size: int | None,
    progress: Progress | None,
    task: Any,
    chunk: int,
    timeout: float,
) -> None:
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:
        raise _Restart()
    if size is not None and offset == size:
        _progress(progress, task, total=size, completed=size)
        return  # complete already; only the checks and the rename are left
    try:
        resp = _open(url, offset, timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            if _range_total(e.headers.get("Content-Range")) == offset:
                return  # the part file holds the whole file already
            raise _Restart() from None
        if e.code >= 500:
            raise DataError(
                f"download of {url} failed: the server answered HTTP {e.code} {e.reason};"
                " try again later: run the same command again to resume"
            ) from None
        raise DataError(
            f"download of {url} failed: HTTP {e.code} {e.reason}; check the address (and {MIRROR_ENV}, if set)"
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise _network_error(url, part, e) from None
    with resp:
        status = getattr(resp, "status", None) or 200
        length = resp.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        if offset and status == 206:
            if _range_start(resp.headers.get("Content-Range")) != offset:
                raise _Restart()
            mode = "ab"
        else:
            offset, mode = 0, "wb"
        total = offset + expected if expected is not None else size
        _progress(progress, task, total=total, completed=offset)
        received = _copy(resp, part, mode, url=url, chunk=chunk, progress=progress, task=task)
    if expected is not None and received < expected:
        done = offset + received
        raise DataError(
            f"download of {url} was cut off after {human_size(done)} of {human_size(offset + expected)};"
            f" the part is kept in {part}: run the same command again to resume"
        )


def _copy(resp: BinaryIO, part: Path, mode: str, *, url: str, chunk: int, progress: Progress | None, task: Any) -> int:
    """Append the response body to ``part``; bytes received are on disk even when this fails."""
    received = 0
    try:
        with open(part, mode) as fh:
            try:
                while block := resp.read(chunk):
                    fh.write(block)
                    received += len(block)
                    if progress is not None:
                        progress.advance(task, len(block))
            finally:
                fh.flush()
                os.fsync(fh.fileno())
    except (OSError, http.client.HTTPException) as e:
        raise _network_error(url, part, e) from None
    return received


def _range_start(content_range: str | None) -> int | None:
    m = re.match(r"\s*bytes\s+(\d+)-", content_range or "")
    return int(m.group(1)) if m else None


def _range_total(content_range: str | None) -> int | None:
    m = re.match(r"\s*bytes\s+[^/]*/(\d+)", content_range or "")
    return int(m.group(1)) if m else None


def _progress(progress: Progress | None, task: Any, *, total: int | None, completed: int) -> None:
    if progress is not None:
        progress.update(task, total=total, completed=completed)


def _reason(e: BaseException) -> str:
    """A short human reason for a network failure (no errno numbers)."""
    reason: Any = getattr(e, "reason", None) or e
    if isinstance(reason, TimeoutError) or isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return str(reason.strerror)
    return str(reason) or type(e).__name__


def _network_error(url: str, part: Path, e: BaseException) -> DataError:
    reason = _reason(e)
    host = urllib.parse.urlparse(url).netloc or url
    kept = part.stat().st_size if part.exists() else 0
    keep = f"{human_size(kept)} kept in {part}" if kept else "check the connection"
    return DataError(f"download from {host} failed ({reason}); {keep}; run the same command again to resume")


def _verify(
    path: Path, *, label: str, url: str, sha256: str | None, md5: str | None, size: int | None
) -> dict[str, Any]:
    """Check ``path`` against what is expected; on a mismatch delete it and raise."""
    h_sha, h_md5, n = hashlib.sha256(), hashlib.md5(), 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h_sha.update(block)
            if md5:
                h_md5.update(block)
            n += len(block)
    got = {"sha256": h_sha.hexdigest(), "md5": h_md5.hexdigest() if md5 else None, "size": n}
    problems = []
    if size is not None and n != size:
        problems.append(f"expected {size} bytes, got {n}")
    if sha256 and got["sha256"] != sha256.lower():
        problems.append(f"expected sha256 {sha256.lower()}, got {got['sha256']}")
    if md5 and got["md5"] != md5.lower():
        problems.append(f"expected md5 {md5.lower()}, got {got['md5']}")
    if problems:
        path.unlink(missing_ok=True)
        raise DataError(
            f"checksum mismatch for {label}: {'; '.join(problems)}; the file was deleted:"
            f" run the command again to download it afresh (if this repeats, the source {url} has changed)"
        )
    return got


# ----------------------------------------------------------------------------------------------
# extract: safe unpacking
# ----------------------------------------------------------------------------------------------
def is_archive(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith((".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz"))


def _member_parts(name: str, archive: Path) -> tuple[str, ...]:
    """The path components of an archive member, refusing anything that could escape."""
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise DataError(f"refusing to extract {archive.name}: member {name!r} has an absolute path")
    parts = tuple(p for p in norm.split("/") if p not in ("", "."))
    if ".." in parts:
        raise DataError(f"refusing to extract {archive.name}: member {name!r} would land outside the target folder")
    if "\x00" in norm:
        raise DataError(f"refusing to extract {archive.name}: member {name!r} has a NUL byte in its name")
    return parts


def _check_link(member: str, link: str, archive: Path, *, relative_to_member: bool) -> None:
    """Refuse a symlink/hardlink whose target is absolute or leaves the extraction root."""
    norm = link.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise DataError(
            f"refusing to extract {archive.name}: link {member!r} points outside the target folder ({link!r})"
        )
    base = PurePosixPath(*_member_parts(member, archive)).parent if relative_to_member else PurePosixPath()
    depth = len(base.parts)
    for p in PurePosixPath(norm).parts:
        if p == "..":
            depth -= 1
        elif p not in (".", ""):
            depth += 1
        if depth < 0:
            raise DataError(
                f"refusing to extract {archive.name}: link {member!r} points outside the target folder ({link!r})"
            )


def _inside(root: Path, path: Path) -> bool:
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root + os.sep)


def _zip_is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _validate_zip(zf: zipfile.ZipFile, archive: Path) -> int:
    total = 0
    for info in zf.infolist():
        _member_parts(info.filename, archive)
        if _zip_is_symlink(info):
            _check_link(info.filename, zf.read(info).decode("utf-8", "replace"), archive, relative_to_member=True)
        total += info.file_size
    return total


def _validate_tar(tf: tarfile.TarFile, archive: Path) -> int:
    total = 0
    for m in tf.getmembers():
        _member_parts(m.name, archive)
        if m.issym():
            _check_link(m.name, m.linkname, archive, relative_to_member=True)
        elif m.islnk():
            _member_parts(m.linkname, archive)
            _check_link(m.name, m.linkname, archive, relative_to_member=False)
        elif not (m.isfile() or m.isdir()):
            raise DataError(f"refusing to extract {archive.name}: member {m.name!r} is a device or pipe")
        total += m.size if m.isfile() else 0
    return total


def _extract_zip(zf: zipfile.ZipFile, tmp: Path, archive: Path, progress: Progress | None, task: Any) -> None:
    for info in zf.infolist():
        parts = _member_parts(info.filename, archive)
        if not parts:
            continue
        out = tmp.joinpath(*parts)
        if not _inside(tmp, out):  # also catches writing through a link unpacked earlier
            raise DataError(
                f"refusing to extract {archive.name}: member {info.filename!r} would land outside the target folder"
            )
        if info.is_dir():
            out.mkdir(parents=True, exist_ok=True)
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        if _zip_is_symlink(info):
            os.symlink(zf.read(info).decode("utf-8"), out)
            continue
        with zf.open(info) as src, open(out, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
                if progress is not None:
                    progress.advance(task, len(block))


def _extract_tar(tf: tarfile.TarFile, tmp: Path, archive: Path) -> None:
    if hasattr(tarfile, "data_filter"):
        tf.extractall(tmp, filter="data")
        return
    for m in tf.getmembers():  # pragma: no cover - Python without extraction filters
        if not _inside(tmp, tmp.joinpath(*_member_parts(m.name, archive)).parent):
            raise DataError(
                f"refusing to extract {archive.name}: member {m.name!r} would land outside the target folder"
            )
        tf.extract(m, tmp, set_attrs=False)


def _check_tree(tmp: Path, archive: Path) -> None:
    """After unpacking: every symlink must resolve inside the tree."""
    for dirpath, dirs, files in os.walk(tmp):
        for n in dirs + files:
            p = Path(dirpath) / n
            if p.is_symlink() and not _inside(tmp, p):
                raise DataError(
                    f"refusing to extract {archive.name}: link {p.relative_to(tmp)} points outside the target folder"
                )


def _real_dir(p: Path) -> bool:
    return p.is_dir() and not p.is_symlink()


def _move_into(src: Path, dst: Path) -> list[Path]:
    """Rename ``src`` to ``dst``; merge into an existing folder file by file."""
    if _real_dir(src) and _real_dir(dst):
        moved: list[Path] = []
        for child in sorted(src.iterdir()):
            moved += _move_into(child, dst / child.name)
        return moved
    if _real_dir(dst):
        shutil.rmtree(dst)
    elif dst.is_symlink() or (dst.exists() and _real_dir(src)):
        dst.unlink()
    os.replace(src, dst)
    if _real_dir(dst):
        return [Path(d) / f for d, _, fs in os.walk(dst) for f in fs]
    return [dst]


def extract(archive: Path, target: Path, *, progress: Progress | None = None) -> list[Path]:
    """Unpack a zip or tar(.gz/.bz2/.xz) ``archive`` into ``target``; returns the files written.

    Every member is checked before anything is written: absolute paths, ``..`` components and
    links pointing outside refuse the whole archive (:class:`DataError`).  Members are unpacked
    into a temporary folder beside ``target`` and renamed into place only when all of them were
    read (and their CRCs checked), so an interrupted or failed extraction leaves nothing in
    ``target``.  Existing folders in ``target`` are merged into; existing files are replaced.
    """
    archive, target = Path(archive), Path(target)
    if not archive.is_file():
        raise DataError(f"archive {archive} does not exist")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".extract-{target.name}{writer_tag()}"
    try:
        with _open_archive(archive) as (kind, handle):
            total = _validate_zip(handle, archive) if kind == "zip" else _validate_tar(handle, archive)
            tmp.mkdir()
            task = progress.add_task(f"unpacking {archive.name}", total=total) if progress is not None else None
            if kind == "zip":
                _extract_zip(handle, tmp, archive, progress, task)
            else:
                _extract_tar(handle, tmp, archive)
                if progress is not None and task is not None:
                    progress.update(task, completed=total)
        _check_tree(tmp, archive)
        target.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        for child in sorted(tmp.iterdir()):
            written += _move_into(child, target / child.name)
        return written
    except DataError:
        raise
    except _TAR_FILTER_ERROR as e:
        raise DataError(f"refusing to extract {archive.name}: {e}") from None
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as e:
        if isinstance(e, OSError) and not _is_corruption(e):
            raise DataError(f"could not extract {archive.name} into {target}: {e}") from None
        raise DataError(
            f"{archive} is damaged ({e}); delete it and run the command again to download it afresh"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_TAR_FILTER_ERROR: type[Exception] = getattr(tarfile, "FilterError", DataError)


def _is_corruption(e: OSError) -> bool:
    # gzip/bz2/lzma report damaged streams as OSError subclasses without an errno.
    return e.errno is None


@contextlib.contextmanager
def _open_archive(archive: Path) -> Any:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            yield "zip", zf
        return
    try:
        tf = tarfile.open(archive, "r:*")
    except tarfile.ReadError:
        raise DataError(f"{archive.name} is neither a zip nor a tar archive (or it is damaged)") from None
    with tf:
        yield "tar", tf


# ----------------------------------------------------------------------------------------------
# Registering local copies (the offline route)
# ----------------------------------------------------------------------------------------------
def _load_json(path: Path) -> Any:
    try:
        with open(path, "rb") as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}); the file is damaged: get it again"
        ) from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not valid JSON (not UTF-8 text); the file is damaged: get it again") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _check_coco_json(path: Path, required: Sequence[str]) -> dict[str, Any]:
    data = _load_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a COCO annotation file: expected a JSON object with {', '.join(required)}")
    missing = [k for k in required if not isinstance(data.get(k), list)]
    if missing:
        raise DataError(f"{path} is not a COCO annotation file: no {', '.join(repr(k) for k in missing)} list")
    return data


def _coco_split(root: Path, split: str, panoptic: bool) -> dict[str, Any]:
    """Check one split of a COCO layout; return its settings block."""
    images = root / f"{split}2017"
    if panoptic:
        ann = root / "annotations" / f"panoptic_{split}2017.json"
        masks = root / "annotations" / f"panoptic_{split}2017"
        if not masks.is_dir():
            raise DataError(
                f"{root}: {ann.relative_to(root)} is there but its PNG folder annotations/{masks.name}/ is missing"
                f" (unzip annotations/{masks.name}.zip into annotations/)"
            )
        if next(masks.glob("*.png"), None) is None:
            raise DataError(f"{root}: annotations/{masks.name}/ holds no PNG segment maps")
    else:
        ann = root / "annotations" / f"instances_{split}2017.json"
    if not images.is_dir():
        other = "val" if split == "train" else "train"
        raise DataError(
            f"{root}: {ann.relative_to(root)} is there but the images folder {images.name}/ is missing;"
            f" add it, or register only the other split (--split {other})"
        )
    data = _check_coco_json(ann, ("images", "annotations", "categories"))
    from .data.validate import check_coco

    check_coco(data, ann, panoptic)
    block: dict[str, Any] = {"annotations": str(ann), "images": str(images)}
    if panoptic:
        block["masks"] = str(masks)
    block["num_images"] = len(data["images"])
    return block


def _coco_layout_error(root: Path, panoptic: bool) -> DataError:
    if panoptic:
        want = "annotations/panoptic_{train,val}2017.json with annotations/panoptic_{train,val}2017/*.png"
    else:
        want = "annotations/instances_{train,val}2017.json"
    return DataError(
        f"no COCO {'panoptic' if panoptic else 'instances'} annotations in {root}: expected {want}"
        f" and the images in {{train,val}}2017/ (either split may be missing, not both)"
    )


def register_coco(
    store: Store,
    root: Path,
    name: str = "coco",
    *,
    panoptic: bool = False,
    splits: Sequence[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Entry:
    """Check a COCO 2017 folder laid out as COCO ships it and register it as dataset ``name``.

    Instances: ``annotations/instances_{split}2017.json`` and images in ``{split}2017/``.
    Panoptic: ``annotations/panoptic_{split}2017.json``, its PNGs in
    ``annotations/panoptic_{split}2017/`` and images in ``{split}2017/``.  ``splits=None``
    takes every split whose annotation file is there (at least one must be); a split whose
    annotation file is there must be complete.  Nothing is copied: the entry records where
    the data is, and the sha256 of each annotation file as its inputs.
    """
    root = Path(root).expanduser().resolve()
    store.path("datasets", name)  # validates the name before any work
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: give the folder that holds annotations/ and train2017/ or val2017/")
    prefix = "panoptic" if panoptic else "instances"
    present = [s for s in SPLITS if (root / "annotations" / f"{prefix}_{s}2017.json").is_file()]
    if splits is None:
        wanted = present
        if not wanted:
            raise _coco_layout_error(root, panoptic)
    else:
        wanted = list(splits)
        for s in wanted:
            _splits(s)
            if s not in present:
                raise DataError(f"{root}: split {s!r} asked for, but annotations/{prefix}_{s}2017.json is missing")
    blocks = {s: _coco_split(root, s, panoptic) for s in wanted}
    digest = FileDigests(store)
    inputs = {f"{s}.annotations": digest(blocks[s]["annotations"]) for s in wanted}
    settings = {"format": "coco-panoptic" if panoptic else "coco", "root": str(root), "splits": blocks}
    with store.writing("datasets", name, inputs=inputs, settings=settings, extra=extra):
        pass
    return store.get("datasets", name)


VG_IMAGE_DIRS = ("VG_100K", "VG_100K_2", "images")


def register_vg(store: Store, root: Path, name: str = "vg", *, extra: dict[str, Any] | None = None) -> Entry:
    """Check a Visual Genome 1.4 folder and register it as dataset ``name`` (split ``train``).

    Needs ``objects.json`` and at least one image folder (``VG_100K/``, ``VG_100K_2/`` or
    ``images/``); ``image_data.json`` and ``object_synsets.json`` are recorded when present.
    """
    root = Path(root).expanduser().resolve()
    store.path("datasets", name)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: give the folder that holds objects.json and VG_100K/")
    objects = root / "objects.json"
    if not objects.is_file():
        raise DataError(f"no Visual Genome objects.json in {root} (unzip objects.json.zip there)")
    with open(objects, "rb") as fh:
        if fh.read(64).lstrip()[:1] != b"[":
            raise DataError(f"{objects} is not a Visual Genome objects file (expected a JSON list)")
    dirs = [root / d for d in VG_IMAGE_DIRS if (root / d).is_dir()]
    if not dirs:
        raise DataError(f"no Visual Genome images in {root}: expected VG_100K/ and/or VG_100K_2/")
    block: dict[str, Any] = {"annotations": str(objects), "images": str(dirs[0]), "image_dirs": [str(d) for d in dirs]}
    for key, fname in (("image_data", "image_data.json"), ("synsets", "object_synsets.json")):
        if (root / fname).is_file():
            block[key] = str(root / fname)
    if "image_data" in block:
        meta = _load_json(root / "image_data.json")
        block["num_images"] = len(meta) if isinstance(meta, list) else 0
    else:
        block["num_images"] = sum(1 for d in dirs for e in os.scandir(d) if e.is_file())
    inputs = {"train.annotations": FileDigests(store)(objects)}
    settings = {"format": "vg", "root": str(root), "splits": {"train": block}}
    with store.writing("datasets", name, inputs=inputs, settings=settings, extra=extra):
        pass
    return store.get("datasets", name)


# ----------------------------------------------------------------------------------------------
# Downloading whole datasets
# ----------------------------------------------------------------------------------------------
def downloads_dir(store: Store, name: str) -> Path:
    """Where the archives and the unpacked files of downloaded dataset ``name`` live."""
    store.path("datasets", name)
    return store.root / "downloads" / name


def _marker(dl: Path, src: Source) -> Path:
    return dl / f".{src.filename}.json"


def _read_marker(dl: Path, src: Source) -> dict[str, Any] | None:
    try:
        m = json.loads(_marker(dl, src).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return m if isinstance(m, dict) else None


def _announce_plan(kind: str, split: str, todo: list[Source], done: list[Source], dl: Path, announce: Announce) -> None:
    label = {"coco": "COCO 2017 instances", "coco-panoptic": "COCO 2017 panoptic", "vg": "Visual Genome 1.4"}[kind]
    if not todo:
        announce(f"{label}: every file is downloaded already ({len(done)} files in {dl})")
        return
    total = sum(s.size for s in todo)
    approx = "" if all(s.exact for s in todo) else "about "
    files = ", ".join(f"{s.filename} {human_size(s.size)}{_resumed(dl / s.filename)}" for s in todo)
    announce(f"{label} ({split}): {approx}{human_size(total)} to download ({files}) into {dl}")
    announce("each archive is unpacked and then deleted; an interrupted download resumes when run again")


def _resumed(dest: Path) -> str:
    part = part_path(dest)
    return f", {human_size(part.stat().st_size)} of it done" if part.exists() else ""


def _check_space(dl: Path, todo: list[Source]) -> None:
    need = 0
    for s in todo:
        part = part_path(dl / s.filename)
        need += max(s.size - (part.stat().st_size if part.exists() else 0), 0)
    free = shutil.disk_usage(dl).free
    if need > free:
        raise DataError(
            f"not enough free disk space in {dl}: {human_size(need)} to download, {human_size(free)} free;"
            f" free some space or point --home (LAVISE_HOME) at a larger disk"
        )


def _get_archive(src: Source, dl: Path, progress: Progress | None) -> dict[str, Any]:
    """Download ``src`` into ``dl`` unless a verified copy is there; record it in its marker."""
    dest = dl / src.filename
    marker = _read_marker(dl, src)
    if marker is None or not dest.exists():
        if dest.exists():  # renamed into place, but the marker was never written
            exact = src.size if src.exact else None
            digests = _verify(dest, label=dest.name, url=src.url, sha256=src.sha256, md5=src.md5, size=exact)
            result = {"path": dest, "url": src.resolved_url, **digests}
        else:
            result = fetch(
                src.resolved_url,
                dest,
                sha256=src.sha256,
                md5=src.md5,
                size=src.size if src.exact else None,
                progress=progress,
            )
        marker = {
            "file": src.filename,
            "url": result["url"],
            "sha256": result["sha256"],
            "size": result["size"],
            "unpacked": False,
        }
        atomic_write_json(_marker(dl, src), marker)
    return marker


def _unpack(src: Source, dl: Path, data: Path, progress: Progress | None) -> None:
    marker = _read_marker(dl, src) or {}
    archive = dl / src.filename
    extract(archive, data, progress=progress)
    atomic_write_json(_marker(dl, src), {**marker, "unpacked": True})
    archive.unlink(missing_ok=True)


def _unpack_panoptic_pngs(data: Path, splits: Iterable[str], progress: Progress | None) -> None:
    """COCO ships each split's panoptic PNGs as a zip inside the annotations zip."""
    ann = data / "annotations"
    for s in splits:
        inner = ann / f"panoptic_{s}2017.zip"
        if not inner.is_file():
            continue
        folder = f"panoptic_{s}2017"
        with zipfile.ZipFile(inner) as zf:
            prefixed = all(n.replace("\\", "/").startswith(folder + "/") for n in zf.namelist())
        extract(inner, ann if prefixed else ann / folder, progress=progress)
        inner.unlink()


def download_dataset(
    store: Store,
    kind: str,
    *,
    split: str = "all",
    name: str | None = None,
    progress: Progress | None = None,
    announce: Announce | None = None,
) -> Entry:
    """Download ``kind`` (coco, coco-panoptic or vg) from its official source and register it.

    Archives go to ``<store root>/downloads/<name>/`` (an unfinished one stays there as a
    ``.part`` file and resumes on the next call), are verified, unpacked into ``data/`` beside
    them and deleted; a small record per archive keeps its URL, size and sha256, which also
    end up in the dataset's manifest.  Files already downloaded and unpacked are skipped.
    """
    name = name or kind
    say = announce or (lambda _msg: None)
    srcs = sources_for(kind, split)
    dl = downloads_dir(store, name)
    dl.mkdir(parents=True, exist_ok=True)
    data = dl / "data"
    with store.lock("datasets", f"{name}.download"):
        # An archive counts as done when it was unpacked (and deleted) and its files are still there.
        done = [s for s in srcs if data.is_dir() and (_read_marker(dl, s) or {}).get("unpacked")]
        todo = [s for s in srcs if s not in done and not (dl / s.filename).exists()]
        _announce_plan(kind, split, todo, done, dl, say)
        _check_space(dl, todo)
        for src in srcs:
            if src in done:
                continue
            _get_archive(src, dl, progress)
            _unpack(src, dl, data, progress)
        if kind == "coco-panoptic":
            _unpack_panoptic_pngs(data, _splits(split), progress)
        records = [_read_marker(dl, s) for s in srcs]
        extra = {"downloads": [{k: r[k] for k in ("file", "url", "size", "sha256")} for r in records if r]}
        say(f"checking the files in {data}")
        if kind == "vg":
            return register_vg(store, data, name, extra=extra)
        present = [s for s in SPLITS if (data / f"{s}2017").is_dir()]
        splits = sorted(set(present) | set(_splits(split)), key=SPLITS.index)
        return register_coco(store, data, name, panoptic=kind == "coco-panoptic", splits=splits, extra=extra)


# ----------------------------------------------------------------------------------------------
# Word vectors and model weights
# ----------------------------------------------------------------------------------------------
_GENSIM_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_VECTOR_SUFFIXES = (".txt", ".gz", ".bin", ".vec", ".kv", ".model", ".w2v")


def glove_source(source: str) -> tuple[str, str | None, int | None]:
    """``(url, md5, size)`` for a gensim-data name or a URL (a URL is used as is)."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", source):
        return source, None, None
    if not _GENSIM_NAME.match(source):
        raise LaviseError(
            f"{source!r} is neither a gensim-data name (e.g. {DEFAULT_GLOVE}) nor a URL;"
            " for a local file use: lavise download glove --from FILE"
        )
    size, md5 = GENSIM_MODELS.get(source, (None, None))
    return resolve_url(GENSIM_DATA_URL.format(name=source)), md5, size


def _archive_stem(fname: str) -> str:
    for suffix in (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tbz2", ".txz", ".tar", ".zip"):
        if fname.lower().endswith(suffix):
            return fname[: -len(suffix)] or "vectors"
    return fname


def _pick_vectors(folder: Path) -> Path:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(_VECTOR_SUFFIXES))
    if len(files) == 1:
        return files[0]
    if not files:
        raise DataError(f"no word-vector file (.txt, .gz, .bin, .vec, .kv) in the archive unpacked at {folder}")
    listing = ", ".join(str(p) for p in files[:6])
    raise DataError(
        f"the archive holds several vector files ({listing}); register one with: lavise download glove --from FILE"
    )


def download_glove(
    store: Store,
    source: str = DEFAULT_GLOVE,
    *,
    name: str | None = None,
    progress: Progress | None = None,
    announce: Announce | None = None,
) -> Entry:
    """Download word vectors (a gensim-data name or a URL) and register them as an embedding.

    The default, ``glove-wiki-gigaword-300``, is GloVe 6B 300-d in word2vec text format.  The
    file is kept in ``<store root>/downloads/embeddings/`` (a second call with the same source
    does not download again) and registered with
    :func:`lavise_cli.embeddings.register_embedding`.  A local path is registered directly.
    """
    from .embeddings import register_embedding

    say = announce or (lambda _msg: None)
    if "://" not in source and Path(source).expanduser().exists():
        return register_embedding(store, Path(source).expanduser(), name=name, progress=progress)
    url, md5, size = glove_source(source)
    is_name = "://" not in source
    fname = PurePosixPath(urllib.parse.urlparse(url).path).name or "vectors"
    dest = store.root / "downloads" / "embeddings" / fname
    with store.lock("embeddings", f"{fname}.download"):
        if dest.exists():
            say(f"{fname} is downloaded already ({dest})")
        else:
            what = human_size(size) if size else "size unknown"
            say(f"word vectors {source}: {what} to download into {dest.parent}")
            fetch(url, dest, md5=md5, size=size, progress=progress)
        path = dest
        if is_archive(dest):
            unpacked = dest.parent / _archive_stem(fname)
            if not unpacked.is_dir():
                extract(dest, unpacked, progress=progress)
            path = _pick_vectors(unpacked)
    say(f"registering {path.name} as an embedding (this converts it to gensim's format once)")
    return register_embedding(store, path, name=name or (source if is_name else None), progress=progress)


def download_weights(model_name: str, weights: str = "DEFAULT") -> dict[str, Any]:
    """Prefetch torchvision weights for ``model_name`` into torch's own hub cache.

    ``weights`` is ``DEFAULT``, an entry name (``IMAGENET1K_V1``) or a full one
    (``ResNet18_Weights.IMAGENET1K_V1``).  Returns ``{"model", "weights", "url", "path"}``.
    """
    import difflib

    import torch.hub
    import torchvision.models as tvm

    known = tvm.list_models()
    if model_name not in known:
        near = difflib.get_close_matches(model_name, known, n=5, cutoff=0.5)
        hint = f"did you mean: {', '.join(near)}?" if near else "see torchvision.models.list_models()"
        raise LaviseError(f"unknown torchvision model {model_name!r}; {hint}")
    enum = tvm.get_model_weights(model_name)
    w = _resolve_weights(enum, weights, model_name)
    path = Path(torch.hub.get_dir()) / "checkpoints" / PurePosixPath(urllib.parse.urlparse(w.url).path).name
    try:
        from .models import hub_download_notice

        with hub_download_notice():
            w.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = _reason(e)
        raise DataError(
            f"download of {model_name} weights from {urllib.parse.urlparse(w.url).netloc} failed ({reason});"
            " run the command again"
        ) from None
    except RuntimeError as e:
        if "hash" in str(e).lower():
            raise DataError(f"the downloaded {model_name} weights are damaged ({e}); run the command again") from None
        raise
    return {"model": model_name, "weights": f"{type(w).__name__}.{w.name}", "url": w.url, "path": str(path)}


def _resolve_weights(enum: Any, weights: str, model_name: str) -> Any:
    key = weights.split(".")[-1]
    if key == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[key]
    except KeyError:
        names = ", ".join(["DEFAULT", *(m.name for m in enum)])
        raise LaviseError(f"{model_name} has no weights {weights!r}; choose one of: {names}") from None
