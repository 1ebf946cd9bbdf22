"""Fault injection: a run killed (SIGKILL) at any write point resumes to bit-identical numbers.

Each case runs ``compolab.run.run`` in a forked child process with ``COMPOLAB_FAULT=<point>`` (the
child kills itself there, :func:`compolab.io.fault`), checks that it died of SIGKILL, resumes the run
in this process and compares the accuracy matrix, every module tensor and the method's state with
an uninterrupted run, bit for bit. The points are every kill point of task 1 (the run's
:data:`~compolab.run.TASK_POINTS` and the three stages of each of its atomic writes), the first
writes of a run and a few of task 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

if not hasattr(os, "fork"):
    pytest.skip("the fault-injection tests fork", allow_module_level=True)
from safetensors.torch import load_file

from compolab.data import TinyWorldConfig, tiny_benchmark
from compolab.errors import TrainingDiverged
from compolab.finetune import FinetuneConfig
from compolab.io import WRITE_STAGES, FolderLock, is_temporary
from compolab.methods import MethodConfig
from compolab.models import BackboneSpec, make_backbone
from compolab.run import TASK_POINTS, RunConfig, load_results, run

WORLD = TinyWorldConfig(num_tasks=2, classes_per_task=3, train_per_class=8, val_per_class=1, test_per_class=4)
SPEC = BackboneSpec(embed_dim=16, depth=2, num_heads=2)
CFG = RunConfig(method="ita", finetune=FinetuneConfig(style="lora", rank=2, epochs=1, batch_size=16),
                method_cfg=MethodConfig(pretune_epochs=1, align_epochs=1, align_samples=8))  # fmt: skip

#: The files task 1 writes, in order, and how many times each was written before (results.json: once
#: by task 0).
TASK_1_FILES = [
    ("pool/task_001.safetensors", 1),
    ("pool/task_001.json", 1),
    ("state/after_001.safetensors", 1),
    ("state/after_001.json", 1),
    ("results.json", 2),
]
KILL_POINTS = (
    [f"task 1:{p}" for p in TASK_POINTS]
    + [f"{path.rsplit('/', 1)[-1]}:{stage}@{n}" for path, n in TASK_1_FILES for stage in WRITE_STAGES]
    + ["config.json:written", "pool.json:partial", "task 0:finished", "results.json:written@1"]
)

SCRIPT = """
import json, sys, torch
from compolab.data import TinyWorldConfig, tiny_benchmark
from compolab.models import BackboneSpec, make_backbone
from compolab.run import RunConfig, run
world, spec, cfg, out = json.loads(sys.argv[1])
torch.manual_seed(0)
backbone = make_backbone(BackboneSpec(**spec)).requires_grad_(False)
run(RunConfig.from_json(cfg), out, benchmark=tiny_benchmark(TinyWorldConfig(**world)), backbone=backbone,
    progress=False)
"""


def _backbone():
    torch.manual_seed(0)
    return make_backbone(SPEC).requires_grad_(False)


def _tensors(out) -> dict[str, dict[str, torch.Tensor]]:
    """Every tensor file of a run folder (pool and state), ``{relative path: tensors}``."""
    return {p.relative_to(out).as_posix(): load_file(str(p)) for p in sorted(out.rglob("*.safetensors"))}


def _cards(out) -> dict[str, dict]:
    """The pool's cards without what depends on the clock (seconds, and so the hash)."""
    cards = {}
    for p in sorted((out / "pool").glob("task_*.json")):
        card = json.loads(p.read_text())
        del card["sha256"], card["metrics"]["seconds"]
        cards[p.name] = card
    return cards


@pytest.fixture(scope="module")
def small():
    return tiny_benchmark(WORLD)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small):
    """The uninterrupted run: results and tensors."""
    out = tmp_path_factory.mktemp("reference") / "run"
    results = run(CFG, out, benchmark=small, backbone=_backbone(), progress=False)
    return results, _tensors(out), _cards(out)


