"""Safe unpacking of zip and tar archives (generic: nothing here knows lavise's datasets).

:func:`extract` checks every member before anything is written (absolute paths, ``..``
components, links that leave the target folder, devices and pipes refuse the whole archive),
unpacks into a temporary folder beside the target and moves the files into place only when all
of them were read and their CRCs checked.  A damaged or truncated archive becomes one
:class:`~lavise_cli.errors.DataError` line that says what to do.
"""

from __future__ import annotations

import contextlib
import lzma
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ..errors import DataError
from ..store import writer_tag

if TYPE_CHECKING:  # pragma: no cover
    from rich.progress import Progress


def is_archive(path: Path) -> bool:
    """Whether ``path`` is named like an archive :func:`extract` unpacks (zip, tar, tar.gz/bz2/xz)."""
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
    again = "delete it and run the command again to download it afresh"
    if archive.name.lower().endswith(".zip"):  # a zip cut short loses its directory, at the end
        raise DataError(f"{archive} is damaged (no zip directory at its end: cut short?); {again}")
    try:
        tf = tarfile.open(archive, "r:*")
    except tarfile.ReadError:
        if is_archive(archive):  # named as a tar: unreadable from its start (e.g. a bz2 block cut short)
            raise DataError(f"{archive} is damaged (it cannot be read as a tar archive); {again}") from None
        raise DataError(f"{archive.name} is neither a zip nor a tar archive (or it is damaged)") from None
    with tf:
        yield "tar", tf
