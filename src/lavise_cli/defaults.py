"""Names and defaults the command line needs before any heavy module (torch) is imported.

`lavise --version` and `lavise --help` build every command's options from these, so this module
imports nothing but the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass

# The explanation methods of `lavise explain` (explain.py) and what `lavise evaluate` scores (methods.py).
METHODS = ("attention", "original", "activation-masking", "image-masking", "netdissect")
ALL_METHODS = ("attention", "activation-masking", "image-masking", "original", "netdissect", "frequency")
# What each method does and needs: lavise_cli.methods (the registry these names must match).
DEFAULT_METHOD = METHODS[0]
# Nearest-word search per image and the order of a filter's words (explain.py; docs/method.md,
# "Words that tell filters apart"; the defaults were picked by benchmarks/word_specificity.py).
RETRIEVALS = ("cosine", "csls", "centred", "inverted-softmax")
RANKS = ("count", "specific")
DEFAULT_RETRIEVAL = "cosine"
DEFAULT_RANK = "specific"


@dataclass
class TrainSettings:
    """Defaults: AdamW, lr 1e-3, weight decay 1e-2, batch 256, up to 60 epochs, patience 10."""

    epochs: int = 60
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 256
    patience: int = 10
    val_fraction: float = 0.1
    margin: float = 1.0
    seed: int = 0
    seen_fraction: float | None = None  # train on the seen concepts only
