import json
import subprocess
import sys

import pytest

from compolab.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["world", "--preset", "huge"], "--preset 'huge' is unknown"),
        (["data", "--dataset", "imagenet-9000"], "imagenet-9000"),
        (["world", "--time", "-5"], "must be > 0"),
        (["world", "--size", "0"], "must be > 0"),
        (["pretrain", "--steps", "-1"], "must be > 0"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_status_2(capsys, argv, needle):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("compolab: error: ")
    assert needle in err
    assert "Traceback" not in err


def test_missing_data_folder_says_where_files_go(capsys, tmp_path):
    code, _, err = _run(capsys, "data", "--preset", "paper", "--dataset", "cub200",
                        "--root", str(tmp_path))  # fmt: skip
    assert code == 2 and err.count("\n") == 1
    assert "CUB_200_2011" in err and str(tmp_path) in err


def test_pretrain_refuses_to_overwrite(capsys, tmp_path):
    (tmp_path / "b.safetensors").write_bytes(b"x")
    code, _, err = _run(capsys, "pretrain", "--out", str(tmp_path / "b"))
    assert code == 2 and "--force" in err
    assert (tmp_path / "b.safetensors").read_bytes() == b"x"


def test_world_reports_split_and_speed(capsys):
    code, out, _ = _run(capsys, "world", "--time", "500", "--json")
    result = json.loads(out)
    assert code == 0
    assert result["pretrain_classes"] + result["downstream_classes"] >= 200
    assert result["generated"] == 500 and result["images_per_s"] > 0


def test_data_describes_the_tiny_benchmark(capsys):
    code, out, _ = _run(capsys, "data", "--json")
    result = json.loads(out)
    assert code == 0 and result["num_tasks"] == 5 and result["offsets"][-1] == 50


def test_console_entry_point_has_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "compolab.cli", "world", "--preset", "nope"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "compolab: error: --preset 'nope' is unknown; choose one of ['paper', 'real-small', 'tiny']"
    ]


@pytest.mark.slow
def test_probe_shipped_backbone_beats_random_init_by_20_points(capsys):
    code, out, _ = _run(capsys, "world", "--probe", "--json", "--no-progress")
    result = json.loads(out)
    assert code == 0
    assert result["num_classes"] == 100
    assert result["shipped"] - result["random_init"] >= 20.0


# --------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def trained_pool(tmp_path_factory):
    """A 3-task pool trained (briefly) from the shipped θ0 on a small tiny-world benchmark."""
    from compolab.data import TinyWorldConfig, tiny_benchmark
    from compolab.finetune import FinetuneConfig
    from compolab.models import load_backbone
    from compolab.run import RunConfig, run

    out = tmp_path_factory.mktemp("run")
    bench = tiny_benchmark(TinyWorldConfig(num_tasks=3, classes_per_task=2, train_per_class=8,
                                           val_per_class=1, test_per_class=4))  # fmt: skip
    cfg = RunConfig(method="naive", finetune=FinetuneConfig(epochs=1, batch_size=16, rank=2))
    run(cfg, out, benchmark=bench, backbone=load_backbone()[0], progress=False)
    return out / "pool"


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_compose_evaluates_a_specialization(capsys, trained_pool):
    code, out, _ = _run(capsys, "compose", "--pool", str(trained_pool), "--tasks", "0,2", "--eval", "--json",
                        "--no-progress")  # fmt: skip
    result = json.loads(out)
    assert code == 0
    assert result["composition"]["tasks"] == [0, 2] and result["composition"]["coefs"] == [0.5, 0.5]
    assert result["num_classes"] == 4 and set(result["per_task_accuracy"]) == {"0", "2"}
    acc = result["per_task_accuracy"]
    assert result["average_accuracy"] == pytest.approx((acc["0"] + acc["2"]) / 2, abs=0.01)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--tasks", "0,9"], "unknown task id(s) [9] in --tasks"),
        (["--drop", "4"], "unknown task id(s) [4] in --drop"),
        (["--weights", "0.5,0.5"], "got 2 weights for 3 composed tasks"),
        (["--tasks", "zero"], "--tasks expects comma-separated task ids"),
        (["--negate", "1"], "both composed and negated"),
    ],
)
def test_compose_bad_input_changes_nothing(capsys, trained_pool, argv, needle):
    before = _snapshot(trained_pool)
    code, out, err = _run(capsys, "compose", "--pool", str(trained_pool), "--eval", *argv)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert needle in err
    assert _snapshot(trained_pool) == before


def test_compose_refuses_a_damaged_module(capsys, trained_pool, tmp_path):
    import shutil

    pool = tmp_path / "pool"
    shutil.copytree(trained_pool, pool)
    data = (pool / "task_001.safetensors").read_bytes()
    (pool / "task_001.safetensors").write_bytes(data[: len(data) // 2])
    before = _snapshot(pool)
    code, _, err = _run(capsys, "compose", "--pool", str(pool), "--json")
    assert code == 2 and "truncated" in err and err.count("\n") == 1
    assert _snapshot(pool) == before


def test_compose_refuses_a_pool_of_another_backbone(capsys, trained_pool, tmp_path):
    import shutil

    pool = tmp_path / "pool"
    shutil.copytree(trained_pool, pool)
    for path in pool.glob("*.json"):  # the same modules, recorded as trained from another θ0
        data = json.loads(path.read_text())
        data["theta0_sha256"] = "ab" * 32
        path.write_text(json.dumps(data))
    before = _snapshot(pool)
    code, _, err = _run(capsys, "compose", "--pool", str(pool), "--eval")
    assert code == 2 and "another backbone" in err and err.count("\n") == 1
    assert _snapshot(pool) == before


def test_bench_fisher_is_exact(capsys):
    from compolab.bench import bench_fisher

    result = bench_fisher(batch_size=4, num_classes=10, repeats=1, threads=1)
    assert result["max_rel_err"] <= 1e-5
    assert {a["method"] for a in result["approximations"]} >= {"empirical", "mc k=1"}
