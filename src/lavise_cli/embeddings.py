"""Word vectors (through gensim), concept vectors, and the explanation vocabulary."""

from __future__ import annotations

import gzip
import pickle
import re
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import DataError, LaviseError
from .store import Entry, FileDigests, Store

KV_FILE = "vectors.kv"
# Suffixes that COCO panoptic appends to stuff categories; they carry no visual meaning.
_LABEL_NOISE = {"merged", "other", "stuff"}


def clean_label(name: str) -> str:
    """A dataset's category name as words: ``sky-other-merged`` -> ``sky``, ``floor-wood`` -> ``floor wood``."""
    tokens = [t for t in re.split(r"[^a-z0-9]+", name.lower()) if t]
    kept = [t for t in tokens if t not in _LABEL_NOISE]
    return " ".join(kept or tokens)


def _sniff_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".kv", ".model", ".kv.gz")):
        return "kv"
    if name.endswith(".bin") or name.endswith(".bin.gz"):
        return "word2vec-binary"
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as fh:  # type: ignore[operator]
            first = fh.readline().split()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read word vectors {path}: {e}") from None
    if len(first) == 2 and all(t.isdigit() for t in first):
        return "word2vec"
    if len(first) > 2:
        return "glove"
    raise DataError(f"{path} is not a GloVe/word2vec text file, a word2vec binary or gensim KeyedVectors")


VECTOR_SUFFIXES = (".txt", ".gz", ".bin", ".vec", ".kv")


def _vector_file(source: Path) -> Path:
    """``source`` itself when it is a file; the one word-vector file in it when it is a folder."""
    if source.is_file():
        return source
    if not source.exists():
        raise DataError(f"word-vector file {source} does not exist")
    if not source.is_dir():
        raise DataError(f"{source} is not a regular file: give a word-vector file")
    found = sorted(p.name for p in source.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.name.endswith(VECTOR_SUFFIXES))
    if len(found) == 1:
        return source / found[0]
    if not found:
        raise DataError(f"{source} is a folder with no word-vector file in it ({', '.join(VECTOR_SUFFIXES)}): "
                        "give the file itself, e.g. glove.6B.300d.txt")
    shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
    raise DataError(f"{source} is a folder with {len(found)} word-vector files ({shown}): give one file, "
                    f"e.g. {source / found[0]}")


def _open_text(path: Path) -> Any:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8", errors="replace")  # type: ignore[operator]


def check_text_vectors(path: Path, fmt: str) -> None:
    """Refuse a GloVe/word2vec text file with a line of the wrong length, naming the line.

    Every line must be ``word v1 ... vd`` with the same ``d`` (that of the header for word2vec,
    of the first line for GloVe); a word2vec header's word count must match the lines.
    """
    dim = None
    header_words = None
    n = 0
    try:
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.rstrip("\r\n").rstrip(" ")
                if lineno == 1 and fmt == "word2vec":
                    head = line.split()
                    if len(head) != 2 or not all(t.isdigit() for t in head) or int(head[1]) < 1:
                        raise DataError(f"{path} line 1: a word2vec header must be two numbers, words and dimension")
                    header_words, dim = int(head[0]), int(head[1])
                    continue
                parts = line.count(" ") + 1
                if dim is None:
                    if parts < 2:
                        raise DataError(f"{path} line {lineno}: expected a word and its vector, got {line[:40]!r}")
                    dim = parts - 1
                elif parts != dim + 1:
                    raise DataError(f"{path} line {lineno}: {parts - 1} numbers after the word where the file has "
                                    f"{dim}; fix or remove that line")
                n += 1
    except (OSError, EOFError, UnicodeError) as e:
        raise DataError(f"cannot read word vectors {path}: {e}") from None
    if n == 0:
        raise DataError(f"{path} holds no word vectors")
    if header_words is not None and header_words != n:
        raise DataError(f"{path}: the word2vec header says {header_words} words but the file has {n}")


def _bad_number_line(path: Path, fmt: str) -> str:
    """Where a text vector file first holds a token that is not a finite number ('' when none)."""
    import math

    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if lineno == 1 and fmt == "word2vec":
                continue
            parts = line.rstrip("\r\n").rstrip(" ").split(" ")
            for tok in parts[1:]:
                try:
                    ok = math.isfinite(float(tok))
                except ValueError:
                    ok = False
                if not ok:
                    return f" (line {lineno}, word {parts[0][:40]!r}: {tok[:20]!r} is not a finite number)"
    return ""


