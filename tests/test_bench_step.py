"""``compolab bench step`` on the CPU: every step kind is timed, K-FAC steps included, and a machine
without curvlinops (the GPU image) still gets the other numbers."""

from __future__ import annotations

import sys

from compolab.bench import bench_step
from compolab.models import make_backbone, tuned_weight_names


def test_bench_step_times_the_kfac_steps_against_the_diagonal_ones():
    result = bench_step(repeats=1, steps=1)
    kinds = {
        "plain",
        "ita",
        "iel",
        "ita+kfac",
        "iel+kfac",
        "plain+stem-cache",
        "ita+stem-cache",
        "iel+stem-cache",
    }
    assert set(result["images_per_s"]) == kinds and all(v > 0 for v in result["images_per_s"].values())
    assert set(result["kfac_over_diag"]) == {"ita", "iel"} and all(
        v > 0 for v in result["kfac_over_diag"].values()
    )
    from compolab.config import get_preset

    backbone = make_backbone(get_preset("tiny").backbone)
    shapes = [dict(backbone.named_parameters())[n].shape for n in tuned_weight_names(backbone)]
    assert result["kfac_bytes"] == sum(4 * (i * i + o * o) for o, i in shapes)  # A: in², G: out², float32


def test_bench_step_without_curvlinops_reports_no_kfac(monkeypatch):
    monkeypatch.setitem(sys.modules, "curvlinops", None)  # `import curvlinops` raises ImportError
    result = bench_step(repeats=1, steps=1)
    assert result["kfac_over_diag"] is None and result["kfac_bytes"] is None
    assert "ita+kfac" not in result["images_per_s"] and result["images_per_s"]["ita"] > 0
