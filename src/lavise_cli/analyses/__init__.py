"""Analyses built on explanations: what the questions users bring are answered with.

Each analysis runs its passes over images through the one pass runner, uses the explainer and
the methods as they are, and returns plain results that the CLI prints and pages draw:
comparisons of image groups and of models (paper §4.6, §4.5.5), class-relevant filters (Oramas
et al., ICLR 2019).  Nothing here is imported by the core pipeline.
"""

from __future__ import annotations

from .compare import (Group, RowWords, activation_correlation, compare_groups, compare_models, group_paths,  # noqa: E402
                      group_statistics, learned_concepts, make_groups, match_filters, parse_group_specs,
                      read_groups_file, union_set)
from .relevant import (Labels, RelevantResult, Selection, ablation_predictions, category_labels,  # noqa: E402
                       folder_labels, lasso_select, predicted_labels, random_sets, relevant_filters, run_relevant,
                       standardise, zeroed)
from .stats import benjamini_hochberg, fisher, proportion_test, z_test  # noqa: E402

__all__ = ["Group", "RowWords", "activation_correlation", "compare_groups", "compare_models", "group_paths",
           "group_statistics", "learned_concepts", "make_groups", "match_filters", "parse_group_specs",
           "read_groups_file", "union_set", "benjamini_hochberg", "fisher", "proportion_test", "z_test",
           "Labels", "RelevantResult", "Selection", "ablation_predictions", "category_labels", "folder_labels",
           "lasso_select", "predicted_labels", "random_sets", "relevant_filters", "run_relevant", "standardise",
           "zeroed"]