def register_embedding(
    store: Store, source: Path, name: str | None = None, fmt: str = "auto", progress: Any = None
) -> Entry:
    """Load word vectors with gensim and keep them in the store in gensim's native format.

    ``fmt``: ``auto``, ``glove`` (text, no header), ``word2vec`` (text with header),
    ``word2vec-binary`` or ``kv`` (gensim KeyedVectors).  Vectors are L2-normalised on the way
    in and saved so that later loads are memory-mapped.  Registering the same file again under
    the same name is a no-op.
    """
    from gensim.models import KeyedVectors

    source = _vector_file(Path(source).expanduser())
    if name is None:
        name = re.sub(r"(\.txt|\.gz|\.bin|\.kv|\.vec)+$", "", source.name) or "embedding"
    fmt = _sniff_format(source) if fmt == "auto" else fmt
    inputs = {"source": FileDigests(store)(source), "format": fmt}
    if store.is_current("embeddings", name, inputs):
        return store.get("embeddings", name)
    task = progress.add_task(f"loading {source.name}", total=None) if progress is not None else None
    text = fmt in ("glove", "word2vec")
    if text:
        check_text_vectors(source, fmt)
    try:
        if fmt == "kv":
            kv = KeyedVectors.load(str(source))
        else:
            kv = KeyedVectors.load_word2vec_format(
                str(source), binary=fmt == "word2vec-binary", no_header=fmt == "glove", unicode_errors="ignore"
            )
    except Exception as e:
        where = _bad_number_line(source, fmt) if text else ""
        detail = " ".join(str(e).split())[:200]
        raise DataError(f"cannot parse {source} as {fmt} word vectors{where}: {type(e).__name__}: {detail}") from None
    vecs = np.asarray(kv.vectors, dtype=np.float32)
    if vecs.ndim != 2 or not len(vecs) or not vecs.shape[1]:
        raise DataError(f"{source} holds no word vectors")
    finite = np.isfinite(vecs).all(axis=1)
    if not finite.all():
        word = kv.index_to_key[int(np.flatnonzero(~finite)[0])]
        where = _bad_number_line(source, fmt) if text else f" (word {word!r})"
        raise DataError(f"{source} holds a vector that is not finite{where}; fix or remove it")
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    kv.vectors = vecs / np.maximum(norms, 1e-12)
    with store.writing(
        "embeddings",
        name,
        inputs=inputs,
        settings={"source": str(source.resolve()), "format": fmt},
        extra={"dim": int(kv.vector_size), "words": len(kv.index_to_key)},
    ) as tmp:
        kv.save(str(tmp / KV_FILE), sep_limit=0)
    if task is not None:
        progress.update(task, total=1, completed=1)
    return store.get("embeddings", name)


