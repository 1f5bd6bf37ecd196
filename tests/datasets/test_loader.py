"""The batch prefetcher, the truncated forward and the one-step model input."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF2
from torch import nn

from lavise_cli.data.images import View, apply_view_image, model_input, normalize
from lavise_cli.data.loader import prefetched
from lavise_cli.models import capture, forward_to


def test_prefetched_yields_everything_in_order_one_step_ahead() -> None:
    produced: list[int] = []

    def items():
        for i in range(6):
            produced.append(i)
            yield i

    it = prefetched(items())
    assert next(it) == 0
    time.sleep(0.2)
    # the producer ran ahead: item 1 is queued and item 2 is made, waiting for room
    assert produced == [0, 1, 2]
    assert list(it) == [1, 2, 3, 4, 5]


def test_prefetched_raises_the_producers_error_after_the_items_before_it() -> None:
    def items():
        yield 1
        yield 2
        raise KeyboardInterrupt

    got = []
    with pytest.raises(KeyboardInterrupt):
        for x in prefetched(items()):
            got.append(x)
    assert got == [1, 2]


def test_prefetched_stops_its_thread_when_the_consumer_leaves_early() -> None:
    made = []

    def items():
        for i in range(1000):
            made.append(i)
            yield i

    before = {t.ident for t in threading.enumerate()}
    for x in prefetched(items()):
        if x == 3:
            break
    time.sleep(0.3)
    assert len(made) <= 6  # it stopped, it did not run through the 1000
    assert not [t for t in threading.enumerate() if t.name == "lavise-prefetch" and t.ident not in before]


class _Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the head ran")


def test_forward_to_stops_after_the_last_wanted_layer() -> None:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3))
    net = nn.Sequential(body, _Boom())
    x = torch.randn(2, 3, 9, 9)
    with torch.inference_mode():
        want2, want0 = body(x), body[0](x)
    with torch.inference_mode(), capture(net, ["0.0", "0.2"], stop=True) as feats:
        out = forward_to(net, x, feats)
        assert set(out) == {"0.0", "0.2"}
        torch.testing.assert_close(out["0.2"], want2)
        torch.testing.assert_close(out["0.0"], want0)
    # without stop the head runs (so the check above can fail)
    with torch.inference_mode(), capture(net, ["0.2"]) as feats, pytest.raises(AssertionError, match="head ran"):
        net(x)


def test_model_input_equals_normalize_of_the_view_and_uint8_resize_is_within_one_level() -> None:
    g = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (3, 97, 131), dtype=torch.uint8, generator=g)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for view in (View(), View(flip=True), View((0.1, 0.2, 0.8, 0.9), flip=True)):
        x = model_input(img, view, 64, mean, std)
        torch.testing.assert_close(x, normalize(apply_view_image(img, view, 64), mean, std), rtol=0, atol=1e-5)
        # the float path: resize the [0, 1] image, as torchvision does on float tensors
        left, top, right, bottom = view.pixel_box(97, 131)
        ref = F.interpolate(img[None, :, top:bottom, left:right].float() / 255, size=(64, 64), mode="bilinear",
                            align_corners=False, antialias=True)[0]
        if view.flip:
            ref = ref.flip(-1)
        # ... and exactly torchvision's v2 pipeline, which resizes uint8 images natively
        v2 = TF2.resize(img[:, top:bottom, left:right], [64, 64], antialias=True).float() / 255
        torch.testing.assert_close(apply_view_image(img, view, 64), v2.flip(-1) if view.flip else v2, rtol=0, atol=0)
        diff = (apply_view_image(img, view, 64) - ref).abs()
        assert diff.max() <= 1 / 255 + 1e-6
        assert diff.mean() < 0.4 / 255  # rounding (0.25 levels on average), not a shifted or blurred image, not a shifted or blurred image
