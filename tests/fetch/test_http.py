"""Resumable, verified HTTP downloads (``lavise_cli.fetch.http``), on their own.

Every test talks to a real HTTP server on 127.0.0.1 (the ``http_server`` fixture in conftest.py:
an ephemeral port, fixture bytes, ``Range`` honoured unless switched off, a transfer that can be
cut off half-way).  Moved here from tests/test_download.py: the ``test_fetch_*`` tests.
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from lavise_cli.errors import DataError
from lavise_cli.fetch.http import fetch, part_path

if TYPE_CHECKING:
    from conftest import FixtureServer


def payload(n: int = 300_000) -> bytes:
    return bytes((i * 7919 + i // 251) % 256 for i in range(n))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_fetch_full_with_checksum(http_server: FixtureServer, tmp_path: Path) -> None:
    data = payload()
    url = http_server.serve("blob.bin", data)
    dest = tmp_path / "out" / "blob.bin"
    result = fetch(url, dest, sha256=sha(data), md5=hashlib.md5(data).hexdigest(), size=len(data), chunk=64 << 10)
    assert dest.read_bytes() == data
    assert result == {"path": dest, "url": url, "size": len(data), "sha256": sha(data)}
    assert not part_path(dest).exists()
    assert "Range" not in http_server.requests[0]["headers"]


def test_fetch_always_records_sha256(http_server: FixtureServer, tmp_path: Path) -> None:
    data = payload(1000)
    result = fetch(http_server.serve("x.bin", data), tmp_path / "x.bin")
    assert result["sha256"] == sha(data) and result["size"] == 1000


def test_fetch_cut_off_then_resumed_with_range(http_server: FixtureServer, tmp_path: Path) -> None:
    data = payload()
    url = http_server.serve("big.zip", data)
    http_server.cut_after["/big.zip"] = 120_000
    dest = tmp_path / "big.zip"
    with pytest.raises(DataError, match="run the same command again to resume") as exc:
        fetch(url, dest, sha256=sha(data), chunk=16 << 10)
    assert "\n" not in str(exc.value)
    part = part_path(dest)
    assert part.stat().st_size == 120_000 and not dest.exists()

    result = fetch(url, dest, sha256=sha(data), chunk=16 << 10)
    assert http_server.requests[1]["headers"].get("Range") == "bytes=120000-"
    assert dest.read_bytes() == data and result["sha256"] == sha(data)
    assert not part.exists()


def test_fetch_restarts_when_server_ignores_range(http_server: FixtureServer, tmp_path: Path) -> None:
    data = payload(50_000)
    url = http_server.serve("f.bin", data)
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(b"garbage that is not a prefix")
    http_server.honour_ranges = False
    fetch(url, dest, sha256=sha(data))
    assert http_server.requests[0]["headers"].get("Range") == "bytes=28-"
    assert dest.read_bytes() == data


def test_fetch_part_already_complete_needs_no_request(http_server: FixtureServer, tmp_path: Path) -> None:
    data = payload(10_000)
    url = http_server.serve("f.bin", data)
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(data)
    fetch(url, dest, sha256=sha(data), size=len(data))
    assert http_server.requests == [] and dest.read_bytes() == data


def test_fetch_part_complete_answered_416(http_server: FixtureServer, tmp_path: Path) -> None:
    data = payload(10_000)
    url = http_server.serve("f.bin", data)
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(data)
    fetch(url, dest, sha256=sha(data))  # size unknown: the server's 416 says the part is whole
    assert len(http_server.requests) == 1 and dest.read_bytes() == data


def test_fetch_wrong_checksum_leaves_nothing(http_server: FixtureServer, tmp_path: Path) -> None:
    data = payload(20_000)
    url = http_server.serve("f.zip", data)
    dest = tmp_path / "f.zip"
    with pytest.raises(DataError) as exc:
        fetch(url, dest, sha256="0" * 64)
    msg = str(exc.value)
    assert "checksum mismatch for f.zip" in msg and "0" * 64 in msg and sha(data) in msg and "\n" not in msg
    assert not dest.exists() and not part_path(dest).exists()
    with pytest.raises(DataError, match="expected md5"):
        fetch(url, dest, md5="0" * 32)
    with pytest.raises(DataError, match="expected 5 bytes"):
        fetch(url, dest, size=5)
    assert list(tmp_path.iterdir()) == []


def test_fetch_http_and_network_errors_are_one_line(http_server: FixtureServer, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="HTTP 404"):
        fetch(http_server.url("missing.zip"), tmp_path / "m.zip")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match="run the same command again to resume") as exc:
        fetch(f"http://127.0.0.1:{port}/x.zip", tmp_path / "x.zip", timeout=5)
    assert "\n" not in str(exc.value)


def test_fetch_valid_part_on_a_server_without_range_is_not_appended_to(
    http_server: FixtureServer, tmp_path: Path
) -> None:
    """A true prefix is on disk, but the server answers 200 with the whole file: start over."""
    data = payload(60_000)
    url = http_server.serve("f.bin", data)
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(data[:25_000])
    http_server.honour_ranges = False
    result = fetch(url, dest, sha256=sha(data), size=len(data))
    assert http_server.requests[0]["headers"].get("Range") == "bytes=25000-"
    assert dest.read_bytes() == data and result["size"] == len(data)
    assert not part_path(dest).exists()


def test_fetch_part_longer_than_the_file_starts_over(http_server: FixtureServer, tmp_path: Path) -> None:
    data = payload(10_000)
    url = http_server.serve("f.bin", data)
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(payload(12_000))
    fetch(url, dest, sha256=sha(data), size=len(data))
    assert "Range" not in http_server.requests[0]["headers"] and dest.read_bytes() == data


def test_fetch_resume_then_checksum_mismatch_deletes_the_part(http_server: FixtureServer, tmp_path: Path) -> None:
    """Resumed bytes are verified like fresh ones: a wrong digest leaves neither file behind."""
    data = payload(80_000)
    url = http_server.serve("f.bin", data)
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(data[:30_000])
    with pytest.raises(DataError, match="checksum mismatch for f.bin") as exc:
        fetch(url, dest, sha256="f" * 64)
    assert http_server.requests[0]["headers"].get("Range") == "bytes=30000-"
    assert sha(data) in str(exc.value)  # the digest of the whole, resumed file
    assert not dest.exists() and not part_path(dest).exists()


def test_fetch_hint_is_added_to_a_refused_address_only(http_server: FixtureServer, tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        fetch(http_server.url("missing.zip"), tmp_path / "m.zip", hint=" (and MY_MIRROR, if set)")
    assert str(exc.value).endswith("HTTP 404 Not Found; check the address (and MY_MIRROR, if set)")
    with pytest.raises(DataError) as exc:
        fetch(http_server.url("missing.zip"), tmp_path / "m.zip")
    assert str(exc.value).endswith("check the address")