@dataclass
class Embedding:
    """Normalised word vectors in frequency order (for GloVe files)."""

    name: str
    words: list[str]
    vectors: np.ndarray  # (n, e) float32, L2-normalised, possibly memory-mapped
    index: dict[str, int] = field(repr=False)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def phrase_vector(self, phrase: str) -> np.ndarray | None:
        """The normalised mean of the known tokens' vectors, or ``None`` when none is known."""
        # A label disambiguated by its synset ("light (light.n.02)") is the words before it.
        key = re.sub(r"\s*\([^()]*\)\s*$", "", phrase).strip().lower() or phrase.strip().lower()
        if key in self.index:
            return np.asarray(self.vectors[self.index[key]], dtype=np.float32)
        toks = [t for t in re.split(r"[^a-z0-9]+", key) if t]
        rows = [self.index[t] for t in toks if t in self.index]
        if not rows:
            return None
        v = np.asarray(self.vectors[rows], dtype=np.float32).mean(0)
        return v / max(float(np.linalg.norm(v)), 1e-12)

    def phrase_vectors(self, phrases: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        """Vectors of the phrases that map, and the indices (into ``phrases``) of those that do."""
        vs, ok = [], []
        for i, p in enumerate(phrases):
            v = self.phrase_vector(p)
            if v is not None:
                vs.append(v)
                ok.append(i)
        mat = np.stack(vs) if vs else np.zeros((0, self.dim), np.float32)
        return mat.astype(np.float32), ok


class _SavedKeyedVectors:
    """What a KeyedVectors file holds, read back without gensim (see :func:`_read_keyed_vectors`)."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class _KeyedVectorsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "gensim.models.keyedvectors" and name == "KeyedVectors":
            return _SavedKeyedVectors
        if module.split(".")[0] in ("gensim", "scipy"):
            raise pickle.UnpicklingError(f"{module}.{name}")  # not the plain file of register_embedding
        return super().find_class(module, name)


def _read_keyed_vectors(path: Path) -> tuple[list[str], dict[str, int], np.ndarray] | None:
    """(words, index, memory-mapped vectors) of a KeyedVectors file saved by :func:`register_embedding`.

    The file is gensim's pickle with the vectors beside it in ``<file>.vectors.npy``; reading it
    here spares the import of gensim (seconds) on every command that loads a vocabulary.  None
    when the file holds anything else (then gensim reads it).
    """
    try:
        with open(path, "rb") as fh:
            kv = _KeyedVectorsUnpickler(fh).load()
        state = vars(kv) if isinstance(kv, _SavedKeyedVectors) else {}
        if (state.get("__numpys") != ["vectors"] or state.get("__scipys") or state.get("__recursive_saveloads")
                or "vectors" in state):
            return None
        words, index = state["index_to_key"], state["key_to_index"]
        vectors = np.load(f"{path}.vectors.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, pickle.UnpicklingError):
        return None
    if not (isinstance(words, list) and isinstance(index, dict) and vectors.ndim == 2 and len(vectors) == len(words)):
        return None
    return words, index, vectors


def load_embedding(store: Store, name: str | None = None) -> Embedding:
    """The named embedding, or the most recently registered one (its vectors memory-mapped)."""
    if name is None:
        latest = store.latest("embeddings")
        if latest is None:
            raise LaviseError(
                "no word vectors in the store: run `lavise download glove` "
                "(or `lavise download glove --from FILE` offline)"
            )
        name = latest.name
    entry = store.get("embeddings", name)
    saved = _read_keyed_vectors(entry.path / KV_FILE)
    if saved is not None:
        words, index, vectors = saved
        return Embedding(name=name, words=list(words), vectors=vectors, index=dict(index))
    from gensim.models import KeyedVectors

    kv = KeyedVectors.load(str(entry.path / KV_FILE), mmap="r")
    return Embedding(name=name, words=list(kv.index_to_key), vectors=kv.vectors, index=dict(kv.key_to_index))


# -- vocabulary -----------------------------------------------------------------------------

VOCAB_SOURCES = ("default", "concepts", "raw")


def visual_nouns() -> list[str]:
    """The shipped list of concrete, visual English nouns (built by scripts/build_vocab.py)."""
    text = resources.files("lavise_cli").joinpath("resources/visual_nouns.txt").read_text()
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


@dataclass
class Vocabulary:
    """The words (and phrases) an explanation may use, with their unit vectors."""

    source: str
    words: list[str]
    vectors: np.ndarray  # (V, e) float32 normalised
    size_limit: int | None = None

    @cached_property
    def index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "size": len(self.words), "size_limit": self.size_limit}


def build_vocabulary(
    emb: Embedding, concepts: Sequence[str], source: str = "default", size: int | None = None
) -> Vocabulary:
    """The explanation vocabulary.

    - ``default``: the reference concepts (phrases as mean vectors) plus the shipped visual nouns
      that are among the embedding's ``size`` most frequent words (default 30,000);
    - ``concepts``: the reference concepts only;
    - ``raw``: the concepts plus the embedding's ``size`` most frequent alphabetic words (default 20,000);
    - a path to a text file: one word or phrase per line (``#`` comments allowed).
    """
    if size is not None and size < 1:
        raise LaviseError("--vocab-size must be at least 1")
    words: list[str] = []
    seen: set[str] = set()

    def add(w: str) -> None:
        w = w.strip().lower()
        if w and w not in seen:
            seen.add(w)
            words.append(w)

    if source in VOCAB_SOURCES:
        for c in concepts:
            add(c)
        if source == "default":
            limit = size or 30000
            for w in visual_nouns():
                r = emb.index.get(w)
                if r is not None and r < limit:
                    add(w)
        elif source == "raw":
            limit = size or 20000
            n = 0
            for w in emb.words:
                if n >= limit:
                    break
                if w.isalpha():
                    add(w)
                    n += 1
        label, lim = source, (size if source != "concepts" else None)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise LaviseError(f"vocabulary file {source} does not exist (or use default, concepts, raw)")
        for ln in path.read_text(encoding="utf-8").splitlines():
            if ln.strip() and not ln.lstrip().startswith("#"):
                add(ln)
        if size:
            words = words[:size]
        label, lim = str(path.resolve()), size
    vecs, ok = emb.phrase_vectors(words)
    kept = [words[i] for i in ok]
    if not kept:
        raise LaviseError(f"no word of the vocabulary {source!r} is in the embedding {emb.name!r}")
    return Vocabulary(source=label, words=kept, vectors=vecs, size_limit=lim)
