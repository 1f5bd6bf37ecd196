"""What every command shares: a fast start (no torch for --version/--help), one unit system for
sizes, and progress that shows up in logs (stderr not a terminal)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from rich.progress import DownloadColumn

from lavise_cli.cli import common

HEAVY = ("torch", "torchvision", "numpy", "gensim", "pycocotools", "safetensors", "PIL")

_RUN_AND_LIST_IMPORTS = """
import runpy, sys
sys.argv = ["lavise", *sys.argv[1:]]
try:
    runpy.run_module("lavise_cli", run_name="__main__")
except SystemExit as e:
    code = e.code
print("HEAVY:" + ",".join(m for m in {heavy!r} if m in sys.modules))
"""


def _run_fresh(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m lavise_cli ARGS`` in a fresh interpreter, printing which heavy modules it imported."""
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-c", _RUN_AND_LIST_IMPORTS.format(heavy=HEAVY), *args],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("args", [("--version",), ("--help",), ("store", "--help")])
def test_version_and_help_import_no_torch(args: tuple[str, ...]) -> None:
    r = _run_fresh(*args)
    assert r.returncode == 0, r.stderr
    heavy = r.stdout.rsplit("HEAVY:", 1)[1].strip()
    assert heavy == "", f"`lavise {' '.join(args)}` imported {heavy}"
    if args == ("--version",):
        from lavise_cli import __version__

        assert r.stdout.startswith(f"lavise-cli {__version__}")
    if args == ("--help",):
        for command in ("download", "preprocess", "train", "layers", "explain", "evaluate", "heatmap", "report",
                        "store"):
            assert f" {command} " in r.stdout, command


def test_store_help_shows_examples(cli: Any) -> None:
    r = cli("store", "--help")
    assert r.exit_code == 0, r.output
    assert "Examples" in r.stdout and "lavise store rm explainers" in r.stdout and "lavise store gc" in r.stdout


# ----------------------------------------------------------------------------------------------
# Sizes: binary units everywhere (the download notice, the bar, `lavise store`)
# ----------------------------------------------------------------------------------------------


def test_sizes_are_binary_units_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    from lavise_cli import download as dl

    assert common.human_size is dl.human_size  # one function for the notice, the store and the CLI
    assert dl.human_size(512) == "512 B"
    assert dl.human_size(1536) == "1.5 KiB"
    assert dl.human_size(778 * 2**20) == "778.0 MiB"
    assert dl.human_size(18 * 2**30) == "18.0 GiB"
    # The bar on a terminal counts in the same units.
    monkeypatch.setattr(common, "err", Console(file=io.StringIO(), force_terminal=True))
    monkeypatch.setattr(common.state, "quiet", False)
    bar = common.progress(transfer=True)
    cols = [c for c in bar.columns if isinstance(c, DownloadColumn)]
    assert cols and all(c.binary_units for c in cols)


# ----------------------------------------------------------------------------------------------
# Progress when stderr is no terminal
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def plain_err(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    buf = io.StringIO()
    monkeypatch.setattr(common, "err", Console(file=buf, force_terminal=False, width=200))
    monkeypatch.setattr(common.state, "quiet", False)
    return buf


def test_plain_progress_lines_when_stderr_is_no_terminal(plain_err: io.StringIO,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAVISE_PROGRESS_SECONDS", "0")
    with common.progress() as prog:
        assert isinstance(prog, common.PlainProgress)
        task = prog.add_task("feature pass resnet18", total=4, unit="img")
        for _ in range(4):
            prog.advance(task)
        prog.add_task("loading glove", total=None)
    lines = plain_err.getvalue().splitlines()
    assert lines[0].startswith("feature pass resnet18: 1/4 images (25.0 %)"), lines
    assert lines[3].startswith("feature pass resnet18: 4/4 images (100.0 %)") and "done in" in lines[3], lines
    assert lines[4].startswith("loading glove: done in"), lines
    assert len(lines) == 5  # one final line per task, never a second one
    assert not any("━" in ln for ln in lines)  # no bar characters in a log


def test_plain_progress_waits_the_interval(plain_err: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAVISE_PROGRESS_SECONDS", "3600")
    with common.progress(transfer=True) as prog:
        task = prog.add_task("val2017.zip", total=4 * 2**20)
        for _ in range(3):
            prog.advance(task, 2**20)
        assert plain_err.getvalue() == ""  # within the interval: silent
        prog.advance(task, 2**20)
    lines = plain_err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("val2017.zip: 4.0 MiB/4.0 MiB (100.0 %)"), lines


def test_quiet_silences_plain_progress(plain_err: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAVISE_PROGRESS_SECONDS", "0")
    monkeypatch.setattr(common.state, "quiet", True)
    with common.progress() as prog:
        task = prog.add_task("x", total=2)
        prog.advance(task, 2)
    assert plain_err.getvalue() == ""


def test_cli_preprocess_progress_in_a_log(cli: Any, make_coco: Any, small_glove: Path) -> None:
    cli.json("download", "coco", "--from", str(make_coco()), "--name", "tiny")
    cli.json("download", "glove", "--from", str(small_glove))
    r = cli("preprocess", "tiny", env={"LAVISE_PROGRESS_SECONDS": "0"})
    assert r.exit_code == 0, r.output
    assert "instances_val2017 images: 3/3 images (100.0 %)" in r.stderr, r.stderr
    quiet = cli("-q", "preprocess", "tiny", "--force", env={"LAVISE_PROGRESS_SECONDS": "0"})
    assert quiet.exit_code == 0 and "images (" not in quiet.stderr, quiet.stderr
