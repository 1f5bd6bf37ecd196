"""Target models and layers (src/lavise_cli/models.py) and their errors through the CLI.

torchvision weights cannot be downloaded here: every torchvision model is built with
``weights="none"`` (seeded random init).  Users' factories are small modules written to
``tmp_path``, imported by file path and by dotted module name.
"""

from __future__ import annotations

import json
import sys
import textwrap
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from lavise_cli.errors import LaviseError
from lavise_cli.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    capture,
    default_layer,
    forward_to,
    layer_shapes,
    load_model,
    resolve_layer,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

FACTORY_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.body(x)), 1))


    def build():
        torch.manual_seed(0)
        return Net()


    def build_pre():
        torch.manual_seed(0)
        return Net(), {"input_size": 48, "mean": (0.5, 0.4, 0.3), "std": (0.25, 0.2, 0.15)}


    def noisy():
        print("hello from the factory")
        torch.manual_seed(0)
        return Net()


    def boom():
        raise RuntimeError("kaboom in the factory")


    def not_module():
        return 42


    value = 3
    """
)


@pytest.fixture
def factory_file(tmp_path: Path) -> Path:
    path = tmp_path / "user_models" / "my_factory.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(FACTORY_SOURCE)
    return path


@pytest.fixture(scope="module")
def r18() -> nn.Module:
    """resnet18, random init (read only)."""
    return load_model("resnet18", "none").module


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg.strip() and "\n" not in msg, f"not one line: {msg!r}"
    assert "Traceback" not in msg
    return msg


# ------------------------------------------------------------------------------------------
# torchvision models by name, layers
# ------------------------------------------------------------------------------------------


def test_load_torchvision_model_with_no_weights_is_frozen_seeded_and_default_preprocessed() -> None:
    a = load_model("resnet18", "none")
    b = load_model("resnet18", "none")
    assert isinstance(a.module, torchvision.models.ResNet)
    assert a.name == "resnet18" and a.weights == "none"
    assert not a.module.training
    assert all(not p.requires_grad for p in a.module.parameters())
    # seeded random init: the same weights (and digest) every time
    assert a.weights_digest == b.weights_digest
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (a.preprocess.input_size, a.preprocess.mean, a.preprocess.std) == (224, IMAGENET_MEAN, IMAGENET_STD)
    c = load_model("resnet18", "none", input_size=96, mean=(0.5, 0.5, 0.5), std=(0.2, 0.3, 0.4))
    assert (c.preprocess.input_size, c.preprocess.mean, c.preprocess.std) == (96, (0.5, 0.5, 0.5), (0.2, 0.3, 0.4))


def test_weights_file_of_the_right_architecture_is_loaded(tmp_path: Path) -> None:
    net = torchvision.models.resnet18()
    with torch.no_grad():
        net.fc.weight.fill_(0.25)
    path = tmp_path / "r18.pt"
    torch.save(net.state_dict(), path)
    tm = load_model("resnet18", str(path))
    sd = tm.module.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in net.state_dict().items())
    assert tm.weights == str(path.resolve())
    assert tm.weights_digest != load_model("resnet18", "none").weights_digest


def test_default_layer_of_resnet18_is_layer4(r18: nn.Module) -> None:
    assert default_layer(r18, 64) == "layer4"


@pytest.mark.parametrize("arch", ["vgg11", "alexnet"])
def test_default_layer_of_vgg_and_alexnet_is_features(arch: str) -> None:
    # Shapes only: build on the meta device and allocate without the (slow) random init.
    with torch.device("meta"):
        net = torchvision.models.get_model(arch, weights=None)
    net = net.to_empty(device="cpu").eval()
    assert default_layer(net, 224) == "features"


def test_layer_shapes_of_resnet18(r18: nn.Module) -> None:
    listed = layer_shapes(r18, 64)
    shapes = dict(listed)
    assert shapes["conv1"] == (64, 32, 32)
    assert shapes["layer1"] == (64, 16, 16)
    assert shapes["layer2"] == (128, 8, 8)
    assert shapes["layer3"] == (256, 4, 4)
    assert shapes["layer4"] == (512, 2, 2)
    assert shapes["layer4.1.conv2"] == (512, 2, 2)
    assert shapes["avgpool"] == (512, 1, 1)
    assert shapes["fc"] == (1000,)
    names = [n for n, _ in listed]
    assert names.index("layer3") < names.index("layer4") < names.index("fc")


def test_capture_returns_the_named_layer_output(r18: nn.Module) -> None:
    net = r18
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture(net, ["layer3", "layer4"]) as feats:
        net(x)
        direct = net.layer4(feats["layer3"])
    assert feats["layer3"].shape == (2, 256, 4, 4)
    torch.testing.assert_close(feats["layer4"], direct)


# ------------------------------------------------------------------------------------------
# Users' factories
# ------------------------------------------------------------------------------------------


def test_factory_by_file_path(factory_file: Path) -> None:
    tm = load_model(f"{factory_file}:build")
    assert type(tm.module).__name__ == "Net"
    assert not tm.module.training and all(not p.requires_grad for p in tm.module.parameters())
    assert tm.weights == "factory"
    assert tm.preprocess.input_size == 224 and tm.preprocess.mean == IMAGENET_MEAN
    assert default_layer(tm.module, 32) == "body"
    assert dict(layer_shapes(tm.module, 32))["body"] == (6, 16, 16)


def test_factory_by_package_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = f"lavise_test_pkg_{uuid.uuid4().hex[:8]}"
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / pkg / "nets.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        tm = load_model(f"{pkg}.nets:build_pre")
        assert type(tm.module).__name__ == "Net"
        assert tm.name == f"{pkg}.nets:build_pre"
    finally:
        for mod in [m for m in sys.modules if m == pkg or m.startswith(pkg + ".")]:
            sys.modules.pop(mod, None)


def test_factory_preprocessing_is_used_and_options_override_it(factory_file: Path) -> None:
    tm = load_model(f"{factory_file}:build_pre")
    assert tm.preprocess.input_size == 48
    assert tm.preprocess.mean == (0.5, 0.4, 0.3)
    assert tm.preprocess.std == (0.25, 0.2, 0.15)
    tm2 = load_model(f"{factory_file}:build_pre", input_size=32, mean=(0.1, 0.1, 0.1))
    assert (tm2.preprocess.input_size, tm2.preprocess.mean, tm2.preprocess.std) == (32, (0.1, 0.1, 0.1),
                                                                                   (0.25, 0.2, 0.15))


def test_printing_factory_does_not_write_to_stdout(factory_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tm = load_model(f"{factory_file}:noisy")
    captured = capsys.readouterr()
    assert isinstance(tm.module, nn.Module)
    assert captured.out == ""
    assert "hello from the factory" in captured.err


def test_printing_factory_keeps_json_parseable(factory_file: Path, cli: Any) -> None:
    doc = cli.json("layers", f"{factory_file}:noisy", "--input-size", "32")
    assert doc["default"] == "body"
    assert {"name": "body", "shape": [6, 16, 16]} in doc["layers"]


# ------------------------------------------------------------------------------------------
# Errors: one clear LaviseError line
# ------------------------------------------------------------------------------------------


def test_unknown_model_lists_near_names() -> None:
    with pytest.raises(LaviseError) as ei:
        load_model("resnet19", "none")
    msg = _one_line(ei.value)
    assert "resnet19" in msg and "resnet18" in msg


def test_unknown_layer_lists_nearest_names(r18: nn.Module) -> None:
    net = r18
    with pytest.raises(LaviseError) as ei:
        resolve_layer(net, "layer5")
    msg = _one_line(ei.value)
    assert "layer5" in msg and "layer4" in msg
    with pytest.raises(LaviseError) as ei:
        resolve_layer(net, "layr3.0")
    assert "layer3.0" in _one_line(ei.value)
    with pytest.raises(LaviseError):
        with capture(net, ["nope"]):
            pass


@pytest.mark.parametrize(
    ("attr", "expect"),
    [
        ("nothere", "nothere"),  # missing attribute
        ("value", "value"),  # not callable
        ("boom", "kaboom in the factory"),  # the factory raises
        ("not_module", "int"),  # returns something that is no nn.Module
    ],
)
def test_bad_factory_is_one_clear_error(factory_file: Path, attr: str, expect: str) -> None:
    with pytest.raises(LaviseError) as ei:
        load_model(f"{factory_file}:{attr}")
    assert expect in _one_line(ei.value)


def test_missing_factory_file_and_module_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(LaviseError) as ei:
        load_model(f"{tmp_path / 'nowhere.py'}:build")
    msg = _one_line(ei.value)
    assert "nowhere.py" in msg and "does not exist" in msg
    with pytest.raises(LaviseError) as ei:
        load_model("lavise_no_such_package_zz.nets:build")
    assert "lavise_no_such_package_zz" in _one_line(ei.value)
    with pytest.raises(LaviseError) as ei:
        load_model(":build")
    _one_line(ei.value)


def test_weights_file_of_wrong_architecture_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "r18_weights.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(LaviseError) as ei:
        load_model("resnet34", str(path))
    msg = _one_line(ei.value)
    assert "r18_weights.pt" in msg and "resnet34" in msg


def test_missing_or_unreadable_weights_file(tmp_path: Path) -> None:
    with pytest.raises(LaviseError) as ei:
        load_model("resnet18", str(tmp_path / "missing.pt"))
    msg = _one_line(ei.value)
    assert "missing.pt" in msg and "does not exist" in msg
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(LaviseError) as ei:
        load_model("resnet18", str(bad))
    assert "garbage.pt" in _one_line(ei.value)


def test_unknown_weights_name_mentions_path_and_none() -> None:
    with pytest.raises(LaviseError) as ei:
        load_model("resnet18", "NO_SUCH_WEIGHTS")
    msg = _one_line(ei.value)
    assert "NO_SUCH_WEIGHTS" in msg and "none" in msg


# ------------------------------------------------------------------------------------------
# The same errors through the command line: exit code != 0, one `error:` line, no traceback
# ------------------------------------------------------------------------------------------


def _assert_cli_error(result: Any, *needles: str) -> None:
    text = result.output + (result.stderr or "")
    assert result.exit_code not in (0, None), text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in text
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert result.stdout.strip() == ""
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _error_cases(tmp_path: Path, factory_file: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (MODEL and options, texts the error line must contain)."""
    wrong = tmp_path / "r18_for_r34.pt"
    if not wrong.exists():
        torch.save(torchvision.models.resnet18().state_dict(), wrong)
    return {
        "unknown-model": (["resnet19", "--weights", "none"], ["resnet19", "resnet18"]),
        "missing-factory-file": ([f"{tmp_path / 'nowhere.py'}:build"], ["nowhere.py"]),
        "missing-attribute": ([f"{factory_file}:nothere"], ["nothere"]),
        "factory-raises": ([f"{factory_file}:boom"], ["kaboom"]),
        "factory-returns-non-module": ([f"{factory_file}:not_module"], ["int"]),
        "wrong-architecture": (["resnet34", "--weights", str(wrong)], ["r18_for_r34.pt"]),
        "missing-weights-file": (["resnet18", "--weights", str(tmp_path / "missing.pt")], ["missing.pt"]),
    }


