"""The malformed-file catalogue: every damaged, edited or foreign file the kit reads is refused with
one line naming it (``compolab: error: ...``, exit status 2), and nothing saved changes.

A small ITA run from the shipped θ0 gives a run folder; each case damages a copy of it and runs
the command that reads the file (``compose --eval``, ``probe jensen``, or a resumed ``run``).
"""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch
from safetensors.torch import load_file, save_file

from compolab.cli import main
from compolab.data import TinyWorldConfig, tiny_benchmark
from compolab.errors import CompolabError
from compolab.finetune import FinetuneConfig
from compolab.methods import MethodConfig
from compolab.models import load_backbone
from compolab.pool import card_sha256
from compolab.run import RunConfig, run

WORLD = TinyWorldConfig(num_tasks=2, classes_per_task=2, train_per_class=8, val_per_class=1, test_per_class=4)
CFG = RunConfig(method="ita", finetune=FinetuneConfig(style="lora", rank=2, epochs=1, batch_size=16),
                method_cfg=MethodConfig(pretune_epochs=1, align_epochs=1, align_samples=8))  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-task ITA run from the shipped θ0 (pool and state)."""
    out = tmp_path_factory.mktemp("bad_files") / "run"
    run(CFG, out, benchmark=tiny_benchmark(WORLD), backbone=load_backbone()[0], progress=False)
    return out


@pytest.fixture
def folder(trained, tmp_path):
    """A copy of the run, to damage."""
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def _snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_error(capsys, argv) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("compolab: error: "), err
    assert "Traceback" not in err
    return err


# --------------------------------------------------------------------------- damage


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    data = edit(data)
    path.write_text(json.dumps(data))


def _write(path, text):
    path.write_text(text)


def _drop(key):
    def edit(data):
        del data[key]
        return data

    return edit


def _rewrite_module(run_dir, edit):
    """Change task 1's tensors and sign the card again: only the tensor checks can catch it."""
    path, card_path = run_dir / "pool" / "task_001.safetensors", run_dir / "pool" / "task_001.json"
    tensors = edit(dict(load_file(str(path))))
    save_file(tensors, str(path))
    card = json.loads(card_path.read_text())
    card["sha256"] = card_sha256(path, card)
    card_path.write_text(json.dumps(card))


def _first_module_key(tensors):
    return next(k for k in sorted(tensors) if not k.startswith("head::"))


def _wrong_shape(t):
    k = _first_module_key(t)
    return {**t, k: torch.zeros(t[k].shape[0] + 1, *t[k].shape[1:])}


def _wrong_dtype(t):
    k = _first_module_key(t)
    return {**t, k: t[k].double()}


def _integer(t):
    k = _first_module_key(t)
    return {**t, k: t[k].to(torch.int32)}


def _nan(t):
    k = _first_module_key(t)
    return {**t, k: torch.full_like(t[k], float("nan"))}


def _headless(t):
    return {k: v for k, v in t.items() if not k.startswith("head::")}


