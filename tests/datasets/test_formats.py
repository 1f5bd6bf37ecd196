"""The format plug-ins' shared parts: the registry and the one image-acceptance routine."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from lavise_cli.data.formats import Candidate, accept_images, get_format, register_format
from lavise_cli.errors import LaviseError
from lavise_cli.testing import write_image


def test_accept_images_keeps_good_ones_and_names_every_dropped_image_with_why(tmp_path: Path) -> None:
    kinds = {"ok.jpg": "rgb", "gray.jpg": "gray", "gone.jpg": "missing", "bad.jpg": "garbage",
             "small.jpg": "rgb", "nomask.jpg": "rgb", "maskoff.jpg": "rgb", "unchecked.jpg": "rgb"}
    for name, kind in kinds.items():
        write_image(tmp_path / name, 20 if name == "small.jpg" else 40, 24, kind)
    p = {name: str(tmp_path / name) for name in kinds}
    cands = [
        Candidate(p["ok.jpg"], (24, 40)),
        Candidate(p["gray.jpg"], (24, 40)),
        Candidate(p["gone.jpg"], (24, 40)),
        Candidate(p["bad.jpg"], (24, 40)),
        Candidate(p["small.jpg"], (24, 40)),
        Candidate(p["nomask.jpg"], (24, 40), problem="missing mask"),
        Candidate(p["maskoff.jpg"], (24, 40), mask_size=(24, 41)),
        Candidate(p["unchecked.jpg"], None),
    ]
    dropped: Counter[str] = Counter()
    gone: list[tuple[str, str]] = []
    sizes = accept_images(cands, 1, None, "checking", dropped, gone)
    assert sizes == [(24, 40), (24, 40), None, None, None, None, None, (24, 40)]
    assert dropped == {"images converted from L (kept)": 1, "images missing": 1, "images corrupt": 1,
                       "images whose size differs from the annotation": 2, "images with a missing mask": 1}
    assert gone == [
        (p["gone.jpg"], "image missing"),
        (p["bad.jpg"], "image corrupt"),
        (p["small.jpg"], "image is 20x24, the annotation says 40x24"),
        (p["nomask.jpg"], "image with a missing mask"),
        (p["maskoff.jpg"], "image is 40x24, its mask 41x24, the annotation says 40x24"),
    ]


def test_formats_are_looked_up_by_name_and_an_unknown_one_is_a_clear_error() -> None:
    from lavise_cli.data.formats.coco import build_instances
    from lavise_cli.data.formats.panoptic import build_panoptic
    from lavise_cli.data.formats.vg import build_vg

    assert get_format("coco") is build_instances
    assert get_format("coco-panoptic") is build_panoptic
    assert get_format("vg") is build_vg
    from lavise_cli.data.formats.broden import build_broden

    assert get_format("broden") is build_broden
    with pytest.raises(LaviseError, match="pascal.*supported formats: broden, coco, coco-panoptic, vg"):
        get_format("pascal")


def test_a_registered_format_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    from lavise_cli.data import formats

    monkeypatch.setattr(formats, "_FORMATS", dict(formats._FORMATS))
    def mine(*a: object) -> None: ...
    register_format("mine", lambda: mine)
    assert get_format("mine") is mine
