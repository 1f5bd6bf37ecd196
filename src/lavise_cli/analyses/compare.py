"""Comparisons built on explanations (paper §4.6 and §4.5.5).

- :func:`compare_groups`: which filters fire on one group of images more often than on another.
  One target pass over the union of the groups' images (an :class:`~lavise_cli.passes.target.ImageSet`
  cached like any target set); per filter ``u`` the threshold ``T_u`` is the 0.995 quantile over
  the union (the pass's own threshold); an image is *qualified* for ``u`` when its maximum
  activation reaches ``T_u`` (ties count, as for regions); per group the share of qualified
  images; per pair of groups the difference of shares, a two-sided test of equal proportions
  and Benjamini-Hochberg q-values over every test; each listed filter's words come from filter
  attention over its qualified images in the group it favours.
- :func:`compare_models`: what two explainers' models learned on the same target set with the
  same vocabulary: learned concepts (distinct top-1 words over active filters), shared and
  own concepts, and for two models of one architecture, filters matched by the correlation of
  their per-image maximum activations (Hungarian matching, ``scipy.optimize.linear_sum_assignment``).

A difference of shares is an association in the data, not a cause (docs/compare.md).

The code lives in :mod:`.image_groups` (making the groups), :mod:`.group_compare` and
:mod:`.model_compare`; their names are importable from here as before.
"""

from __future__ import annotations

from .group_compare import RowWords, compare_groups, group_statistics
from .image_groups import Group, group_paths, make_groups, parse_group_specs, read_groups_file, union_set
from .model_compare import activation_correlation, compare_models, learned_concepts, match_filters

__all__ = ["Group", "group_paths", "parse_group_specs", "read_groups_file", "make_groups", "union_set", "RowWords",
           "group_statistics", "compare_groups", "learned_concepts", "activation_correlation", "match_filters",
           "compare_models"]
