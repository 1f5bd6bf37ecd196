"""Getting reference data onto the machine: the official sources and the downloads built on them.

Everything here works without the command line (``lavise download`` is a thin shell over it):

* :data:`SOURCES` / :func:`sources_for`: the files of COCO 2017 (instances or panoptic) and
  Visual Genome 1.4, with sizes and the digests they are checked against;
* :func:`download_dataset`, :func:`download_glove` and :func:`download_weights` fetch them
  (resumably, verified), unpack them safely and register the result in the store.

The generic pieces live in their own modules and are re-exported here unchanged:
:func:`fetch` / :func:`part_path` / :func:`human_size` (:mod:`lavise_cli.fetch.http`),
:func:`extract` / :func:`is_archive` (:mod:`lavise_cli.fetch.archives`), and
:func:`register_coco` / :func:`register_vg` / :func:`register_broden` / :func:`downloads_dir` /
:func:`remove_dataset` (:mod:`lavise_cli.data.register`, the offline route: a local copy is
checked and recorded; Broden has only that route).

Every source URL can be redirected to a mirror with the environment variable
``LAVISE_MIRROR``: ``http://images.cocodataset.org/zips/val2017.zip`` then becomes
``$LAVISE_MIRROR/val2017.zip``.  Checksums still apply to files fetched from a mirror.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import urllib.error
import urllib.parse
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from .data.register import (
    SPLITS,
    VG_IMAGE_DIRS,
    Removed,
    downloads_dir,
    register_broden,
    register_coco,
    register_vg,
    remove_dataset,
    split_names,
)
from .errors import DataError, LaviseError
from .fetch.archives import extract, is_archive
from .fetch.http import USER_AGENT, fetch, human_size, network_reason, part_path, verify
from .store import Entry, Store, atomic_write_json

if TYPE_CHECKING:  # pragma: no cover
    from rich.progress import Progress

__all__ = [  # the public names, including those re-exported from their new homes
    "DATASET_KINDS", "DEFAULT_GLOVE", "GENSIM_DATA_URL", "GENSIM_MODELS", "MIRROR_ENV", "SOURCES", "SPLITS",
    "USER_AGENT", "VG_IMAGE_DIRS", "Removed", "Source", "download_dataset", "download_glove", "download_weights",
    "downloads_dir", "extract", "fetch", "glove_source", "human_size", "is_archive", "part_path", "register_broden",
    "register_coco", "register_vg", "remove_dataset", "resolve_url", "sources_for",
]

MIRROR_ENV = "LAVISE_MIRROR"
DEFAULT_GLOVE = "glove-wiki-gigaword-300"
GENSIM_DATA_URL = "https://github.com/RaRe-Technologies/gensim-data/releases/download/{name}/{name}.gz"
DATASET_KINDS = ("coco", "coco-panoptic", "vg")
_MIRROR_HINT = f" (and {MIRROR_ENV}, if set)"

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
    splits = split_names(split)
    if kind == "vg":
        keys = ["vg-objects", "vg-object-synsets", "vg-image-data", "vg-images-1", "vg-images-2"]
    else:
        keys = ["coco-panoptic-annotations" if kind == "coco-panoptic" else "coco-annotations"]
        keys += [f"coco-{s}-images" for s in splits]
    return [SOURCES[k] for k in keys]



# ----------------------------------------------------------------------------------------------
# Downloading whole datasets
# ----------------------------------------------------------------------------------------------
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
            digests = verify(dest, label=dest.name, url=src.url, sha256=src.sha256, md5=src.md5, size=exact)
            result = {"path": dest, "url": src.resolved_url, **digests}
        else:
            result = fetch(
                src.resolved_url,
                dest,
                sha256=src.sha256,
                md5=src.md5,
                size=src.size if src.exact else None,
                progress=progress,
                hint=_MIRROR_HINT,
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
            _unpack_panoptic_pngs(data, split_names(split), progress)
        records = [_read_marker(dl, s) for s in srcs]
        extra = {"downloads": [{k: r[k] for k in ("file", "url", "size", "sha256")} for r in records if r]}
        say(f"checking the files in {data}")
        if kind == "vg":
            return register_vg(store, data, name, extra=extra)
        present = [s for s in SPLITS if (data / f"{s}2017").is_dir()]
        splits = sorted(set(present) | set(split_names(split)), key=SPLITS.index)
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
            fetch(url, dest, md5=md5, size=size, progress=progress, hint=_MIRROR_HINT)
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
        reason = network_reason(e)
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

