"""The runtime policy (src/lavise_cli/runtime.py): device, precision and its place in caches and results.

``--precision auto`` resolves from the device and, on a CPU, from its flags (native bf16 =
AVX512-BF16 or AMX): both are faked here, so every branch runs on any machine.  Then the passes:
the resolved precision is part of every cache key (an fp32 and a bf16 pass never share a cache),
bf16 pooled features stay close to fp32 ones, and the CLI records the precision in its results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import assert_clear_error
from lavise_cli import runtime
from lavise_cli.data.index import load_index, preprocess
from lavise_cli.download import register_coco
from lavise_cli.embeddings import register_embedding
from lavise_cli.errors import LaviseError
from lavise_cli.features import feature_key, reference_features
from lavise_cli.models import load_model
from lavise_cli.runtime import autocast, cpu_native_bf16, resolve_precision
from lavise_cli.store import Store
from lavise_cli.target import labelled_target, target_pass

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

FACTORY = """
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.feat = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.feat(torch.relu(self.conv(x)))).mean((2, 3)))


def build():
    return Tiny(), {"input_size": 32}
"""


# ----------------------------------------------------------------------------------------------
# Resolution
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, want", [
    ({"sse4_2", "avx2", "avx512f"}, "fp32"),  # AVX-512 without its bf16 extension: emulated, slow
    ({"avx2", "avx512f", "avx512_bf16"}, "bf16"),
    ({"avx2", "amx_tile", "amx_bf16"}, "bf16"),
    (set(), "fp32"),
])
def test_auto_on_the_cpu_is_bf16_only_with_native_bf16(monkeypatch: pytest.MonkeyPatch, flags: set[str],
                                                       want: str) -> None:
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: frozenset(flags))
    assert cpu_native_bf16() is (want == "bf16")
    assert cpu_native_bf16(flags) is (want == "bf16")
    assert resolve_precision("auto", "cpu") == want
    assert resolve_precision(None, torch.device("cpu")) == want
    # an explicit choice is kept whatever the CPU
    for p in ("fp32", "bf16", "fp16"):
        assert resolve_precision(p, "cpu") == p
        assert resolve_precision(p.upper(), "cpu") == p


def test_auto_on_cuda_is_bf16_where_supported_else_fp16_and_fp32_on_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: frozenset({"avx512_bf16"}))  # irrelevant on a GPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("auto", "cuda:1") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda") == "fp16"
    assert resolve_precision("fp16", "cuda") == "fp16"
    with pytest.raises(LaviseError, match="no bf16 support"):
        resolve_precision("bf16", "cuda")
    assert resolve_precision("auto", "mps") == "fp32"


def test_unknown_precision_is_one_clear_error() -> None:
    with pytest.raises(LaviseError, match="unknown precision 'fp8'; use auto, fp32, bf16, fp16"):
        resolve_precision("fp8", "cpu")


def test_autocast_runs_convolutions_in_the_resolved_dtype() -> None:
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    with torch.inference_mode():
        with autocast("cpu", "fp32") as p:
            assert p == "fp32" and conv(x).dtype == torch.float32
        with autocast(torch.device("cpu"), "bf16") as p:
            assert p == "bf16" and conv(x).dtype == torch.bfloat16
        assert conv(x).dtype == torch.float32  # restored


# ----------------------------------------------------------------------------------------------
# The passes: precision in the cache keys, bf16 close to fp32
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def toy(tmp_path: Path, make_coco: Any, small_glove: Path) -> dict[str, Any]:
    root = make_coco(split="train")
    make_coco(root, split="val")
    st = Store(tmp_path / "home")
    register_coco(st, root, "toy")
    register_embedding(st, small_glove, name="g16")
    preprocess(st, "toy", embedding="g16", workers=1)
    return {"store": st, "index": load_index(st, "toy"), "root": root}


def test_fp32_and_bf16_feature_passes_have_their_own_caches_and_agree(toy: dict[str, Any]) -> None:
    st, ix = toy["store"], toy["index"]
    split = ix.splits["train"]
    model = load_model("resnet18", "none", input_size=64)
    f32 = reference_features(st, model, ["layer4"], split, ix.digest, precision="fp32", workers=0)["layer4"]
    b16 = reference_features(st, model, ["layer4"], split, ix.digest, precision="bf16", workers=0)["layer4"]
    assert not f32.hit and not b16.hit, "bf16 must not reuse the fp32 cache"
    assert f32.key != b16.key
    assert f32.key == feature_key(model, "layer4", split, ix.digest, [runtime_view()], "fp32")
    assert b16.key == feature_key(model, "layer4", split, ix.digest, [runtime_view()], "bf16")
    assert st.manifest("features", b16.key)["inputs"]["precision"] == "bf16"
    assert st.manifest("features", f32.key)["inputs"]["precision"] == "fp32"
    again = reference_features(st, model, ["layer4"], split, ix.digest, precision="fp32", workers=0)["layer4"]
    assert again.hit and torch.equal(again.z, f32.z)
    # the same pairs in the same order; bf16 really ran (not equal) and stays close to fp32
    for k in ("image", "concept", "view"):
        assert torch.equal(getattr(f32, k), getattr(b16, k))
    a, b = f32.z.float(), b16.z.float()
    assert not torch.equal(a, b)
    rel = float((a - b).norm() / a.norm())
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    assert rel < 0.02, rel
    assert float(cos.min()) > 0.999, float(cos.min())


def runtime_view() -> Any:
    from lavise_cli.data.images import View

    return View()


def test_fp32_and_bf16_target_passes_have_their_own_caches(toy: dict[str, Any]) -> None:
    st, ix = toy["store"], toy["index"]
    model = load_model("resnet18", "none", input_size=64)
    target = labelled_target([ix], "val")
    c32 = target_pass(st, model, "layer4", target, precision="fp32", workers=0)
    c16 = target_pass(st, model, "layer4", target, precision="bf16", workers=0)
    assert not c32.hit and not c16.hit and c32.root != c16.root
    assert st.manifest("targets", c16.root.name)["inputs"]["precision"] == "bf16"
    assert target_pass(st, model, "layer4", target, precision="fp32", workers=0).hit
    m32, m16 = c32.maps(range(c32.n)), c16.maps(range(c16.n))
    assert not torch.equal(m32, m16)
    assert float((m32 - m16).norm() / m32.norm()) < 0.02


# ----------------------------------------------------------------------------------------------
# The command line: --precision on every command that runs the backbone, recorded in results
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [
    ["train", "resnet18", "toy"],
    ["explain", "--filters", "0"],
    ["evaluate"],
    ["heatmap", "--filters", "0"],
    ["report"],
])
def test_every_backbone_command_takes_precision(cli: Any, command: list[str]) -> None:
    res = cli(*command, "--help")
    assert res.exit_code == 0 and "--precision" in res.stdout


def test_bad_precision_is_one_clear_line(cli: Any) -> None:
    assert_clear_error(cli("train", "resnet18", "toy", "--precision", "half"), "unknown precision 'half'")


def test_precision_is_recorded_in_train_explain_and_evaluate_results(cli: Any, toy: dict[str, Any],
                                                                     tmp_path: Path) -> None:
    # the `cli` fixture's home is the toy store
    assert Path(cli.home) == toy["store"].root
    factory = tmp_path / "tiny_net.py"
    factory.write_text(FACTORY)
    tr = cli.json("train", f"{factory}:build", "toy", "--epochs", "1", "--workers", "0", "--device", "cpu",
                  "--precision", "bf16", "--name", "tiny")
    assert tr["precision"] == "bf16"
    assert load_meta(toy["store"], "tiny")["precision"] == "bf16"
    ev = cli.json("evaluate", "--precision", "bf16", "--vocab", "concepts", "--device", "cpu")
    assert ev["precision"] == "bf16"
    saved = json.loads(Path(ev["per_filter_saved"]).read_text())
    assert saved["precision"] == "bf16"
    ex = cli.json("explain", "-f", "0", "--precision", "bf16", "--device", "cpu")
    assert ex["precision"] == "bf16"
    # the default on this CPU is its own resolved precision, in its own result file
    ex_auto = cli.json("explain", "-f", "0", "--device", "cpu")
    assert ex_auto["precision"] == resolve_precision("auto", "cpu")
    if ex_auto["precision"] != "bf16":
        assert ex_auto["saved"] != ex["saved"]


def load_meta(store: Store, name: str) -> dict[str, Any]:
    from lavise_cli.explainer import EXPLAINER_FILE, load_explainer

    return load_explainer(store.path("explainers", name) / EXPLAINER_FILE).meta
