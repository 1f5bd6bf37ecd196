"""Moved to :mod:`lavise_cli.passes.target` (and :mod:`lavise_cli.passes.stats`); kept as a re-export."""

from .passes.stats import QUANTILE, RunningTopK  # noqa: F401
from .passes.target import (  # noqa: F401
    IMAGE_EXTS,
    SHARD_IMAGES,
    TARGET_VERSION,
    ImageSet,
    LayerMaps,
    TargetCache,
    TargetSet,
    folder_target,
    labelled_target,
    target_pass,
)

__all__ = ["QUANTILE", "RunningTopK", "IMAGE_EXTS", "SHARD_IMAGES", "TARGET_VERSION", "ImageSet", "LayerMaps", "TargetCache", "TargetSet", "folder_target", "labelled_target", "target_pass"]
