"""Result documents of `explain` and `evaluate`, and where they are saved (the store's results folder)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .explain import Explanation, diversity
from .session import Session
from .store import atomic_write_json, stable_digest


def explanation_doc(session: Session, ex: Explanation) -> dict[str, Any]:
    concepts = set(session.meta["concepts"])
    vw = ex.vocabulary.words
    filters = []
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
                            "max_activation": float(session.cache.img_max[r, u]),
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


def result_path(session: Session, kind: str, key: Any, suffix: str = ".json", folder: str | None = None) -> Path:
    """``<explainer>/results/[folder/]<kind>-<digest of key>[suffix]``: the same settings, the same path."""
    d = session.results_dir() if folder is None else session.results_dir() / folder
    return d / f"{kind}-{stable_digest(key)[:12]}{suffix}"


def save_result(session: Session, kind: str, doc: dict[str, Any], key: dict[str, Any]) -> Path:
    """Write ``doc`` (NaN as null) to :func:`result_path` and return the path."""
    path = result_path(session, kind, key)
    atomic_write_json(path, nan_to_none(doc), compact=True)
    return path


def nan_to_none(x: Any) -> Any:
    """The document with every NaN float as None (JSON null)."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [nan_to_none(v) for v in x]
    return x


__all__ = ["explanation_doc", "result_path", "save_result", "nan_to_none"]
