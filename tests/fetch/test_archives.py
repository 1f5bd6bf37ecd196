"""Safe extraction of zip and tar archives (``lavise_cli.fetch.archives``), on its own.

Moved here from tests/test_download.py: the path-traversal, link, normal and damaged-archive
tests; the truncated-archive and device tests are new.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest

from lavise_cli.errors import DataError
from lavise_cli.fetch.archives import extract, is_archive


def payload(n: int) -> bytes:
    return bytes((i * 7919 + i // 251) % 256 for i in range(n))


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_gz(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return path


def tar_link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _assert_nothing_written(tmp_path: Path, target: Path) -> None:
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()
    assert not target.exists() or list(target.iterdir()) == []
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".extract-")] == []


@pytest.mark.parametrize("member", ["../evil", "ok/../../evil", "/tmp/evil-abs"])
def test_zip_with_escaping_member_is_refused(tmp_path: Path, member: str) -> None:
    archive = tmp_path / "bad.zip"
    archive.write_bytes(zip_bytes({"good.txt": b"fine", member: b"pwned"}))
    target = tmp_path / "out" / "target"
    with pytest.raises(DataError, match="refusing to extract bad.zip"):
        extract(archive, target)
    _assert_nothing_written(tmp_path, target)
    assert not Path("/tmp/evil-abs").exists()


def test_zip_with_symlink_outside_is_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        link = zipfile.ZipInfo("data/link")
        link.external_attr = (0o120777 << 16) | 0x20
        zf.writestr(link, "../../outside")
        zf.writestr("data/ok.txt", b"fine")
    archive = tmp_path / "link.zip"
    archive.write_bytes(buf.getvalue())
    target = tmp_path / "out" / "target"
    with pytest.raises(DataError, match="link 'data/link' points outside"):
        extract(archive, target)
    _assert_nothing_written(tmp_path, target)


@pytest.mark.parametrize(
    "evil",
    [
        ("../evil", b"pwned"),
        tar_link("link", "../evil"),
        tar_link("abs", "/etc/passwd"),
        tar_link("hard", "../evil", tarfile.LNKTYPE),
    ],
    ids=["dotdot", "symlink-out", "symlink-abs", "hardlink-out"],
)
def test_tar_gz_with_escaping_member_is_refused(tmp_path: Path, evil: Any) -> None:
    archive = tar_gz(tmp_path / "bad.tar.gz", [("good.txt", b"fine"), evil])
    target = tmp_path / "out" / "target"
    with pytest.raises(DataError, match="refusing to extract bad.tar.gz"):
        extract(archive, target)
    _assert_nothing_written(tmp_path, target)


def test_symlink_chain_escaping_is_refused(tmp_path: Path) -> None:
    # d/l -> .. (the root: inside), then a -> d/l/.. (lexically inside, really the parent).
    archive = tar_gz(tmp_path / "chain.tar.gz", [tar_link("d/l", ".."), tar_link("a", "d/l/.."), ("a/evil", b"x")])
    target = tmp_path / "out" / "target"
    with pytest.raises(DataError, match="refusing"):
        extract(archive, target)
    _assert_nothing_written(tmp_path, target)


def test_normal_archives_extract(tmp_path: Path) -> None:
    members = {"val2017/a.jpg": b"A" * 1000, "val2017/b.jpg": b"B" * 10, "annotations/x.json": b"{}"}
    zpath = tmp_path / "ok.zip"
    zpath.write_bytes(zip_bytes(members))
    target = tmp_path / "data"
    written = extract(zpath, target)
    assert sorted(p.relative_to(target).as_posix() for p in written) == sorted(members)
    for name, data in members.items():
        assert (target / name).read_bytes() == data

    # A tar.gz merges into the same target; an inside symlink is fine.
    tpath = tar_gz(
        tmp_path / "ok.tar.gz",
        [("train2017/c.jpg", b"C" * 5), ("annotations/y.json", b"[]"), tar_link("annotations/z.json", "y.json")],
    )
    extract(tpath, target)
    assert (target / "train2017" / "c.jpg").read_bytes() == b"C" * 5
    assert (target / "annotations" / "x.json").read_bytes() == b"{}"  # kept by the merge
    assert (target / "annotations" / "z.json").read_text() == "[]"
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".extract-")] == []


def test_damaged_archive_leaves_nothing(tmp_path: Path) -> None:
    good = zip_bytes({"a/one.bin": payload(20_000), "a/two.bin": payload(30_000)})
    bad = bytearray(good)
    i = good.index(b"a/two.bin") + 40  # inside the second member's compressed data
    bad[i : i + 8] = b"\x00" * 8
    archive = tmp_path / "bad.zip"
    archive.write_bytes(bytes(bad))
    target = tmp_path / "t"
    with pytest.raises(DataError, match="damaged"):
        extract(archive, target)
    assert not target.exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".extract-")] == []


@pytest.mark.parametrize("suffix", ["zip", "tar.gz", "tar.bz2", "tar.xz", "tar"])
def test_truncated_archive_is_one_clear_error(tmp_path: Path, suffix: str) -> None:
    """An archive cut short (an interrupted copy) says it is damaged and what to do; nothing lands."""
    members = {"a/one.bin": payload(150_000), "a/two.bin": payload(90_000)}
    whole = tmp_path / f"whole.{suffix}"
    if suffix == "zip":
        whole.write_bytes(zip_bytes(members))
    else:
        mode = {"tar.gz": "w:gz", "tar.bz2": "w:bz2", "tar.xz": "w:xz", "tar": "w"}[suffix]
        tar_gz(whole, list(members.items()), mode=mode)
    data = whole.read_bytes()
    archive = tmp_path / f"cut.{suffix}"
    archive.write_bytes(data[: len(data) * 2 // 3])
    target = tmp_path / "out" / "target"
    with pytest.raises(DataError) as exc:
        extract(archive, target)
    msg = str(exc.value)
    assert "damaged" in msg and "run the command again" in msg and "\n" not in msg, msg
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".extract-")] == []
    # the whole archive of the same members unpacks (the test is about the cut, not the content)
    assert sorted(p.relative_to(target).as_posix() for p in extract(whole, target)) == sorted(members)


def test_device_member_is_refused(tmp_path: Path) -> None:
    fifo = tarfile.TarInfo("data/pipe")
    fifo.type = tarfile.FIFOTYPE
    archive = tar_gz(tmp_path / "dev.tar.gz", [("data/ok.txt", b"fine"), fifo])
    target = tmp_path / "out" / "target"
    with pytest.raises(DataError, match="'data/pipe' is a device or pipe"):
        extract(archive, target)
    _assert_nothing_written(tmp_path, target)


def test_not_an_archive_and_missing_archive(tmp_path: Path) -> None:
    text = tmp_path / "notes.dat"
    text.write_text("not an archive at all\n" * 100)
    with pytest.raises(DataError, match="neither a zip nor a tar archive"):
        extract(text, tmp_path / "t")
    named = tmp_path / "notes.tar"
    named.write_text("not an archive at all\n" * 100)
    with pytest.raises(DataError, match="notes.tar is damaged .*run the command again"):
        extract(named, tmp_path / "t")
    with pytest.raises(DataError, match="does not exist"):
        extract(tmp_path / "absent.zip", tmp_path / "t")
    assert not (tmp_path / "t").exists()
    assert is_archive(Path("x.tar.xz")) and is_archive(Path("X.ZIP")) and not is_archive(Path("v.txt.gz"))
