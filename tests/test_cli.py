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
        (["world", "--preset", "huge"], "unknown preset 'huge'"),
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
        "compolab: error: unknown preset 'nope'; choose one of ['paper', 'tiny']"
    ]


@pytest.mark.slow
def test_probe_shipped_backbone_beats_random_init_by_20_points(capsys):
    code, out, _ = _run(capsys, "world", "--probe", "--json", "--no-progress")
    result = json.loads(out)
    assert code == 0
    assert result["num_classes"] == 100
    assert result["shipped"] - result["random_init"] >= 20.0
