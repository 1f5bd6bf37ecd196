"""The method registry (src/lavise_cli/methods.py) and the session/results split of the pipeline.

Every registered method runs through ``evaluate_methods`` on the small trained fixture of
test_explain.py; an unknown name gets one clear error listing the names; no module outside the
registry names a method in code; the command line reads no explainer internals.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest

from conftest import assert_clear_error
from lavise_cli.defaults import ALL_METHODS, METHODS
from lavise_cli.errors import LaviseError
from lavise_cli.methods import REGISTRY, evaluate_methods, get_method, parse_methods, run_explain
from lavise_cli.results import result_path, save_result
from lavise_cli.session import check_filters, open_session, vocabulary_for
from test_explain import run_cli, trained  # noqa: F401  (the module-scoped trained fixture)

SRC = Path(__file__).resolve().parents[1] / "src" / "lavise_cli"


def test_registry_names_are_the_defaults_lists() -> None:
    assert tuple(REGISTRY) == ALL_METHODS
    assert {n for n, m in REGISTRY.items() if m.explain} == set(METHODS)
    assert [n for n, m in REGISTRY.items() if not m.explain] == ["frequency"]
    assert {n for n, m in REGISTRY.items() if not m.needs_explainer} == {"netdissect", "frequency"}
    assert parse_methods("all") == list(ALL_METHODS)
    assert parse_methods(" original, attention ") == ["original", "attention"]


def test_unknown_method_one_clear_error_listing_the_names() -> None:
    with pytest.raises(LaviseError) as e:
        get_method("telepathy")
    msg = str(e.value)
    assert "'telepathy'" in msg and "\n" not in msg
    assert all(n in msg for n in ALL_METHODS)
    with pytest.raises(LaviseError, match="or all"):
        parse_methods("attention,telepathy")
    # explain does not offer the evaluate-only frequency prior; its error lists what explain offers.
    with pytest.raises(LaviseError) as e:
        get_method("frequency", explain=True)
    assert str(e.value) == f"unknown method 'frequency'; choose from {', '.join(METHODS)}"
    assert get_method("frequency").name == "frequency"


def test_every_registered_method_runs_through_evaluate(trained: dict[str, Any]) -> None:  # noqa: F811
    ses = open_session(trained["store"], device="cpu", workers=0)
    vocab = vocabulary_for(ses, "concepts")
    res = evaluate_methods(ses, list(REGISTRY), vocab, cuts=(1, 3), p=3, filters=[0, 1, 2])
    assert list(res["methods"]) == list(REGISTRY)
    assert set(res["per_filter"]) == set(REGISTRY)
    for name, r in res["methods"].items():
        assert r["filters"] >= 1 and r["pairs"] >= 1, name
        for s in (1, 3):
            for mean in ("pair_mean", "filter_mean"):
                v = r[f"recall@{s}"][mean]
                assert v is None or 0.0 <= v <= 1.0, (name, s, mean, v)  # NaN cleaned to None
        assert r["recall@1"]["pair_mean"] <= r["recall@3"]["pair_mean"], name
    # The methods explain offers, directly: each names words for every asked filter.
    for name, m in REGISTRY.items():
        if not m.explain:
            continue
        ex = run_explain(ses, [0, 2], name, vocab, p=3, s=2, k=2)
        assert ex.method == name and ex.filters == [0, 2] and ex.image_words.shape == (2, 3, 2), name


def test_netdissect_and_frequency_need_labels(trained: dict[str, Any]) -> None:  # noqa: F811
    ses = open_session(trained["store"], images=trained["images"], device="cpu", workers=0)
    vocab = vocabulary_for(ses, "concepts")
    with pytest.raises(LaviseError, match="netdissect needs a labelled target set"):
        run_explain(ses, [0], "netdissect", vocab, p=2, s=2, k=2)
    with pytest.raises(LaviseError, match="unknown method 'frequency'"):
        run_explain(ses, [0], "frequency", vocab, p=2, s=2, k=2)


def test_cli_refuses_explain_method_frequency(trained: dict[str, Any]) -> None:  # noqa: F811
    home = trained["home"]
    line = assert_clear_error(run_cli(home, "-q", "explain", "-f", "0", "--method", "frequency"),
                              "unknown method 'frequency'", "choose from attention")
    assert "frequency" not in line.split("choose from")[1]
    assert_clear_error(run_cli(home, "-q", "heatmap", "-f", "0", "--method", "frequency"), "unknown method 'frequency'")


def test_filters_checked_and_results_saved_by_the_library(trained: dict[str, Any]) -> None:  # noqa: F811
    store = trained["store"]
    ses = open_session(store, device="cpu", workers=0)
    assert ses.filters == ses.cache.shape[0] == ses.explainer.filters
    assert check_filters(store, None, "0-2") == [0, 1, 2]
    with pytest.raises(LaviseError, match=f"this layer has {ses.filters} filters"):
        check_filters(store, None, str(ses.filters))
    key = {"x": 1}
    path = save_result(ses, "probe", {"r": float("nan"), "v": [1.5, float("nan")]}, key)
    assert path == result_path(ses, "probe", key) and path.parent == ses.results_dir()
    assert json.loads(path.read_text()) == {"r": None, "v": [1.5, None]}  # valid JSON: NaN as null
    assert result_path(ses, "probe", key) != result_path(ses, "probe", {"x": 2})
    assert result_path(ses, "m", key, suffix="", folder="heatmaps").parent.name == "heatmaps"


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of a module that are not docstrings."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_no_method_name_in_code_outside_the_registry() -> None:
    allowed = {SRC / "methods.py", SRC / "defaults.py"}
    hits = [f"{p.relative_to(SRC)}:{line}: {s!r}" for p in sorted(SRC.rglob("*.py")) if p not in allowed
            for line, s in _code_strings(p) if s in ALL_METHODS]
    assert hits == []


def test_cli_reads_no_explainer_internals() -> None:
    for p in sorted((SRC / "cli").glob("*.py")):
        text = p.read_text()
        assert "meta[" not in text, p.name
        assert "stable_digest" not in text and "nan_to_none" not in text, p.name
        assert "from .explain_cmd import" not in text, p.name  # shared options live in cli/options.py
