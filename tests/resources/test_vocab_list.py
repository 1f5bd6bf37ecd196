"""Tests for the shipped visual-noun vocabulary (src/lavise_cli/resources/visual_nouns.txt)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
VOCAB = REPO / "src/lavise_cli/resources/visual_nouns.txt"
SCRIPT = REPO / "scripts/build_vocab.py"
GLOVE = Path(__file__).parents[3] / "shared/data/glove/glove.6B.50d.top100k.txt.gz"
WORDNET_DIRS = [Path("/usr/share/wordnet"), Path("/usr/share/wordnet/dict"),
                Path("/usr/lib/wordnet/dict")]

VISUAL = ["dog", "car", "tree", "pizza", "sky", "grass", "man", "woman",
          "table", "shirt", "hand"]
ABSTRACT = ["defendant", "innocent", "circumstances", "government", "election",
            "justice", "freedom", "idea", "theory", "court", "policy"]


def _words() -> list[str]:
    lines = VOCAB.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line and not line.startswith("#")]


def test_file_exists_and_non_empty():
    assert VOCAB.is_file()
    assert len(_words()) > 1000


def test_header_has_source_and_count():
    text = VOCAB.read_text(encoding="utf-8")
    assert "WordNet 3.0" in text
    assert f"# Count: {len(_words())}\n" in text


def test_no_duplicates():
    words = _words()
    assert len(words) == len(set(words))


def test_entries_are_lowercase_alphabetic():
    bad = [w for w in _words() if not re.fullmatch(r"[a-z]{3,}", w)]
    assert bad == []


def test_contains_common_visual_words():
    words = set(_words())
    assert [w for w in VISUAL if w not in words] == []


def test_contains_no_abstract_words():
    words = set(_words())
    assert [w for w in ABSTRACT if w in words] == []


def _wordnet_dir() -> Path | None:
    for d in WORDNET_DIRS:
        if (d / "data.noun").is_file():
            return d
    return None


def test_script_reproduces_shipped_file(tmp_path):
    wordnet = _wordnet_dir()
    if wordnet is None:
        pytest.skip("WordNet database (apt-get install wordnet-base) not found")
    if not GLOVE.is_file():
        pytest.skip(f"GloVe file not found: {GLOVE}")
    out = tmp_path / "visual_nouns.txt"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--wordnet-dir", str(wordnet),
         "--glove", str(GLOVE), "--out", str(out)],
        check=True, capture_output=True, timeout=120,
    )
    assert out.read_bytes() == VOCAB.read_bytes()