def _killed_run(out, point: str, small) -> int:
    """Run in a forked child (this process's warm imports) that SIGKILLs itself at ``point``;
    returns the signal that ended it (0: it was not killed)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        code = 1
        try:
            os.environ["COMPOLAB_FAULT"] = point
            run(CFG, out, benchmark=small, backbone=_backbone(), progress=False)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_at_every_write_point_resumes_to_identical_numbers(tmp_path, small, reference, point):
    out = tmp_path / "run"
    assert _killed_run(out, point, small) == signal.SIGKILL, f"the run did not reach {point!r}"
    assert not (out / "results.json").exists() or load_results(out)["final_accuracy"] is None
    resume = (out / "config.json").exists()  # killed before config.json: a plain new start
    resumed = run(CFG, out, resume=resume, benchmark=small, backbone=_backbone(), progress=False)
    expected, tensors, cards = reference
    assert resumed["accuracy_matrix"] == expected["accuracy_matrix"]
    assert resumed["final_accuracy"] == expected["final_accuracy"]
    assert sorted(resumed["commit"]["files"]) == sorted(expected["commit"]["files"])
    state = "state/after_001.json"
    assert resumed["commit"]["files"][state] == expected["commit"]["files"][state]
    assert _cards(out) == cards
    got = _tensors(out)
    assert sorted(got) == sorted(tensors) == ["pool/task_000.safetensors", "pool/task_001.safetensors",
                                              "state/after_001.safetensors"]  # fmt: skip
    for path, named in tensors.items():
        assert sorted(got[path]) == sorted(named)
        for key, value in named.items():
            assert torch.equal(got[path][key], value), f"{path}:{key} differs after a kill at {point}"
    leftovers = [p.name for p in out.rglob("*") if is_temporary(p.name)]
    assert leftovers == []


def test_uncommitted_files_are_discarded_and_logged(tmp_path, small, reference):
    out = tmp_path / "run"
    assert _killed_run(out, "task 1:evaluated", small) == signal.SIGKILL
    assert (out / "pool" / "task_001.json").exists() and (out / "state" / "after_001.json").exists()
    assert len(load_results(out)["accuracy_matrix"]) == 1  # task 1 trained and saved, not committed
    run(CFG, out, resume=True, benchmark=small, backbone=_backbone(), progress=False)
    log = (out / "log.txt").read_text()
    assert "discarded the uncommitted pool/task_001.json" in log
    assert sorted(p.name for p in (out / "state").iterdir()) == ["after_001.json", "after_001.safetensors"]


def test_a_second_run_on_a_held_folder_is_refused(tmp_path, small):
    out = tmp_path / "run"
    out.mkdir()
    with FolderLock(out):  # another process's run, as the OS sees it
        with pytest.raises(Exception, match="another run holds") as err:
            run(CFG, out, benchmark=small, backbone=_backbone(), progress=False)
        assert type(err.value).__name__ == "CompolabError"
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


@pytest.mark.slow  # two processes training side by side: ≈ 16 s
def test_two_runs_started_together_do_not_mix(tmp_path, small, reference):
    out = tmp_path / "run"
    arg = json.dumps([asdict(WORLD), asdict(SPEC), CFG.to_json(), str(out)])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, arg], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    errors = [p.communicate(timeout=300)[1] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], errors  # one ran, the other was refused
    refused = next(e for e, p in zip(errors, procs, strict=True) if p.returncode != 0)
    assert "another run holds" in refused or "already holds a run" in refused
    assert load_results(out)["accuracy_matrix"] == reference[0]["accuracy_matrix"]


def test_nan_stop_is_logged_and_committed_tasks_stay(tmp_path, small, monkeypatch):
    import compolab.finetune as ft

    calls = {"n": 0}
    real = ft.nn.functional.cross_entropy

    def poisoned(logits, y, *a, **k):
        calls["n"] += 1
        return real(logits, y, *a, **k) * (float("nan") if calls["n"] > 2 else 1.0)

    monkeypatch.setattr(ft.nn.functional, "cross_entropy", poisoned)
    cfg = RunConfig(method="naive", finetune=CFG.finetune)
    with pytest.raises(TrainingDiverged):
        run(cfg, tmp_path, benchmark=small, backbone=_backbone(), progress=False)
    log = (tmp_path / "log.txt").read_text().splitlines()
    assert log[-1].split(" ", 1)[1].startswith("task 1: stopped") and "task 1" in log[-1]
    assert len(load_results(tmp_path)["accuracy_matrix"]) == 1


def test_module_files_and_cards_have_the_same_permissions(tmp_path, small):
    run(RunConfig(method="naive", finetune=CFG.finetune), tmp_path, benchmark=small, backbone=_backbone(),
        progress=False)  # fmt: skip
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "pool").iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes
