"""``compolab merge`` (``compolab.merge_pool``): a merge of a real pool is the model it claims, its
hyper-parameters are chosen on the validation split, the merged pool opens like any other, the
second-order view matches an independent computation, and every bad request fails in one line with
nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from compolab.cli import main
from compolab.data import TinyWorldConfig, tiny_benchmark
from compolab.editing import compose_pool, plan_composition
from compolab.finetune import FinetuneConfig
from compolab.io import read_json, write_json
from compolab.merge_pool import GRIDS, merge_pool, pool_taus
from compolab.merging import MERGES
from compolab.merging.kfac_merging import kfac_merging
from compolab.models import load_backbone
from compolab.pool import Pool, PoolEntry
from compolab.pool_stats import has_pool_statistics, load_pool_kfacs
from compolab.probes.engine import ProbeData
from compolab.run import RunConfig, run
from compolab.tables import read_table
from compolab.tables.merging import COMPOSITION_ROW, merging_lens_table, merging_table, spearman
from compolab.tables.write import write_merge_tables
from compolab.tuning import FullModule
from compolab.workspace import compose_and_evaluate, open_pool

WORLD = TinyWorldConfig(num_tasks=3, classes_per_task=2, train_per_class=8, val_per_class=4, test_per_class=6)


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    """A 3-task ITA pool (LoRA) of the shipped θ0 on a small tiny world with a validation split."""
    out = tmp_path_factory.mktemp("merge") / "run"
    cfg = RunConfig(method="ita", finetune=FinetuneConfig(epochs=1, batch_size=8, rank=2))
    run(cfg, out, benchmark=tiny_benchmark(WORLD), backbone=load_backbone()[0], progress=False)
    return out / "pool"


def test_task_arithmetic_at_one_over_t_is_the_pools_own_composition(pool_dir, tmp_path):
    summary = merge_pool(pool_dir, "task-arithmetic", tmp_path / "ta", grid=[{"scale": 1 / 3}], lens=False)
    opened = open_pool(pool_dir)
    composed = compose_and_evaluate(opened, plan_composition(opened.tasks))
    assert summary["test_accuracy"] == pytest.approx(composed["average_accuracy"], abs=0.01)
    assert summary["grid"] == [{"hparams": {"scale": 1 / 3}, "val_accuracy": None}]  # one entry: no choice
    # the merged pool opens like any other and its uniform composition is the merged model
    merged = open_pool(tmp_path / "ta")
    assert merged.method is None and merged.pool.manifest["merge"]["merge"] == "task-arithmetic"
    again = compose_and_evaluate(merged, plan_composition(merged.tasks))
    assert again["average_accuracy"] == pytest.approx(summary["test_accuracy"], abs=0.01)
    assert read_json(tmp_path / "ta" / "merge.json") == json.loads(json.dumps(summary))


def test_hyper_parameters_are_chosen_on_validation(pool_dir):
    grid = [{"scale": 0.05}, {"scale": 0.3}, {"scale": 1.0}]
    summary = merge_pool(pool_dir, "task-arithmetic", grid=grid, lens=False)
    vals = [g["val_accuracy"] for g in summary["grid"]]
    assert all(v is not None for v in vals)
    assert summary["chosen"] == grid[max(range(3), key=lambda i: (vals[i], -i))]
    # the validation score of a scale is the accuracy of θ0 + scale·Στ on the val split
    opened = open_pool(pool_dir)
    plan = plan_composition(opened.tasks, coefs=[0.3, 0.3, 0.3])
    assert vals[1] == pytest.approx(
        compose_and_evaluate(opened, plan, split="val")["average_accuracy"], abs=0.01
    )


def test_every_merge_without_statistics_runs_on_a_real_pool(pool_dir):
    for name, merge in MERGES.items():
        if merge.needs:
            continue
        summary = merge_pool(pool_dir, name, grid=GRIDS[name][:1], lens=False)
        assert 0.0 <= summary["test_accuracy"] <= 100.0, name


def test_the_second_order_view_matches_an_independent_computation(pool_dir):
    summary = merge_pool(pool_dir, "ties", grid=[{"density": 0.5, "scale": 0.5}], evaluate=False)
    lens = summary["lens"]
    opened = open_pool(pool_dir)
    ids = sorted(opened.entries)
    tau = MERGES["ties"](pool_taus(opened), density=0.5, scale=0.5)
    model, head = compose_pool(opened.backbone, opened.theta0, opened.entries, plan_composition(ids))
    data = ProbeData.from_benchmark(opened.bench, head.global_labels.tolist(), ids, split="test", per_task=50)
    from compolab.compose import merge as merged_model
    from compolab.task_vector import TaskVector

    merged = merged_model(opened.backbone, opened.theta0, [TaskVector(tau)], [1.0]).eval()
    with torch.no_grad():
        losses = [F.cross_entropy(head(merged(data.x[t])), data.y[t]).item() for t in ids]
        flips = []
        for t in ids:  # own module alone (a one-task plan of the kit's editing) against the merge, head t
            alone, _ = compose_pool(
                opened.backbone, opened.theta0, opened.entries, plan_composition(ids, tasks=[t])
            )
            h = opened.entries[t].head
            flips.append(
                (h(alone(data.x[t])).argmax(1) != h(merged(data.x[t])).argmax(1)).float().mean().item()
            )
    assert lens["split"] == "test"
    assert lens["measured_loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-3)
    assert lens["disentanglement_error"] == pytest.approx(sum(flips) / len(flips), abs=1e-3)
    assert (
        abs(lens["predicted_loss"] - lens["measured_loss"]) < 0.5 * lens["measured_loss"]
    )  # a close estimate


def test_a_tiny_merge_is_predicted_exactly_by_the_second_order_expansion(pool_dir):
    lens = merge_pool(pool_dir, "task-arithmetic", grid=[{"scale": 1e-3}], evaluate=False)["lens"]
    assert lens["predicted_loss"] == pytest.approx(lens["measured_loss"], abs=2e-4)
    assert lens["disentanglement_error"] >= 0.0


def _cli(*argv: str) -> int:
    return main(["merge", *argv, "--no-progress"])


def test_bad_requests_fail_in_one_line_and_write_nothing(pool_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _cli("--pool", str(pool_dir), "--method", "average", "--out", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'average' is not a merge; known merges: task-arithmetic, ties" in err[0]
    assert _cli("--pool", str(pool_dir), "--method", "regmean", "--out", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compolab stats --pool" in err[0] and "grams" in err[0]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert _cli("--pool", str(pool_dir), "--method", "ties", "--out", str(busy)) == 2
    assert "already holds files" in capsys.readouterr().err and (busy / "keep.txt").read_text() == "mine"
    tmc = tmp_path / "tmc-pool"
    shutil.copytree(pool_dir, tmc)
    write_json(tmc / "pool.json", {**read_json(tmc / "pool.json"), "method": "tmc"})
    assert _cli("--pool", str(tmc), "--method", "ties", "--out", str(out)) == 2
    assert "is a TMC pool" in capsys.readouterr().err
    assert not out.exists()


def test_mismatched_modules_name_the_keys_and_write_nothing(pool_dir, tmp_path, capsys):
    odd = tmp_path / "odd-pool"
    shutil.copytree(pool_dir, odd)
    pool = Pool.open(odd)
    opened = open_pool(odd)
    entry = opened.entries[2]
    names = list(entry.module.names)[:-1]  # one target fewer
    delta = entry.module.delta(opened.theta0)
    pool.save(PoolEntry(2, FullModule(names, [delta[n] for n in names]), entry.head, dict(entry.card)))
    out = tmp_path / "out"
    assert _cli("--pool", str(odd), "--method", "ties", "--out", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and entry.module.names[-1] in err[0]
    assert not out.exists()


def _result(merge: str, fa: float, measured: float, predicted: float, reference: bool = False) -> dict:
    lens = {"split": "test", "measured_loss": measured, "predicted_loss": predicted,
            "normalized_accuracy": fa / 100, "disentanglement_error": 0.1}  # fmt: skip
    return {"merge": merge, "test_accuracy": fa, "lens": lens, **({"reference": True} if reference else {})}


def test_merging_tables_show_the_composition_first_and_the_rank_correlation(tmp_path):
    ita = [_result("ties", 60.0, 2.0, 1.9), _result("task-arithmetic", 55.0, 2.5, 2.4, reference=True),
           _result("tsv", 62.0, 1.5, 1.6)]  # fmt: skip
    naive = [_result("ties", 40.0, 3.0, 1.0), _result("tsv", 45.0, 2.0, 1.5)]
    table = merging_table({"ITA lora": ita, "naive full": naive})
    assert [r["merge"] for r in table.rows] == [COMPOSITION_ROW, "ties", "tsv"]
    assert table.select(merge="tsv")["ITA lora"].mean == 62.0
    assert table.select(merge=COMPOSITION_ROW)["naive full"] is None  # not merged that way: no cell
    lens = merging_lens_table({"ITA lora": ita, "naive full": naive})
    assert lens.select(pool="naive full", merge="ties")["predicted loss"].mean == 1.0
    assert "ITA lora +1.00" in lens.note and "naive full -1.00" in lens.note  # ρ(predicted, measured)
    assert spearman([1, 1, 2], [3, 3, 4]) == pytest.approx(1.0) and spearman([1.0], [2.0]) != spearman(
        [1.0], [2.0]
    )
    with pytest.raises(ValueError, match="differ in length"):
        spearman([1, 2], [1])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_json(run_dir / "results.json", {"config": {"method": "ita", "finetune": {"style": "lora"}}})
    write_json(tmp_path / "m.json", {"merges": ita})
    merges = [(str(run_dir), str(tmp_path / "m.json")), (str(run_dir), str(tmp_path / "no.json"))]
    paths = write_merge_tables(merges, tmp_path / "tables", made="_made_")
    assert [p.name for p in paths] == ["merging.md", "merging.csv", "merging_lens.md", "merging_lens.csv"]
    back = read_table(tmp_path / "tables" / "merging.csv")
    assert back.columns == ["merge", "ITA lora"] and back.select(merge="ties")["ITA lora"].mean == 60.0
    assert "_made_" in (tmp_path / "tables" / "merging.md").read_text()


def test_train_save_stats_makes_a_pool_fisher_merging_and_regmean_accept(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--method", "naive", "--tuning", "lora", "--tasks", "2", "--epochs", "1",
            "--out", str(out), "--save-stats", "--json", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert sorted(Path(p).name for p in stats) == [f"{k}_task_00{t}.safetensors" for k in ("fisher", "grams")
                                                   for t in (0, 1)]  # fmt: skip
    for method in ("fisher", "regmean"):
        assert (
            main(["merge", "--pool", str(out / "pool"), "--method", method, "--json", "--no-progress"]) == 0
        )
        result = json.loads(capsys.readouterr().out)
        assert result["merge"] == method and result["test_accuracy"] is None  # no --eval: the choice only
    bad = ["train", "--method", "tmc", "--out", str(tmp_path / "tmc"), "--save-stats", "--no-progress"]
    assert main(bad) == 2 and "--save-stats" in capsys.readouterr().err
    assert not (tmp_path / "tmc").exists()


def test_kfac_merge_end_to_end_from_compolab_stats(pool_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(GRIDS, "kfac", [{"damping": 10.0}, {"damping": 1.0}])  # the cheaper solves (CG)
    pool = tmp_path / "pool"
    shutil.copytree(pool_dir, pool)
    assert _cli("--pool", str(pool), "--method", "kfac") == 2  # no factors yet: the command that makes them
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"`compolab stats --pool {pool} --kind kfac`" in err[0]
    assert main(["stats", "--pool", str(pool), "--kind", "kfac", "--json", "--no-progress"]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    assert [Path(f).name for f in files] == [f"kfac_task_00{t}.safetensors" for t in range(3)]
    assert not has_pool_statistics(pool, "fisher", [0])  # only the kind asked for
    out = tmp_path / "merged"
    assert _cli("--pool", str(pool), "--method", "kfac", "--eval", "--out", str(out), "--json") == 0
    result = json.loads(capsys.readouterr().out)
    vals = [g["val_accuracy"] for g in result["grid"]]
    assert [g["hparams"] for g in result["grid"]] == GRIDS["kfac"] and all(v is not None for v in vals)
    assert result["chosen"] == GRIDS["kfac"][max(range(len(vals)), key=lambda i: (vals[i], -i))]
    # the merged pool holds the K-FAC merge of the pool's τ's with its saved factors, at the choice
    opened = open_pool(pool)
    some = ["blocks.0.attn.qkv.weight", "blocks.5.mlp.fc2.weight"]  # weight by weight: two of them
    taus = [{k: tau[k] for k in some} for tau in pool_taus(opened)]
    expected = kfac_merging(taus, kfacs=load_pool_kfacs(pool, opened.tasks), **result["chosen"])
    merged = open_pool(out)
    held = merged.entries[2].module.delta(merged.theta0)
    assert sorted(held) == sorted(opened.entries[0].module.names)
    for name, value in expected.items():
        torch.testing.assert_close(held[name], value, rtol=1e-5, atol=1e-6 * float(value.abs().max()))
    again = compose_and_evaluate(merged, plan_composition(merged.tasks))
    assert again["average_accuracy"] == pytest.approx(result["test_accuracy"], abs=0.01)
    lens = result["lens"]
    assert lens["split"] == "test" and lens["measured_loss"] > 0 and 0 <= lens["disentanglement_error"] <= 1
    assert abs(lens["predicted_loss"] - lens["measured_loss"]) < 0.5 * lens["measured_loss"]


def test_train_save_stats_takes_the_kinds_it_saves(tmp_path, capsys):
    bad = tmp_path / "bad"
    argv = ["train", "--method", "naive", "--tasks", "1", "--epochs", "1", "--no-progress", "--out"]
    assert main([*argv, str(bad), "--save-stats", "fisher,hessian"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--save-stats 'fisher,hessian': choose from fisher, grams, kfac" in err[0]
    assert not bad.exists()
    out = tmp_path / "run"
    assert main([*argv, str(out), "--save-stats", "kfac", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert [Path(p).name for p in stats] == ["kfac_task_000.safetensors"]
    (kfac,) = load_pool_kfacs(out / "pool", [0])
    assert kfac.num_samples == 100 and kfac.fisher_type == "type-2"  # the Fisher's 100 images, exact kind
    assert not has_pool_statistics(out / "pool", "fisher", [0])


def test_a_merged_pool_opens_in_the_probes_and_the_explorer(pool_dir, tmp_path):
    from compolab.explore.engine import Explorer
    from compolab.probes import open_pool_probe

    merge_pool(pool_dir, "ties", tmp_path / "merged", grid=[{"density": 0.5, "scale": 0.5}], lens=False)
    probe = open_pool_probe(tmp_path / "merged", per_task=4)
    assert len(probe.taus) == 3  # one module per task, each the merged τ
    explorer = Explorer.from_pool(tmp_path / "merged", per_task=1000)  # parallel modules: a singular plane
    view = explorer.evaluate(explorer.default_edit())
    merged = open_pool(tmp_path / "merged")
    expected = compose_and_evaluate(merged, plan_composition(merged.tasks))["per_task_accuracy"]
    assert {str(t): round(a, 2) for t, a in view.accuracy.items()} == pytest.approx(expected, abs=0.01)
    assert view.off_plane == pytest.approx(0.0, abs=1e-6)  # Σ_t τ_t / T lies on the plane of τ_0 and τ_1
