"""Passes shared across processes: ``torchrun`` ranks (gloo, CPU) and ``--shard I/N``.

Real ``torchrun --standalone --nproc_per_node 2 -m lavise_cli`` jobs (one thread a rank) on a
generated COCO and a small convolutional model; their results must equal a single process's:
the feature cache (sorted by pair), the thresholds, the explainer's losses, every filter's words
and the recall.  A job whose rank is killed resumes, single-process, from the shards its ranks
wrote; ``--shard`` shares run one after the other complete the same pass.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lavise_cli.passes.target import _load_target
from lavise_cli.store import Store

from conftest import Cli
from test_interrupt import descendants, explainer_tensors, gen_coco, leftovers, prepared_home

TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")

# Two strided convolutions: 32 px in, layer `feat` 16 x 8 x 8.
MODEL = '''
import torch
from torch import nn


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.feat = nn.Identity()

    def forward(self, x):
        return self.feat(self.act(self.conv2(self.act(self.conv1(x))))).mean((2, 3))


def build():
    return Small(), {"input_size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
'''


# --precision fp32 everywhere: the in-process runs resolve `auto` to fp32 (conftest fakes a CPU
# without native bf16), the torchrun processes would resolve it from the real CPU (bf16 on an
# AVX512-BF16/AMX machine): another cache key, and not the same numbers.
def train_args(model: Path) -> tuple[str, ...]:
    return ("train", f"{model}:build", "gen", "--weights", "none", "--epochs", "4", "--workers", "0",
            "--precision", "fp32")


EXPLAIN = ("explain", "--all", "--images", "5", "--precision", "fp32")
EVALUATE = ("evaluate", "--recall", "1,3,5", "--images", "5", "--precision", "fp32")


def torchrun(home: Path, *args: str, log: Path, wait: bool = True) -> Any:
    """``torchrun --standalone --nproc_per_node 2 -m lavise_cli --home HOME ARGS`` (one thread a rank)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LAVISE_DIST_TIMEOUT": "120"}
    with open(f"{log}.out", "wb") as out, open(f"{log}.err", "wb") as err:
        p = subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "lavise_cli",
                              "--home", str(home), *args], stdout=out, stderr=err, env=env)
    p.log = log  # type: ignore[attr-defined]
    if not wait:
        return p
    rc = p.wait(300)
    out_text, err_text = Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text()
    assert rc == 0, err_text
    return out_text, err_text


def homes(tmp_path: Path, make_coco: Any, small_glove: Path, *names: str) -> list[Path]:
    coco = gen_coco(make_coco)
    return [prepared_home(tmp_path / n, coco, small_glove) for n in names]


def pair_features(home: Path) -> dict[str, torch.Tensor]:
    """The (only) feature cache entry's pairs, sorted by (image, view, concept)."""
    (entry,) = Store(home).list("features")
    parts = [load_file(str(p)) for p in sorted(entry.path.glob("z-*.safetensors"))]
    cat = {k: torch.cat([p[k] for p in parts]).long() if k != "z" else torch.cat([p[k] for p in parts]).float()
           for k in ("z", "image", "concept", "view")}
    order = sorted(range(len(cat["z"])), key=lambda i: (int(cat["image"][i]), int(cat["view"][i]), int(cat["concept"][i])))
    return {k: v[order] for k, v in cat.items()}


def target_stats(home: Path) -> dict[str, torch.Tensor]:
    (entry,) = Store(home).list("targets")
    cache = _load_target(Store(home), entry.path.name, "x", hit=True)
    return {"threshold": cache.threshold, "rows": cache.rows, "img_max": cache.img_max}


def rel_close(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol * max(abs(a), abs(b), 1e-12)


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path: Path, make_coco: Any, small_glove: Path) -> None:
    ref_home, home = homes(tmp_path, make_coco, small_glove, "ref", "dist")
    model = tmp_path / "small_model.py"
    model.write_text(MODEL)
    ref = Cli(ref_home)

    # train: the feature pass shared by two ranks, rank 0 trains and prints
    want = ref.json(*train_args(model))
    out, err = torchrun(home, *train_args(model), "--json", log=tmp_path / "train")
    got = json.loads(out)  # one document: rank 1 printed nothing
    assert got["feature_cache"] == "miss" and got["pairs"] == want["pairs"]
    a, b = pair_features(ref_home), pair_features(home)
    for k in ("image", "concept", "view"):
        assert torch.equal(a[k], b[k]), k
    # fp16 z of the same images: other batches may move a float's last bits, no more than fp16's step
    torch.testing.assert_close(b["z"], a["z"], rtol=1e-3, atol=1e-3)
    assert len(got["losses"]) == len(want["losses"]) == 4
    for x, y in zip(got["losses"], want["losses"]):
        assert rel_close(x["train"], y["train"], 1e-4) and rel_close(x["val"], y["val"], 1e-4), (x, y)
    ta, tb = explainer_tensors(home), explainer_tensors(ref_home)
    assert all(torch.allclose(ta[k].float(), tb[k].float(), rtol=1e-4, atol=1e-6) for k in ta)

    # explain --all: the target pass shared, the same words for every filter
    want = ref.json(*EXPLAIN)
    got = json.loads(torchrun(home, *EXPLAIN, "--json", log=tmp_path / "explain")[0])
    sa, sb = target_stats(ref_home), target_stats(home)
    assert torch.equal(sa["rows"], sb["rows"])
    torch.testing.assert_close(sb["threshold"], sa["threshold"], rtol=1e-5, atol=0)
    torch.testing.assert_close(sb["img_max"], sa["img_max"], rtol=1e-5, atol=1e-6)
    assert len(got["filters"]) == 16
    assert [[w["word"] for w in f["words"]] for f in got["filters"]] == \
        [[w["word"] for w in f["words"]] for f in want["filters"]]

    # evaluate: the same recall
    want = ref.json(*EVALUATE)
    got = json.loads(torchrun(home, *EVALUATE, "--json", log=tmp_path / "evaluate")[0])
    assert got["methods"] == want["methods"]
    assert leftovers(home) == []


