"""lavise-cli: explain what the filters of a convolutional network have learned, in words.

An implementation of LaViSE (Yang et al., CVPR 2022).  The command line (``lavise``) is a thin
shell over the functions re-exported here, so that a notebook can do everything it does::

    from lavise_cli import Store, train, open_session, vocabulary_for, run_explain, evaluate_methods

    store = Store()                                   # or Store("/path/to/home")
    train(store, "resnet18", ["coco"])                # one cached backbone pass, then the explainer
    session = open_session(store)                     # latest explainer + its val split, cached
    vocab = vocabulary_for(session)                   # concepts + shipped visual nouns
    words = run_explain(session, [150, 275], "attention", vocab, p=25, s=5, k=5).words
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# torch's OpenMP threads busy-wait at every sync point; when the other cores are busy that costs
# 5-40x on small tensor work (measured in benchmarks/). Passive waiting, unless the user chose.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

_EXPORTS = {
    "Store": "store",
    "LaviseError": "errors",
    "DataError": "errors",
    "register_embedding": "embeddings",
    "load_embedding": "embeddings",
    "build_vocabulary": "embeddings",
    "register_coco": "data.register",
    "register_vg": "data.register",
    "register_broden": "data.register",
    "remove_dataset": "data.register",
    "download_dataset": "download",
    "download_glove": "download",
    "download_weights": "download",
    "preprocess": "data.index",
    "load_index": "data.index",
    "register_instances_file": "data.index",
    "load_model": "models",
    "layer_shapes": "layers",
    "default_layer": "layers",
    "reference_features": "passes.features",
    "run_pass": "passes.runner",
    "train": "train",
    "TrainSettings": "train",
    "Explainer": "explainer",
    "load_explainer": "explainer",
    "target_pass": "passes.target",
    "ImageSet": "passes.target",
    "LayerMaps": "passes.target",
    "RunningTopK": "passes.stats",
    "open_session": "session",
    "vocabulary_for": "session",
    "run_explain": "methods",
    "evaluate_methods": "methods",
    "explanation_doc": "results",
    "explain_filters": "explain",
    "parse_filters": "explain",
    "recall_at": "evaluate",
    "render_heatmap": "visualize",
    "heatmap_paths": "visualize",
    "build_report": "visualize",
    "highlight": "visualize",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:  # lazy, so `import lavise_cli` stays cheap
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'lavise_cli' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