CASES = ["unknown-model", "missing-factory-file", "missing-attribute", "factory-raises",
         "factory-returns-non-module", "wrong-architecture", "missing-weights-file"]


@pytest.mark.parametrize("case", CASES)
def test_cli_layers_errors(case: str, cli: Any, tmp_path: Path, factory_file: Path) -> None:
    args, needles = _error_cases(tmp_path, factory_file)[case]
    _assert_cli_error(cli("layers", *args), *needles)


@pytest.fixture
def gen_dataset(store: Any, make_coco: Any, small_glove: Path) -> str:
    """A preprocessed 3-image generated dataset ``gen`` in the ``cli`` fixture's store."""
    from lavise_cli.data.index import preprocess
    from lavise_cli.download import register_coco
    from lavise_cli.embeddings import register_embedding

    register_coco(store, make_coco(split="train"), "gen")
    register_embedding(store, small_glove, name="small")
    preprocess(store, "gen", embedding="small")
    return "gen"


def test_cli_train_errors(cli: Any, tmp_path: Path, factory_file: Path, gen_dataset: str) -> None:
    cases = _error_cases(tmp_path, factory_file)
    cases["unknown-layer"] = (["resnet18", "--weights", "none", "--layer", "layer5"], ["layer5", "layer4"])
    for case, (args, needles) in cases.items():
        model, *opts = args
        result = cli("train", model, gen_dataset, *opts, "--epochs", "1")
        try:
            _assert_cli_error(result, *needles)
        except AssertionError as e:
            raise AssertionError(f"case {case}: {e}") from None
    # nothing was trained
    assert not list((tmp_path / "home").glob("explainers/*/explainer.safetensors"))


