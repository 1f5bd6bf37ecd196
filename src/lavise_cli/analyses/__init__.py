"""Analyses built on explanations: what the questions users bring are answered with.

Each analysis runs its passes over images through the one pass runner, uses the explainer and
the methods as they are, and returns plain results that the CLI prints and pages draw:
comparisons of image groups and of models (paper §4.6, §4.5.5), class-relevant filters (Oramas
et al., ICLR 2019).  Nothing here is imported by the core pipeline.
"""

from __future__ import annotations

from .ablation import ablation_predictions, random_sets, zeroed  # noqa: E402
from .class_labels import Labels, category_labels, folder_labels, predicted_labels  # noqa: E402
from .group_compare import RowWords, compare_groups, group_statistics  # noqa: E402
from .image_groups import (Group, group_paths, make_groups, parse_group_specs, read_groups_file,  # noqa: E402
                           union_set)
from .lasso import Selection, lasso_select, standardise  # noqa: E402
from .model_compare import activation_correlation, compare_models, learned_concepts, match_filters  # noqa: E402
from .relevant import RelevantResult, relevant_filters, run_relevant  # noqa: E402
from .stats import benjamini_hochberg, fisher, proportion_test, z_test  # noqa: E402

__all__ = ["Group", "RowWords", "activation_correlation", "compare_groups", "compare_models", "group_paths",
           "group_statistics", "learned_concepts", "make_groups", "match_filters", "parse_group_specs",
           "read_groups_file", "union_set", "benjamini_hochberg", "fisher", "proportion_test", "z_test",
           "Labels", "RelevantResult", "Selection", "ablation_predictions", "category_labels", "folder_labels",
           "lasso_select", "predicted_labels", "random_sets", "relevant_filters", "run_relevant", "standardise",
           "zeroed"]