POOL_CASES = {
    "card is not JSON": (lambda r: _write(r / "pool/task_001.json", '{"task": 1,'),
                         "task_001.json is not valid JSON"),
    "card is a list": (lambda r: _write(r / "pool/task_001.json", "[1, 2]"),
                       "must hold a JSON object, not a list"),
    "card without style": (lambda r: _edit_json(r / "pool/task_001.json", _drop("style")),
                           "style must be one of"),
    "card classes edited": (
        lambda r: _edit_json(r / "pool/task_001.json", lambda c: {**c, "classes": c["classes"][::-1]}),
        "does not match its card",
    ),
    "stray copy of a card": (
        lambda r: shutil.copy(r / "pool/task_001.json", r / "pool/task_001 copy.json"),
        "task_001 copy.json is not a pool file",
    ),
    "module of the wrong shape": (lambda r: _rewrite_module(r, _wrong_shape), "does not fit θ0"),
    "module of the wrong dtype": (lambda r: _rewrite_module(r, _wrong_dtype), "dtype torch.float64"),
    "module of integers": (lambda r: _rewrite_module(r, _integer), "modules are floating point"),
    "module full of NaN": (lambda r: _rewrite_module(r, _nan), "NaN or infinite"),
    "module without its head": (lambda r: _rewrite_module(r, _headless), "no task head"),
    "manifest is not JSON": (lambda r: (r / "pool/pool.json").write_text("{"), "pool.json is not valid JSON"),
    "manifest without theta0_sha256": (lambda r: _edit_json(r / "pool/pool.json", _drop("theta0_sha256")),
                                       "theta0_sha256 is missing"),
    "manifest with an unknown benchmark field": (
        lambda r: _edit_json(r / "pool/pool.json", lambda m: {**m, "benchmark": {**m["benchmark"],
                                                                               "config": {"colours": 3}}}),
        "bad tiny benchmark config",
    ),
    "manifest with a bad benchmark value": (
        lambda r: _edit_json(r / "pool/pool.json", lambda m: {**m, "benchmark": {**m["benchmark"],
                                                                               "config": {"num_tasks": -2}}}),
        "bad tiny benchmark config",
    ),
    "manifest benchmark is a string": (
        lambda r: _edit_json(r / "pool/pool.json", lambda m: {**m, "benchmark": "tiny"}),
        "benchmark must be an object",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(POOL_CASES))
def test_compose_refuses_a_bad_pool_file(capsys, folder, case):
    damage, needle = POOL_CASES[case]
    damage(folder)
    before = _snapshot(folder)
    err = _one_line_error(capsys, ["compose", "--pool", folder / "pool", "--eval", "--no-progress"])
    assert needle in err
    assert _snapshot(folder) == before


def test_the_undamaged_copy_composes(capsys, folder):
    assert main(["compose", "--pool", str(folder / "pool"), "--eval", "--json", "--no-progress"]) == 0
    assert set(json.loads(capsys.readouterr().out)["per_task_accuracy"]) == {"0", "1"}


def test_a_paper_pool_never_reaches_the_network(capsys, folder, tmp_path, monkeypatch):
    _edit_json(folder / "pool/pool.json", lambda m: {**m, "preset": "paper", "checkpoint": None})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache" / "hub"))
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "empty-cache" / "hub"))
    attempts = []

    def no_network(self, address, *a, **k):
        attempts.append(address)
        raise OSError("no network in tests")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    err = _one_line_error(capsys, ["compose", "--pool", folder / "pool"])
    assert "not in the local Hugging Face cache" in err and "never downloads" in err
    assert attempts == []


# --------------------------------------------------------------------------- state under probe jensen

STATE_CASES = {
    "tensors truncated": (lambda r: (r / "state/after_001.safetensors").write_bytes(b"\0" * 16),
                          "does not match after_001.json"),
    "tensors missing": (lambda r: (r / "state/after_001.safetensors").unlink(), "is missing"),
    "JSON damaged": (lambda r: _write(r / "state/after_001.json", "{"), "after_001.json is not valid JSON"),
    "JSON a list": (lambda r: (r / "state/after_001.json").write_text("[]"), "must hold a JSON object"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(STATE_CASES))
def test_probe_jensen_refuses_a_damaged_state(capsys, folder, tmp_path, case):
    damage, needle = STATE_CASES[case]
    damage(folder)
    before = _snapshot(folder)
    out = tmp_path / "jensen.json"
    err = _one_line_error(capsys, ["probe", "jensen", "--pool", folder / "pool", "--out", out,
                                   "--per-task", "2", "--no-progress"])  # fmt: skip
    assert needle in err
    assert not out.exists() and _snapshot(folder) == before


def test_probe_jensen_reads_the_saved_state(capsys, folder, tmp_path):
    out = tmp_path / "jensen.json"
    code = main(["probe", "jensen", "--pool", str(folder / "pool"), "--out", str(out), "--per-task", "2",
                 "--no-progress", "--json"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert len(json.loads(out.read_text())["jensen"]["omega"]) == 2  # Ω from the saved Fisher, K = 1, 2


# --------------------------------------------------------------------------- resume

RESUME_CASES = {
    "results not JSON": (lambda r: (r / "results.json").write_text("{"), "results.json is not valid JSON"),
    "results without commit": (lambda r: _edit_json(r / "results.json", _drop("commit")), "no commit record"),
    "committed state edited": (
        lambda r: _edit_json(r / "state/after_001.json", lambda s: {**s, "fisher_count": 1}),
        "after_001.json changed or vanished",
    ),
    "committed card removed": (lambda r: (r / "pool/task_000.json").unlink(),
                               "task_000.json changed or vanished"),
    "config not JSON": (lambda r: (r / "config.json").write_text("]"), "config.json is not valid JSON"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_refuses_a_damaged_run(folder, case):
    damage, needle = RESUME_CASES[case]
    damage(folder)
    before = _snapshot(folder)
    with pytest.raises(CompolabError) as err:
        run(CFG, folder, resume=True, benchmark=tiny_benchmark(WORLD), backbone=load_backbone()[0],
            progress=False)  # fmt: skip
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert _snapshot(folder) == before
