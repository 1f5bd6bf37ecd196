"""Result documents of `explain` and `evaluate`, and where they are saved (the store's results folder)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import __version__
from .embeddings import Vocabulary
from .explain import Explanation, diversity
from .session import Session
from .store import FileDigests, atomic_write_json, stable_digest

# The modules whose code decides an explanation's words and images: a saved explanation is reused
# only while none of them changed (see :func:`explanation_inputs`).
_EXPLAINING_CODE = ("explain.py", "methods.py", "results.py", "evaluate.py", "embeddings.py", "explainer.py",
                    "pipeline.py", "passes/image_masking.py", "passes/target.py")
INPUTS_FIELD = "inputs"  # the saved document's digest of its inputs (on disk only)


def explanation_doc(session: Session, ex: Explanation) -> dict[str, Any]:
    concepts = set(session.meta["concepts"])
    vw = ex.vocabulary.words
    filters = []
    # every top image's maximum, read in one pass over the shards that hold them
    p = ex.top_rows.shape[1]
    peaks = session.cache.max_at(ex.top_rows.reshape(-1),
                                 torch.as_tensor(list(ex.filters), dtype=torch.long).repeat_interleave(p)).view(-1, p)
    for j, u in enumerate(ex.filters):
        rows = ex.top_rows[j].tolist()
        extra = ex.word_scores[j] if ex.word_scores else [(float("nan"), float("nan"))] * len(ex.words[j])
        conf = ex.confidence[j] if ex.confidence else {}
        filters.append({
            "filter": u,
            "inactive": bool(ex.inactive[j]),
            "threshold": float(session.cache.threshold[u]),
            # agreement of the top images on the top word x its specificity (explain.filter_confidence)
            "confidence": conf.get("confidence"),
            "agreement": conf.get("agreement"),
            "top_word_specificity": conf.get("specificity"),
            # similarity_sum: the word's cosine similarity summed over the images naming it (so it
            # can exceed 1); "similarity" is the same number under its old name, kept for compatibility.
            "words": [{"word": w, "images": c, "similarity_sum": round(sim, 4), "similarity": round(sim, 4),
                       "novel": w not in concepts, "specificity": round(sp, 4), "layer_mean": round(m, 4)}
                      for (w, c, sim), (sp, m) in zip(ex.words[j], extra)],
            "top_images": [{"row": r, "path": str(session.target.paths[int(session.cache.rows[r])]),
                            "max_activation": float(peaks[j, q]),
                            "words": [vw[i] for i in ex.image_words[j, q].tolist()]} for q, r in enumerate(rows)],
        })
    return {
        "explainer": session.entry.name,
        "model": session.meta["model"],
        "layer": session.meta["layer"],
        "method": ex.method,
        "precision": session.precision,
        "target": session.target.description,
        "target_images": session.cache.n,
        "target_images_trained_on": session.overlap,
        "vocabulary": ex.vocabulary.describe(),
        "settings": ex.settings,
        "background_filters": ex.background_filters,
        "diversity": diversity(ex.words, ex.inactive),
        "filters": filters,
    }


def explanation_key(session: Session, vocab: Vocabulary, filters: Sequence[int], settings: dict[str, Any]
                    ) -> dict[str, Any]:
    """What names an explanation's result file (``explain``, ``heatmap`` and ``report`` share it)."""
    return {"target": session.target.key, "vocab": vocab.describe(), "filters": list(filters), **settings,
            "precision": session.precision}


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    root = Path(__file__).resolve().parent
    h = hashlib.sha256(__version__.encode())
    for name in _EXPLAINING_CODE:
        with contextlib.suppress(OSError):
            h.update(name.encode() + b"\0" + (root / name).read_bytes())
    return h.hexdigest()


def explanation_inputs(session: Session, vocab: Vocabulary) -> str:
    """A digest of what an explanation depends on beyond its result key.

    The explainer's file, the cached maps it reads (their entry, as published), the vocabulary's
    words and vectors (so an edited word list or re-registered embedding counts), and lavise's
    explaining code.  :func:`load_result` reuses a saved document only when this matches.
    """
    h = hashlib.sha256()
    h.update(FileDigests(session.store)(session.explainer.path).encode())
    root = Path(session.cache.root)
    try:
        published = (root / "manifest.json").stat().st_mtime_ns
    except OSError:
        published = 0
    h.update(f"|{root.resolve()}|{published}|".encode())
    h.update("\n".join(vocab.words).encode())
    h.update(np.ascontiguousarray(vocab.vectors, dtype=np.float32).tobytes())
    h.update(_code_digest().encode())
    return h.hexdigest()


def result_path(session: Session, kind: str, key: Any, suffix: str = ".json", folder: str | None = None) -> Path:
    """``<explainer>/results/[folder/]<kind>-<digest of key>[suffix]``: the same settings, the same path."""
    d = session.results_dir() if folder is None else session.results_dir() / folder
    return d / f"{kind}-{stable_digest(key)[:12]}{suffix}"


def save_result(session: Session, kind: str, doc: dict[str, Any], key: dict[str, Any], inputs: str | None = None
                ) -> Path:
    """Write ``doc`` (NaN as null) to :func:`result_path` and return the path.

    ``inputs`` (:func:`explanation_inputs`) is saved with it, so that :func:`load_result` can reuse it.
    """
    path = result_path(session, kind, key)
    atomic_write_json(path, nan_to_none(doc if inputs is None else {**doc, INPUTS_FIELD: inputs}), compact=True)
    return path


def load_result(session: Session, kind: str, key: dict[str, Any], inputs: str) -> dict[str, Any] | None:
    """The document :func:`save_result` wrote for ``key`` from the same ``inputs``; None when there is none."""
    path = result_path(session, kind, key)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.pop(INPUTS_FIELD, None) != inputs:
        return None
    return doc


def nan_to_none(x: Any) -> Any:
    """The document with every NaN float as None (JSON null)."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [nan_to_none(v) for v in x]
    return x


__all__ = ["explanation_doc", "explanation_key", "explanation_inputs", "result_path", "save_result", "load_result",
           "nan_to_none"]
