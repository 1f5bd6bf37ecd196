"""Group ImageNet classes into WordNet superclasses for `lavise relevant`.

Writes a ``--classes`` file (``index<TAB>wnid<TAB>superclass`` for all 1,000 outputs: several
outputs share one superclass name) and an image folder with one sub-folder per superclass
(symlinks to the images), from ``classes.tsv`` (``index, wnid, name`` in torchvision's order) and
WordNet 3.0's ``data.noun`` (a wnid is ``n`` + the synset's offset there).

    python scripts/imagenet_superclasses.py ../shared/data/imagenet_sample run/ \\
        --group dog=n02084071 --group bird=n01503061 --rest other
    lavise relevant examples/efficientnet_lite0.py:build --images run/images --classes run/classes.tsv

A class belongs to the first group whose synset is among its hypernyms (transitively); the rest
to ``--rest``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_vocab import read_data_noun  # noqa: E402


def ancestors(offset: int, synsets: dict[int, dict]) -> set[int]:
    seen, todo = set(), [offset]
    while todo:
        o = todo.pop()
        if o in seen or o not in synsets:
            continue
        seen.add(o)
        todo.extend(synsets[o]["hypernyms"])
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sample", type=Path, help="folder with classes.tsv and <wnid>_<name>.JPEG images")
    ap.add_argument("out", type=Path)
    ap.add_argument("--group", action="append", default=[], help="name=wnid of a WordNet synset (repeatable)")
    ap.add_argument("--rest", default="other", help="superclass of the classes in no group")
    ap.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"), help="WordNet 3.0 dict folder")
    a = ap.parse_args()
    synsets = read_data_noun(a.wordnet / "data.noun")
    groups = [(g.split("=")[0], int(g.split("=")[1].lstrip("n"))) for g in a.group]
    rows = [line.split("\t") for line in (a.sample / "classes.tsv").read_text().splitlines() if line.strip()]
    superclass = {}
    for idx, wnid, _name in rows:
        anc = ancestors(int(wnid[1:]), synsets)
        superclass[wnid] = next((g for g, off in groups if off in anc), a.rest)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "classes.tsv").write_text("".join(f"{i}\t{w}\t{superclass[w]}\n" for i, w, _ in rows))
    counts: dict[str, int] = {}
    for img in sorted(a.sample.glob("*.JPEG")):
        sc = superclass[img.name.split("_")[0]]
        d = a.out / "images" / sc
        d.mkdir(parents=True, exist_ok=True)
        link = d / img.name
        if not link.exists():
            link.symlink_to(img.resolve())
        counts[sc] = counts.get(sc, 0) + 1
    outputs = {g: sum(1 for v in superclass.values() if v == g) for g in counts}
    print(", ".join(f"{g}: {n} images, {outputs[g]} outputs" for g, n in sorted(counts.items())))


if __name__ == "__main__":
    main()
