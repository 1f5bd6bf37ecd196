"""Options shared by several commands (`explain`, `evaluate`, `heatmap`, `report`)."""

from __future__ import annotations

import typer

from ..defaults import DEFAULT_METHOD, DEFAULT_RANK, DEFAULT_RETRIEVAL, METHODS, RANKS, RETRIEVALS
from .common import PRECISION_HELP

EXPLAINER = typer.Option(None, "--explainer", "-e", help="Explainer name (default: the latest trained).")
DATASET = typer.Option([], "--dataset", help="Labelled target set(s) (default: the explainer's datasets).")
SPLIT = typer.Option(None, "--split", help="Split of the target dataset(s) (default: val; for a dataset without a "
                                          "train split, its held-out part `held-out`).")
VOCAB = typer.Option("default", "--vocab", help="default, concepts, raw, or a file with one word/phrase per line.")
VOCAB_SIZE = typer.Option(None, "--vocab-size", min=1,
                         help="Frequency rank limit of vocabulary words (default 30000).")
DEVICE = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda, cuda:N, mps.")
BATCH = typer.Option(32, "--batch-size", min=1, help="Images per batch in the target pass.")
PRECISION = typer.Option("auto", "--precision", help=PRECISION_HELP)
MODEL = typer.Option(None, "--model", help="Check that the explainer was trained for this model.")
LAYER = typer.Option(None, "--layer", help="Check that the explainer was trained for this layer.")
RETRIEVAL = typer.Option(DEFAULT_RETRIEVAL, "--retrieval",
                         help=f"Nearest-word search per image: {', '.join(RETRIEVALS)} (csls, centred and "
                              "inverted-softmax correct hub words; see docs/method.md).")
RANK = typer.Option(DEFAULT_RANK, "--rank", help=f"Order of a filter's words: {' or '.join(RANKS)} (specific: "
                    "against the word's mean count over the layer's filters; the count stays shown).")
METHOD = typer.Option(DEFAULT_METHOD, "--method", "-m", help=f"One of: {', '.join(METHODS)}.")
