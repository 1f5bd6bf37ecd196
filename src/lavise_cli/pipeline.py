"""The library calls behind `explain`, `evaluate` and `heatmap`, by their old home.

The work lives in :mod:`lavise_cli.session` (explainer + model + target set + its cached pass),
:mod:`lavise_cli.methods` (the method registry, ``run_explain``, ``evaluate_methods``) and
:mod:`lavise_cli.results` (result documents and where they are saved); this module re-exports
them so that existing imports keep working, and holds the image-masking pass.
"""

from __future__ import annotations

from typing import Any, Sequence

from .defaults import ALL_METHODS, METHODS
from .explain import parse_filters
from .methods import (DIVERSITY_S, check_word_settings, evaluate_methods, get_method, netdissect_words,
                      parse_methods, run_explain)
from .passes.image_masking import image_masking_inputs as masked_pass
from .results import explanation_doc, nan_to_none, result_path, save_result
from .session import (Session, check_filters, has_ground_truth, model_for, open_explainer, open_session,
                      training_overlap, vocabulary_for)


def image_masking_inputs(session: Session, filters: Sequence[int], p: int, batch: int = 64, progress: Any = None):
    """``z`` for (rows, filters): the image outside the filter's region set to the dataset mean, re-run.

    The pass is :func:`lavise_cli.passes.image_masking.image_masking_inputs` (cached beside the
    target pass); the returned function looks the pairs up.
    """
    pre = session.model.preprocess
    return masked_pass(session.cache, session.target.paths, session.model.module, session.meta["layer"], filters, p,
                       size=session.size, mean=pre.mean, std=pre.std, device=session.device,
                       precision=session.precision, batch=batch, progress=progress)


__all__ = ["METHODS", "ALL_METHODS", "Session", "open_explainer", "open_session", "vocabulary_for", "run_explain", "evaluate_methods",
           "parse_filters", "explanation_doc", "save_result", "netdissect_words", "image_masking_inputs",
           "check_filters", "check_word_settings", "get_method", "has_ground_truth", "model_for", "nan_to_none",
           "parse_methods", "result_path", "training_overlap", "DIVERSITY_S"]
