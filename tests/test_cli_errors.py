"""The bad-flag catalogue: every bad number or ``--out`` is one line ``compolab: error: ...``, exit
status 2, no traceback, before any work, and no run folder left behind (or the existing one
unchanged)."""

from __future__ import annotations

import json
import os

import pytest

from compolab.cli import main
from compolab.data import TinyWorldConfig, tiny_benchmark
from compolab.finetune import FinetuneConfig
from compolab.models import load_backbone
from compolab.run import RunConfig, run


def _one_line_error(capsys, argv) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert out == "" and err.count("\n") == 1 and err.startswith("compolab: error: "), err
    assert "Traceback" not in err
    return err


def _snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


TRAIN_FLAGS = [
    (["--lr", "nan"], "argument --lr: must be a finite number, got nan"),
    (["--lr", "inf"], "argument --lr: must be a finite number, got inf"),
    (["--lr", "0"], "argument --lr: must be > 0, got 0"),
    (["--lr", "-1e-3"], "argument --lr: must be > 0, got -1e-3"),
    (["--alpha", "inf"], "argument --alpha: must be a finite number"),
    (["--alpha", "nan"], "argument --alpha: must be a finite number"),
    (["--beta", "-1"], "argument --beta: must be >= 0"),
    (["--seed", "123456789012345678901234567890"], "argument --seed: must be < 4294967296"),
    (["--seed", "-1"], "argument --seed: must be >= 0"),
    (["--epochs", "0"], "argument --epochs: must be > 0"),
    (["--batch-size", "2.5"], "argument --batch-size: expected a number"),
    (["--rank", "-3"], "argument --rank: must be > 0"),
]


def _flag_id(value) -> str:
    return " ".join(value) if isinstance(value, list) else ""


@pytest.mark.parametrize("flags, needle", TRAIN_FLAGS, ids=_flag_id)
def test_bad_train_flag_is_refused_and_leaves_no_folder(capsys, tmp_path, flags, needle):
    out = tmp_path / "run"
    err = _one_line_error(capsys, ["train", "--method", "ita", "--out", out, *flags])
    assert needle in err
    assert not out.exists()


def test_out_that_is_a_file(capsys, tmp_path):
    out = tmp_path / "results.txt"
    out.write_text("mine")
    err = _one_line_error(capsys, ["train", "--method", "ita", "--out", out])
    assert "is a file, not a folder" in err and out.read_text() == "mine"
    err = _one_line_error(capsys, ["train", "--method", "ita", "--out", out / "run"])
    assert "is a file, not a folder" in err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write anywhere")
def test_out_that_cannot_be_written(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        err = _one_line_error(capsys, ["train", "--method", "ita", "--out", locked / "run"])
        assert "not writable" in err and not (locked / "run").exists()
    finally:
        locked.chmod(0o700)


def test_out_that_holds_something_else_is_refused_untouched(capsys, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.json").write_text('{"precious": true}')
    before = _snapshot(out)
    err = _one_line_error(capsys, ["train", "--method", "ita", "--out", out])
    assert "is not empty and holds no run" in err
    assert _snapshot(out) == before


@pytest.mark.parametrize("make", [False, True])
def test_resume_without_a_run(capsys, tmp_path, make):
    out = tmp_path / "run"
    if make:
        out.mkdir()
    err = _one_line_error(capsys, ["train", "--method", "ita", "--out", out, "--resume"])
    assert ("holds no run" if make else "does not exist") in err
    assert out.exists() == make


# --------------------------------------------------------------------------- compose and probe


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A 2-task naive pool from the shipped θ0."""
    out = tmp_path_factory.mktemp("cli_errors") / "run"
    world = TinyWorldConfig(num_tasks=2, classes_per_task=2, train_per_class=8, val_per_class=1,
                            test_per_class=4)  # fmt: skip
    cfg = RunConfig(method="naive", finetune=FinetuneConfig(epochs=1, batch_size=16, rank=2))
    run(cfg, out, benchmark=tiny_benchmark(world), backbone=load_backbone()[0], progress=False)
    return out / "pool"


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--weights", "nan,0.5"], "--weights expects finite numbers; got 'nan,0.5'"),
        (["--weights", "0.5,inf"], "--weights expects finite numbers"),
        (["--negate-coef", "inf", "--tasks", "0", "--negate", "1"], "--negate-coef: must be a finite"),
    ],
)
def test_compose_refuses_non_finite_weights(capsys, pool, flags, needle):
    before = _snapshot(pool)
    err = _one_line_error(capsys, ["compose", "--pool", pool, "--eval", "--no-progress", *flags])
    assert needle in err and _snapshot(pool) == before


def test_negative_weights_are_values_not_options(capsys, pool):
    code = main(["compose", "--pool", str(pool), "--weights", "-1,0.5", "--json", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["composition"]["coefs"] == [-1.0, 0.5]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["plane", "--span", "0", "inf"], "argument --span: must be a finite number, got inf"),
        (["plane", "--span", "1", "0"], "hi > lo"),
        (["interpolate", "--range", "nan", "1"], "argument --range: must be a finite number, got nan"),
        (["interpolate", "--steps", "0"], "argument --steps: must be > 0"),
    ],
)
def test_probe_refuses_non_finite_ranges_and_writes_nothing(capsys, pool, tmp_path, argv, needle):
    out = tmp_path / "probe.json"
    err = _one_line_error(capsys, ["probe", argv[0], "--pool", pool, "--out", out, *argv[1:]])
    assert needle in err and not out.exists()


# --------------------------------------------------------------------------- fields and flags


def test_a_library_error_names_the_field_and_the_cli_says_its_flag(capsys, tmp_path):
    """The library writes ``num_tasks`` (the Python name); the command line prints ``--tasks``."""
    from compolab.errors import ConfigError
    from compolab.run import run_config

    with pytest.raises(ConfigError, match="`num_tasks` must be > 0") as err:
        run_config("ita", num_tasks=0)
    assert err.value.field == "num_tasks"
    out = tmp_path / "run"
    err = _one_line_error(capsys, ["train", "--method", "ita", "--out", out, "--tasks", "9", "--no-progress"])
    assert "--tasks 9: 'tiny' has 5 tasks" in err and "`" not in err
    assert not out.exists()
    err = _one_line_error(capsys, ["train", "--method", "ita", "--tuning", "prefix", "--out", out])
    assert "--tuning 'prefix' is not a tuning style" in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA GPU is present")
def test_a_device_without_cuda_is_refused_with_its_flag(capsys, pool):
    err = _one_line_error(capsys, ["compose", "--pool", pool, "--device", "cuda"])
    assert "--device 'cuda' asked for, but torch sees no CUDA GPU; use --device cpu" in err
