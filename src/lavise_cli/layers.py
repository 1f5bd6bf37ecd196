"""Layers of a model: names, output shapes, and capturing their outputs during a forward.

Everything that runs a model's forward to look at a layer goes through here: the shape probe
(:func:`layer_shapes`), the default layer, and :func:`capture`/:func:`forward_to`, which keep
each layer's LAST call (a module called twice in one forward, like torchvision's
``layer4.1.relu``, outputs what its last call returns) and stop the forward right after it.
User model code runs with its prints sent to stderr (:func:`user_code`), so ``--json`` stays clean.
"""

from __future__ import annotations

import contextlib
import difflib
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .errors import LaviseError


@contextmanager
def user_code() -> Iterator[None]:
    """While a user's module, factory or model runs: whatever it prints goes to stderr, so that
    ``--json`` on stdout stays one JSON document."""
    with contextlib.redirect_stdout(sys.stderr):
        yield



def resolve_layer(model: nn.Module, path: str) -> nn.Module:
    """The module at dotted ``path`` (a getattr chain; no eval), or a clear error with near names."""
    names = dict(model.named_modules())
    if path in names and path != "":
        return names[path]
    near = difflib.get_close_matches(path, [n for n in names if n], n=5, cutoff=0.4)
    hint = f" Nearest names: {', '.join(near)}." if near else ""
    raise LaviseError(f"the model has no layer {path!r}.{hint} Run `lavise layers MODEL` to list them.")


def layer_shapes(model: nn.Module, input_size: int = 224) -> list[tuple[str, tuple[int, ...]]]:
    """(name, output shape without batch) of every module, in the order their forward finished.

    A module called several times reports the shape of its last call.
    """
    order: dict[str, tuple[int, ...]] = {}
    handles = []

    def make(name: str):
        def hook(_m: nn.Module, _i: Any, o: Any) -> None:
            if isinstance(o, torch.Tensor):
                order.pop(name, None)
                order[name] = tuple(o.shape[1:])

        return hook

    for name, m in model.named_modules():
        if name:
            handles.append(m.register_forward_hook(make(name)))
    try:
        with torch.no_grad(), user_code():
            model(torch.zeros(1, 3, input_size, input_size))
    except LaviseError:
        raise
    except Exception as e:  # e.g. an input too small for the network
        msg = " ".join(str(e).split())[:200]
        raise LaviseError(f"the model fails on a {input_size}x{input_size} input ({type(e).__name__}: {msg}); "
                          "try another --input-size") from None
    finally:
        for h in handles:
            h.remove()
    return list(order.items())


def default_layer(model: nn.Module, input_size: int = 224) -> str:
    """The last 4-D feature map with a spatial extent before global pooling."""
    best = None
    pools = {n for n, m in model.named_modules() if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))}
    for name, shape in layer_shapes(model, input_size):
        # VGG/AlexNet pool adaptively to 7x7/6x6 before the classifier: that is pooling, not a feature map.
        if len(shape) == 3 and shape[1] * shape[2] > 1 and name not in pools:
            best = name
    if best is None:
        raise LaviseError("the model has no 4-D feature map with spatial extent; name one with --layer")
    return best


class StopForward(Exception):
    """Raised by :func:`capture`'s hooks once every wanted layer has its output."""


class Captured(dict):
    """The outputs a :func:`capture` keeps, by layer name: each layer's LAST call in the forward.

    A module may run several times in one forward (torchvision's ``BasicBlock.relu`` runs after
    ``bn1`` and again after the residual add; a module may be reused at two resolutions).  Its
    last call is what the layer outputs, as :func:`layer_shapes` reports it, so that is what is
    kept, and an early stop (``stop=True``) waits for it: how many calls each layer makes is
    counted once per input shape, by a forward of a single image (:meth:`prepare`).
    """

    def __init__(self, layers: Sequence[str], stop: bool):
        super().__init__()
        self.wanted, self.stop = list(dict.fromkeys(layers)), stop
        self.calls: dict[str, int] = {}  # calls of each wanted layer in the current forward
        self.expected: dict[str, int] | None = None  # calls per forward, for the current input shape
        self.known: dict[tuple[int, ...], dict[str, int]] = {}
        self.probing = False

    def clear(self) -> None:
        super().clear()
        self.calls.clear()

    def prepare(self, net: nn.Module, x: torch.Tensor) -> None:
        """Know how many times each wanted layer runs in ``net``'s forward of inputs shaped like ``x``."""
        shape = tuple(x.shape[1:])
        if shape not in self.known:
            self.clear()
            self.probing = True
            try:
                net(x[:1])
            except (StopForward, LaviseError):
                raise
            except Exception:
                # The network failed after the layers (e.g. a head that cannot run): the layers'
                # calls before it are all a stopped forward ever runs.
                if any(n not in self.calls for n in self.wanted):
                    raise
            finally:
                self.probing = False
            missing = [n for n in self.wanted if n not in self.calls]
            if missing:
                raise LaviseError(f"layer {missing[0]!r} is not run by the model's forward; pick another --layer")
            self.known[shape] = dict(self.calls)
            self.clear()
        self.expected = self.known[shape]

    def record(self, name: str, out: torch.Tensor) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.probing:
            return
        self[name] = out
        if self.stop and self.expected is not None and all(
                self.calls.get(n, 0) >= self.expected[n] for n in self.wanted):
            raise StopForward


@contextmanager
def capture(model: nn.Module, layers: Sequence[str], stop: bool = False) -> Iterator[Captured]:
    """Forward hooks that keep each named layer's output of the latest forward (its last call).

    With ``stop=True`` and :func:`forward_to`, the forward ends as soon as every named layer has
    made its last call (the rest of the network, e.g. a classifier head, is never run).
    """
    feats = Captured(layers, stop)
    handles = []
    for name in feats.wanted:
        mod = resolve_layer(model, name)

        def hook(_m: nn.Module, _i: Any, o: Any, name: str = name) -> None:
            if not isinstance(o, torch.Tensor) or o.dim() != 4:
                raise LaviseError(f"layer {name!r} does not output a 4-D feature map; pick another --layer")
            feats.record(name, o)

        handles.append(mod.register_forward_hook(hook))
    try:
        yield feats
    finally:
        for h in handles:
            h.remove()


def forward_to(net: nn.Module, x: torch.Tensor, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run ``net(x)`` under a :func:`capture` with ``stop=True``; returns the captured outputs.

    The first batch of each input shape is preceded by a one-image forward that counts the
    layers' calls (:meth:`Captured.prepare`), so that the stop comes after each one's last call.
    """
    with user_code():  # whatever the model prints goes to stderr
        if isinstance(feats, Captured) and feats.stop:
            feats.prepare(net, x)
        feats.clear()
        try:
            net(x)
        except StopForward:
            pass
    return feats
