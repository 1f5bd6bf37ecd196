"""One resumable, verified HTTP download (generic: nothing here knows lavise's datasets).

:func:`fetch` streams a URL into ``<dest>.part``; when that file exists from an interrupted
attempt it asks for the rest (``Range: bytes=N-``) and appends on a 206, starts again on a 200,
and treats a 416 whose ``Content-Range`` total equals the part's size as "complete already".
Size, sha256 and md5 are checked before the part file is renamed to ``dest``; a mismatch deletes
it.  Network and HTTP failures become one-line :class:`~lavise_cli.errors.DataError` messages
that say what was kept and how to resume.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from .. import __version__
from ..errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from rich.progress import Progress

USER_AGENT = f"lavise-cli/{__version__}"


def human_size(n: float) -> str:
    """Bytes in binary units (KiB, MiB, GiB: powers of 1024), as the download progress bar shows them."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


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
    hint: str = "",
) -> dict[str, Any]:
    """Download ``url`` to ``dest``; resumable; verified; atomic.

    Bytes go to ``dest.part`` first.  When that file exists (an earlier attempt was cut off) the
    request asks for the rest (``Range: bytes=N-``) and appends when the server answers 206; on
    a 200 it starts again from scratch.  When done, ``size``/``sha256``/``md5`` are checked (a
    mismatch deletes the part file and raises :class:`DataError`) and the part file is renamed
    to ``dest``.  Returns ``{"path", "url", "size", "sha256"}`` (sha256 always computed).
    ``hint`` is appended to "check the address" when the server refuses the URL (HTTP 4xx),
    e.g. the environment variable that redirected it.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    task = progress.add_task(dest.name, total=size) if progress is not None else None
    for _attempt in range(3):
        try:
            _transfer(url, part, size=size, progress=progress, task=task, chunk=chunk, timeout=timeout, hint=hint)
            break
        except _Restart:
            part.unlink(missing_ok=True)
    else:  # pragma: no cover - a server that keeps answering with the wrong range
        raise DataError(f"download of {url} failed: the server keeps sending the wrong byte range")
    digests = verify(part, label=dest.name, url=url, sha256=sha256, md5=md5, size=size)
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
    hint: str,
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
            f"download of {url} failed: HTTP {e.code} {e.reason}; check the address{hint}"
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


def network_reason(e: BaseException) -> str:
    """A short human reason for a network failure (no errno numbers)."""
    reason: Any = getattr(e, "reason", None) or e
    if isinstance(reason, TimeoutError) or isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return str(reason.strerror)
    return str(reason) or type(e).__name__


def _network_error(url: str, part: Path, e: BaseException) -> DataError:
    reason = network_reason(e)
    host = urllib.parse.urlparse(url).netloc or url
    kept = part.stat().st_size if part.exists() else 0
    keep = f"{human_size(kept)} kept in {part}" if kept else "check the connection"
    return DataError(f"download from {host} failed ({reason}); {keep}; run the same command again to resume")


def verify(
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