@pytest.mark.slow
def test_a_job_with_a_killed_rank_resumes_single_process(tmp_path: Path, make_coco: Any, small_glove: Path) -> None:
    ref_home, home = homes(tmp_path, make_coco, small_glove, "ref", "dist")
    model = tmp_path / "small_model.py"
    model.write_text(MODEL)
    want = Cli(ref_home).json(*train_args(model))

    # The last train image (rank 1's half) becomes a pipe nobody writes: rank 1 waits there for
    # ever while rank 0 finishes its half; then rank 1 is killed.
    images = sorted((tmp_path / "coco" / "train2017").glob("*.jpg"))
    last = images[-1]
    saved = last.read_bytes()
    last.unlink()
    os.mkfifo(last)
    p = torchrun(home, *train_args(model), log=tmp_path / "killed", wait=False)
    partial = home / "cache" / "features"

    def states() -> list[dict[str, Any]]:
        got = []
        for f in partial.glob(".partial-*/state-p*.json"):
            try:
                got.append(json.loads(f.read_text()))
            except (OSError, ValueError):
                pass
        return sorted(got, key=lambda s: s["start"])

    t0 = time.monotonic()
    while not (len(states()) == 2 and states()[0]["done"]):
        assert p.poll() is None, Path(f"{p.log}.err").read_text()
        assert time.monotonic() - t0 < 240, "rank 0 never finished its half"
        time.sleep(0.05)
    rank1 = [pid for pid in descendants(p.pid) if b"lavise_cli" in Path(f"/proc/{pid}/cmdline").read_bytes()
             and b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")]
    assert len(rank1) == 1, rank1
    os.kill(rank1[0], 9)
    assert p.wait(120) != 0  # the job fails as a whole: rank 0 does not hang at its barrier
    s0, s1 = states()
    assert s0["done"] and s0["start"] == 0 and not s1["done"] and s1["stop"] == len(images)
    assert not Store(home).list("features")

    last.unlink()
    last.write_bytes(saved)
    got = Cli(home).json(*train_args(model))  # one process, in-process: picks up rank 0's half
    assert got["feature_cache"] == "miss"
    for x, y in zip(got["losses"], want["losses"]):
        assert rel_close(x["train"], y["train"], 1e-4) and rel_close(x["val"], y["val"], 1e-4), (x, y)
    ta, tb = explainer_tensors(home), explainer_tensors(ref_home)
    assert ta.keys() == tb.keys()
    assert all(torch.allclose(ta[k].float(), tb[k].float(), rtol=1e-4, atol=1e-6) for k in ta)
    assert leftovers(home) == []


@pytest.mark.slow
def test_shards_run_one_after_the_other_complete_the_pass(tmp_path: Path, make_coco: Any, small_glove: Path) -> None:
    ref_home, home = homes(tmp_path, make_coco, small_glove, "ref", "sharded")
    model = tmp_path / "small_model.py"
    model.write_text(MODEL)
    want = Cli(ref_home).json(*train_args(model))
    cli = Cli(home)

    # share 1 of 3, then 0: each leaves its shards and says so; nothing is published yet
    for i in (1, 0):
        r = cli("--shard", f"{i}/3", *train_args(model), "--json")
        assert r.exit_code == 0, r.output
        assert f"share {i}/3 is done" in r.stderr and r.stdout == ""
        assert not Store(home).list("features") and not Store(home).list("explainers")
    (partial,) = (home / "cache" / "features").glob(".partial-*")
    # shares in whole batches (32): [0, 32), [32, 64), [64, 72)
    assert sorted(json.loads(p.read_text())["start"] for p in partial.glob("state-p*.json")) == [0, 32]
    # the last share completes the pass, publishes it and trains
    got = Cli(home).json("--shard", "2/3", *train_args(model))
    assert got["losses"] == want["losses"]
    a, b = pair_features(ref_home), pair_features(home)
    assert all(torch.equal(a[k], b[k]) for k in ("image", "concept", "view", "z"))
    assert leftovers(home) == []

    r = cli("--shard", "3/3", "store")
    assert r.exit_code == 2 and "0 <= I < N" in r.stderr


FAIL = """
import sys
from lavise_cli import distributed
from lavise_cli.errors import LaviseError

ctx = distributed.setup()
if ctx.rank == 1:
    distributed.fail("the disk is full")
    sys.exit(1)
try:
    distributed.gather("ran")
except distributed.RankFailed as e:
    print(e, flush=True)
    distributed.shutdown()
    sys.exit(1)
"""


@pytest.mark.slow
def test_a_failing_rank_stops_the_others_with_its_message(tmp_path: Path) -> None:
    script = tmp_path / "fail.py"
    script.write_text(FAIL)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LAVISE_DIST_TIMEOUT": "60"}
    p = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "--tee", "1", str(script)],
                       capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode != 0
    assert "rank 1 failed: the disk is full" in p.stdout, p.stdout + p.stderr
