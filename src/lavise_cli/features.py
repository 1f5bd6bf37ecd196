"""Moved to :mod:`lavise_cli.passes.features`; kept as a re-export."""

from .passes.features import (  # noqa: F401
    FEATURES_VERSION,
    SHARD_PAIRS,
    PairFeatures,
    feature_grids,
    feature_key,
    pooled_masked,
    reference_features,
)

__all__ = ["FEATURES_VERSION", "SHARD_PAIRS", "PairFeatures", "feature_grids", "feature_key", "pooled_masked", "reference_features"]