def test_cli_layers_lists_shapes_and_default(cli: Any) -> None:
    doc = cli.json("layers", "resnet18", "--input-size", "64")
    assert doc["default"] == "layer4" and doc["input_size"] == 64
    layers = {d["name"]: d["shape"] for d in doc["layers"]}
    assert layers["layer4"] == [512, 2, 2] and layers["layer3"] == [256, 4, 4]
    assert "fc" not in layers  # not 4-D
    doc = cli.json("layers", "resnet18", "--input-size", "64", "--all")
    assert {d["name"]: d["shape"] for d in doc["layers"]}["fc"] == [1000]
    json.dumps(doc)


def test_weights_that_cannot_be_downloaded_name_the_offline_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: Any
) -> None:
    # No network, made certain: an empty hub cache and a proxy that refuses every connection.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    # urllib builds its global opener (with the proxies of that moment) on first use and keeps it:
    # start from none, and put the previous one back afterwards, so the dead proxy does not leak.
    monkeypatch.setattr(urllib.request, "_opener", None)
    with pytest.raises(LaviseError) as ei:
        load_model("resnet18")  # DEFAULT weights
    msg = _one_line(ei.value)
    assert "--weights PATH" in msg and "--weights none" in msg
    result = cli("layers", "resnet18", "--weights", "DEFAULT")
    text = result.output + result.stderr
    assert result.exit_code != 0 and "Traceback" not in text
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--weights PATH" in errors[0] and "--weights none" in errors[0], text
    # and nothing else: torch.hub's "Downloading: ..." notice (printed on stdout) is not left behind
    assert result.stdout.strip() == "", result.stdout
    assert [ln for ln in result.stderr.splitlines() if ln.strip()] == errors, result.stderr


