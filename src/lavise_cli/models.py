"""Target models and layers: torchvision models by name, users' own factories, hooks, preprocessing."""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import LaviseError, notice
from .runtime import backbone, backbone_input, default_workers, one_thread, resolve_device  # noqa: F401 (re-exported)
from .layers import (  # noqa: F401 (re-exported: the layer helpers lived here)
    Captured, StopForward, capture, default_layer, forward_to, layer_shapes, resolve_layer, user_code,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Preprocess:
    """How images are brought to the model: a square resize to ``input_size``, then normalisation."""

    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def as_dict(self) -> dict[str, Any]:
        return {"input_size": self.input_size, "mean": list(self.mean), "std": list(self.std)}


@dataclass
class TargetModel:
    """A frozen model, what it was built from, and how its inputs are prepared."""

    module: nn.Module
    name: str
    weights: str
    weights_digest: str
    preprocess: Preprocess
    info: dict[str, Any] = field(default_factory=dict)

    def key(self) -> dict[str, Any]:
        """Everything the model's outputs depend on: caches are keyed by it."""
        return {"model": self.name, "weights": self.weights, "weights_digest": self.weights_digest,
                "code": self.info.get("code_digest"), "preprocess": self.preprocess.as_dict()}


def state_dict_digest(module: nn.Module) -> str:
    """sha256 over the parameters and buffers (names, shapes, bytes)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        t = v.detach().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _torchvision_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _load_factory(spec: str) -> tuple[nn.Module, dict[str, Any]]:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise LaviseError(f"bad factory {spec!r}: write package.module:callable or path/to/file.py:callable")
    try:
        if target.endswith(".py") or "/" in target or "\\" in target:
            path = Path(target).expanduser().resolve()
            if not path.is_file():
                raise LaviseError(f"factory file {target} does not exist")
            mod_name = f"lavise_user_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
            spec_obj = importlib.util.spec_from_file_location(mod_name, path)
            if spec_obj is None or spec_obj.loader is None:
                raise LaviseError(f"cannot import factory file {target}")
            module = importlib.util.module_from_spec(spec_obj)
            sys.modules[mod_name] = module
            with user_code():
                spec_obj.loader.exec_module(module)
        else:
            with user_code():
                module = importlib.import_module(target)
    except LaviseError:
        raise
    except ImportError as e:
        raise LaviseError(f"cannot import {target!r} for factory {spec!r}: {e}") from None
    except Exception as e:  # the user's module failed while importing
        raise LaviseError(f"importing {target!r} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise LaviseError(f"{target!r} has no callable {attr!r} (factory {spec!r})")
    try:
        # A factory that prints must not corrupt `--json` on stdout; its random init is seeded so
        # that the same factory gives the same weights (and cache keys) every time.
        with user_code(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            result = fn()
    except Exception as e:
        raise LaviseError(f"factory {spec!r} failed: {type(e).__name__}: {e}") from None
    pre: dict[str, Any] = {}
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict):
        result, pre = result
    if not isinstance(result, nn.Module):
        raise LaviseError(f"factory {spec!r} returned {type(result).__name__}, not a torch.nn.Module")
    pre = {**getattr(result, "lavise_preprocess", {}), **pre}
    pre["code_digest"] = _code_digest(module)
    return result, pre


def _code_digest(module: Any) -> str | None:
    """sha256 of a factory's source file, so that editing the model's code invalidates caches."""
    path = getattr(module, "__file__", None)
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None
    except OSError:
        return None


def load_model(
    spec: str,
    weights: str | None = "DEFAULT",
    *,
    input_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> TargetModel:
    """Build the target model named by ``spec`` in eval mode, frozen, on the CPU.

    ``spec`` is a torchvision model name (``resnet18``) or a factory ``pkg.mod:fn`` /
    ``path/file.py:fn`` returning an ``nn.Module`` (optionally ``(module, preprocess_dict)``, or
    a module with a ``lavise_preprocess`` dict attribute).  ``weights`` is a torchvision weights
    name (``DEFAULT``, ``IMAGENET1K_V1``), ``none`` for random initialisation, or a path to a
    state dict (loaded with ``weights_only=True``).
    """
    pre: dict[str, Any] = {}
    weights = weights or "DEFAULT"
    wpath = Path(weights).expanduser()
    is_file = weights.lower() != "none" and (wpath.suffix in {".pt", ".pth", ".bin", ".safetensors"} or wpath.exists())
    if ":" in spec:
        module, pre = _load_factory(spec)
        weights_id = "factory" if not is_file else str(wpath.resolve())
        if weights.lower() == "none":
            weights_id = "factory"
    else:
        import torchvision  # only here: a factory's model needs none of it (and it imports slowly)

        names = _torchvision_models()
        if spec not in names:
            near = difflib.get_close_matches(spec, names, n=4, cutoff=0.5)
            hint = f" Did you mean: {', '.join(near)}?" if near else ""
            raise LaviseError(
                f"unknown model {spec!r}.{hint} Give a torchvision model name (see torchvision.models.list_models()) "
                "or your own factory as package.module:callable or path/file.py:callable"
            )
        if weights.lower() == "none" or is_file:
            # Random initialisation is seeded, so `--weights none` is repeatable (and cacheable).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                module = torchvision.models.get_model(spec, weights=None)
            weights_id = "none" if not is_file else str(wpath.resolve())
        else:
            try:
                wenum = torchvision.models.get_model_weights(spec)
                w = wenum[weights] if weights in wenum.__members__ else torchvision.models.get_weight(weights)
            except (KeyError, ValueError, AttributeError):
                choices = ", ".join(wenum.__members__) if "wenum" in dir() else ""
                raise LaviseError(
                    f"unknown weights {weights!r} for {spec}; choose one of: {choices}, none, or a state-dict path"
                ) from None
            try:
                with hub_download_notice():
                    module = torchvision.models.get_model(spec, weights=w)
            except Exception as e:  # network, hub cache
                raise LaviseError(
                    f"could not get the {spec} weights {w} ({type(e).__name__}); with no network, pass "
                    f"--weights PATH (a state dict file) or --weights none (random init)"
                ) from None
            weights_id = str(w)
            tf = w.transforms()
            pre = {"input_size": int(getattr(tf, "crop_size", [224])[0]), "mean": tuple(tf.mean), "std": tuple(tf.std)}
    ignored: list[str] = []
    if is_file:
        ignored = _load_state_dict(module, wpath, spec)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    prep = Preprocess(
        input_size=int(input_size or pre.get("input_size", 224)),
        mean=tuple(float(x) for x in (mean or pre.get("mean", IMAGENET_MEAN))),  # type: ignore[arg-type]
        std=tuple(float(x) for x in (std or pre.get("std", IMAGENET_STD))),  # type: ignore[arg-type]
    )
    if len(prep.mean) != 3 or len(prep.std) != 3:
        raise LaviseError("--mean and --std take three comma-separated numbers (R,G,B)")
    digest = state_dict_digest(module)
    code = pre.get("code_digest") if ":" in spec else f"torchvision {torchvision.__version__}"
    return TargetModel(module=module, name=spec, weights=weights_id, weights_digest=digest, preprocess=prep,
                       info={"code_digest": code, **({"ignored_weights": ignored} if ignored else {})})


WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")


def _read_weights(path: Path) -> Any:
    """The object in a weights file, loaded safely (tensors only); torch's warnings kept quiet."""
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise LaviseError(
            f"weights file {path} holds objects other than tensors (a whole pickled model or training state?) "
            "and was refused for safety: save model.state_dict() with torch.save, or as .safetensors"
        ) from None
    except Exception as e:
        msg = " ".join(str(e).split())[:200]
        raise LaviseError(f"cannot read weights file {path}: {type(e).__name__}: {msg}") from None


def _unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """The tensors of a state dict, also from the common checkpoint shapes: a ``state_dict`` /
    ``model`` wrapper key, and a ``module.`` prefix (DataParallel / DistributedDataParallel)."""
    for _ in range(3):
        if not isinstance(obj, dict):
            return None
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None or any(isinstance(v, torch.Tensor) and "." in str(k) for k, v in obj.items()):
            break
        obj = inner
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        return None
    for prefix in ("module.", "_orig_mod."):  # DataParallel/DDP; torch.compile
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _load_state_dict(module: nn.Module, path: Path, spec: str) -> list[str]:
    """Load a weights file into ``module``; returns the modules whose weights were left out
    because their shapes differ (a classifier head of another size), after saying so."""
    if not path.is_file():
        raise LaviseError(f"weights file {path} does not exist")
    sd = _unwrap_state_dict(_read_weights(path))
    if sd is None:
        raise LaviseError(f"weights file {path} does not hold a state dict (names to tensors)")
    own = module.state_dict()
    mismatched = [k for k, v in sd.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    head = sorted({k.rpartition(".")[0] for k in mismatched})
    mods = dict(module.named_modules())
    if mismatched and all(isinstance(mods.get(m), nn.Linear) for m in head):
        # A classifier head of another size (e.g. 10 classes, not 1000): the feature maps lavise
        # explains come before it; `check_ignored` makes sure the explained layer does not use it.
        sd = {k: v for k, v in sd.items() if k not in mismatched}
        missing = [k for k in own if k not in sd and k.rpartition(".")[0] not in head]
        unexpected = [k for k in sd if k not in own]
        if not missing and not unexpected:
            module.load_state_dict(sd, strict=False)
            notice(f"weights file {path.name}: its classifier head ({', '.join(head)}, another size) was ignored; "
                   "the rest is loaded")
            return head
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise LaviseError(
            f"weights file {path} does not fit {spec} (wrong architecture?): {detail[:200]}"
        ) from None
    return []


def check_ignored(model: TargetModel, layers: Sequence[str]) -> None:
    """Refuse to explain a layer that depends on weights left out when loading (a mismatched head):
    one forward records the order of calls; an ignored module that starts before a layer's last
    output could feed it."""
    ignored = model.info.get("ignored_weights") or []
    if not ignored:
        return
    events: list[tuple[str, str]] = []
    mods = dict(model.module.named_modules())
    handles = [mods[n].register_forward_pre_hook(lambda _m, _i, n=n: events.append(("ignored", n)))
               for n in ignored if n in mods]
    handles += [resolve_layer(model.module, n).register_forward_hook(lambda _m, _i, _o, n=n: events.append(("layer", n)))
                for n in layers]
    try:
        size = model.preprocess.input_size
        with torch.no_grad(), user_code():
            model.module(torch.zeros(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    last = max((k for k, (kind, _) in enumerate(events) if kind == "layer"), default=-1)
    ran = sorted({n for k, (kind, n) in enumerate(events) if kind == "ignored" and k < last})
    if ran:
        raise LaviseError(f"layer {', '.join(layers)} depends on {', '.join(ran)}, whose weights in the file do not "
                          "fit the model (another size): use weights made for this architecture")


class _HeldNotice:
    """A stream to stderr that holds torch.hub's ``Downloading: ...`` line until more output follows."""

    def __init__(self, real: Any):
        self.real, self.held = real, None

    def write(self, text: str) -> int:
        if self.held is None and text.startswith("Downloading"):
            self.held = text
            return len(text)
        self.release()
        return self.real.write(text)

    def release(self) -> None:
        if self.held:
            self.real.write(self.held)
        self.held = ""

    def flush(self) -> None:
        self.real.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@contextmanager
def hub_download_notice() -> Iterator[None]:
    """torch.hub's download notice goes to stderr (it prints it on stdout, which would spoil
    ``--json``), and only once the download is under way: a failed download (no network) says
    nothing but lavise's own one-line error."""
    held = _HeldNotice(sys.stderr)
    with contextlib.redirect_stdout(held):  # type: ignore[type-var]
        yield
    held.release()
