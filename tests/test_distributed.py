"""torchrun data parallelism on the CPU (gloo): one module trained with DDP matches one process,
ITA's independent modules trained on different ranks are bit-identical to a sequential run, and
probe points split over ranks give the single-process curve."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compolab.data import make_loader
from compolab.distributed import ShardedBatchSampler, World, shard_weight

BIN = Path(sys.executable).parent
#: Two tasks of the tiny preset, one epoch: 8 optimiser steps of 64 images per task.
SMALL_RUN = ["--tasks", "2", "--epochs", "1", "--device", "cpu", "--no-progress", "--json"]


def _compolab(args: list[str], ranks: int = 1) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    launcher = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={ranks}", "-m", "compolab.cli"]
    cmd = launcher if ranks > 1 else [sys.executable, "-m", "compolab.cli"]
    done = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, done.stdout  # rank 0 alone reports
    return json.loads(lines[0])


def test_shards_are_the_single_process_batches_and_weights_average_to_the_mean():
    data = list(range(10))
    single = [b.tolist() for b in make_loader(data, 4, shuffle=True, seed=3)]
    shards = [list(ShardedBatchSampler(10, 4, shuffle=True, seed=3, world=World(r, 2))) for r in (0, 1)]
    assert [a + b for a, b in zip(*shards, strict=True)] == single  # same images, same order
    for i, batch in enumerate(single):
        sizes = [len(batch[: len(batch) // 2]), len(batch) - len(batch) // 2]
        for r in (0, 1):
            loader = torch.utils.data.DataLoader(data, batch_sampler=ShardedBatchSampler(
                10, 4, shuffle=True, seed=3, world=World(r, 2)))  # fmt: skip
            weight, n = shard_weight(loader, i, sizes[r])
            assert n == len(batch) and weight == pytest.approx(sizes[r] * 2 / len(batch))
    # a last batch smaller than the world: the empty shard gets one image with weight 0
    tiny = ShardedBatchSampler(3, 2, shuffle=False, seed=0, world=World(1, 4))
    assert list(tiny)[-1] == [2] and tiny.weights[-1] == 0.0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    out = {}
    for method in ("iel", "ita"):
        for ranks in (1, 2):
            folder = root / f"{method}-{ranks}"
            out[method, ranks] = (folder, _compolab(["train", "--method", method, "--out", str(folder),
                                                     *SMALL_RUN], ranks))  # fmt: skip
    return out


def _modules(folder: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(folder / "pool" / f"task_{t:03d}.safetensors") for t in (0, 1)]


@pytest.mark.slow  # torchrun: ≈ 100 s of 2 cores; in `make test`, not `make check`
def test_torchrun_ddp_trains_one_module_like_one_process(runs):
    """IEL under torchrun: each module trains data-parallel (DDP, 2 ranks × 32 images per step).

    The averaged gradient equals the full batch's up to float32 summation order (two half-batch
    means averaged instead of one mean): a few unit roundoffs u = 6e-8 per step. AdamW passes
    relative gradient differences through about 1:1, over 8 steps per task and 2 tasks, so the
    task vectors may drift apart by ~100 u; the bound below is 1000 u = 6e-5 relative (measured:
    ~2e-6).
    """
    (single, a), (ddp, b) = runs["iel", 1], runs["iel", 2]
    assert b["runtime"]["world_size"] == 2 and a["runtime"]["world_size"] == 1
    for ta, tb in zip(_modules(single), _modules(ddp), strict=True):
        assert set(ta) == set(tb)
        num = sum(float((ta[k].double() - tb[k].double()).square().sum()) for k in ta) ** 0.5
        den = sum(float(ta[k].double().square().sum()) for k in ta) ** 0.5
        assert den > 0 and num / den < 1000 * 6e-8
    assert b["accuracy_matrix"] == a["accuracy_matrix"]


@pytest.mark.slow  # torchrun: ≈ 100 s of 2 cores; in `make test`, not `make check`
def test_torchrun_trains_ita_modules_on_separate_ranks_bit_identically(runs):
    """ITA's τ_t never depends on τ_s: task t trains on rank t mod 2; same seeds, same operations."""
    (single, a), (parallel, b) = runs["ita", 1], runs["ita", 2]
    for ta, tb in zip(_modules(single), _modules(parallel), strict=True):
        assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert b["accuracy_matrix"] == a["accuracy_matrix"]
    for name in ("after_001.json", "after_001.safetensors"):  # the resume state, as sequential
        assert (single / "state" / name).read_bytes() == (parallel / "state" / name).read_bytes()
    cards = [json.loads((f / "pool" / "task_001.json").read_text()) for f in (single, parallel)]
    assert cards[0]["metrics"]["history"] == cards[1]["metrics"]["history"]


@pytest.mark.slow  # torchrun: ≈ 100 s of 2 cores; in `make test`, not `make check`
def test_torchrun_probe_splits_points_over_ranks(runs, tmp_path):
    pool = runs["ita", 1][0] / "pool"
    curves = []
    for ranks in (1, 2):
        out = tmp_path / f"curve{ranks}.json"
        _compolab(["probe", "interpolate", "--pool", str(pool), "--steps", "5", "--per-task", "8",
                   "--second-order", "none", "--device", "cpu", "--out", str(out), "--json"],
                  ranks)  # fmt: skip
        curves.append(json.loads(out.read_text())["curves"])
    assert curves[0] == curves[1]  # every point computed once, on one rank, by the same operations