# ------------------------------------------------------------------------------------------
# A module called several times in one forward: its LAST call counts (docs/train.md)
# ------------------------------------------------------------------------------------------


def test_layer4_1_relu_captures_the_block_output_not_the_pre_residual_activation() -> None:
    """torchvision's BasicBlock calls its ``relu`` twice: after bn1, and after the residual add.

    The block's output, i.e. ``layer4``'s, is the second call: a pass over ``layer4.1.relu``
    (which stops the forward early) must capture exactly that, not the pre-residual activation.
    """
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), capture(net, ["layer4"], stop=True) as feats:
        want = forward_to(net, x, feats)["layer4"].clone()
    with torch.inference_mode(), capture(net, ["layer4.1.relu"], stop=True) as feats:
        got = forward_to(net, x, feats)["layer4.1.relu"]
        assert torch.equal(got, want)
        # a second batch in the same capture (the call count is known by now) is the same too
        assert torch.equal(forward_to(net, x, feats)["layer4.1.relu"], want)
    with torch.inference_mode(), capture(net, ["layer4.1.relu"]) as feats:
        net(x)
        assert torch.equal(feats["layer4.1.relu"], want)
    assert dict(layer_shapes(net, 64))["layer4.1.relu"] == tuple(want.shape[1:])


class _TwoScales(nn.Module):
    """One conv applied at full and at half resolution, then a head that must never run."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        b = self.conv(nn.functional.avg_pool2d(x, 2))
        return self.head(torch.cat([a.mean((2, 3)), b.mean((2, 3))], 1))


def test_module_reused_at_two_resolutions_mask_grid_matches_captured_map() -> None:
    from lavise_cli.features import feature_grids
    from lavise_cli.models import Preprocess, TargetModel

    torch.manual_seed(0)
    net = _TwoScales().eval()
    tm = TargetModel(module=net, name="two-scales", weights="none", weights_digest="x", preprocess=Preprocess(32))
    grid = feature_grids(tm, ["conv"])["conv"]
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode(), capture(net, ["conv"], stop=True) as feats:
        got = forward_to(net, x, feats)["conv"]
    assert tuple(got.shape[1:]) == grid == (4, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(got, net.conv(nn.functional.avg_pool2d(x, 2)), rtol=0, atol=0)
