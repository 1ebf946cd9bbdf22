"""The editing tables (values computed by hand on synthetic runs), their markdown / CSV, the
measured edits of a real small pool, and ``compolab reproduce``: the plan, bad input, a resumed cache."""

import csv
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest

from compolab.cli import main
from compolab.editing import compose_pool, plan_composition
from compolab.evaluate import evaluate_tasks
from compolab.heads import IncrementalHead
from compolab.io import file_sha256, write_json
from compolab.measure import measure_edits, read_run
from compolab.methods import get_method
from compolab.models import fingerprint, theta0_of
from compolab.pool import Pool
from compolab.reproduce import ReproduceConfig, plan, reproduce
from compolab.reproduce.schedule import _record_notebook
from compolab.run import RunConfig, load_results, run
from compolab.tables import (
    RunRecord,
    Stat,
    composition_table,
    read_table,
    specialization_table,
    unlearning_table,
    write_table,
)
from compolab.tables.policy import MERGED_POOLS

# --------------------------------------------------------------------------- tables, by hand


def _edits(before, drop, negate, subsets):
    return {
        "tasks": [0, 1, 2],
        "negate_coef": 1.0,
        "before": before,
        "drop": drop,
        "negate": negate,
        "subsets": subsets,
    }


def _acc(a, b, c):
    return {"0": a, "1": b, "2": c}


SEED0 = _edits(
    _acc(80, 60, 40),
    {"0": _acc(40, 60, 44), "1": _acc(80, 30, 40), "2": _acc(72, 66, 0)},
    {"0": _acc(20, 60, 40), "1": _acc(80, 15, 40), "2": _acc(80, 60, 10)},
    {
        "1,2": {"subset": {"1": 70, "2": 50}, "full": {"1": 60, "2": 50}},
        "0": {"subset": {"0": 90}, "full": {"0": 85}},
    },
)
SEED1 = _edits(
    _acc(80, 60, 40),
    {"0": _acc(20, 60, 44), "1": _acc(80, 30, 40), "2": _acc(72, 66, 0)},
    {"0": _acc(20, 60, 40), "1": _acc(80, 15, 40), "2": _acc(80, 60, 10)},
    {
        "1,2": {"subset": {"1": 60, "2": 50}, "full": {"1": 60, "2": 50}},
        "0": {"subset": {"0": 80}, "full": {"0": 85}},
    },
)


def test_stat_is_mean_and_sample_std():
    s = Stat.of([70.0, 72.0, 74.0])
    assert (s.mean, s.std, s.n) == (72.0, 2.0, 3)
    assert s.format() == "72.0 ± 2.0" and Stat.of([5.0]).format(2) == "5.00"
    with pytest.raises(ValueError):
        Stat.of([])


def test_composition_table_rows_columns_and_markdown():
    runs = [RunRecord("ita", "lora", "none", s, fa) for s, fa in enumerate([70.0, 72.0, 74.0])]
    runs += [
        RunRecord("ita", "full", "none", 0, 60.0),
        RunRecord("ita", "lora", "no-reg", 0, 50.0),
        RunRecord("joint", "lora", "none", 0, 80.0),
        RunRecord("tmc", "lora", "none", 0, 65.25),
    ]
    table = composition_table(runs)
    assert table.columns == ["method", "full", "lora"]  # styles in the kit's order, only those present
    assert [r["method"] for r in table.rows] == [
        "ITA",
        "ITA without Eq. 12 reg.",
        "TMC",
        "joint (upper bound)",
    ]
    assert table.select(method="ITA")["lora"] == Stat(72.0, 2.0, 3)
    assert table.select(method="TMC")["full"] is None
    md = table.to_markdown().splitlines()
    assert md[2:5] == ["| method | full | lora |", "|---|---|---|", "| ITA | 60.0 | 72.0 ± 2.0 |"]
    assert "| TMC | – | 65.2 |" in md  # missing cell; one seed: the value alone
    rows = list(csv.reader(io.StringIO(table.to_csv())))
    assert rows[0] == ["method", "full", "full std", "full n", "lora", "lora std", "lora n"]
    assert rows[1] == ["ITA", "60.0000", "0.0000", "1", "72.0000", "2.0000", "3"]
    assert rows[3] == ["TMC", "", "", "0", "65.2500", "0.0000", "1"]


def test_read_table_inverts_to_csv(tmp_path):
    runs = [RunRecord("ita", "lora", "none", s, fa) for s, fa in enumerate([70.0, 72.5, 74.0])]
    runs += [RunRecord("ita", "full", "cls-only", 0, 60.125), RunRecord("tmc", "lora", "none", 0, 65.25)]
    table = composition_table(runs)
    back = read_table(write_table(table, tmp_path, "composition")[1])
    assert back.columns == table.columns and back.title == "composition"
    assert [r["method"] for r in back.rows] == [r["method"] for r in table.rows]  # "ITA, Eq. 12 …": a comma
    for row in table.rows:
        for c in ("full", "lora"):
            want, got = row[c], back.select(method=row["method"])[c]
            if want is None:
                assert got is None
            else:
                assert got.n == want.n
                assert (got.mean, got.std) == pytest.approx((want.mean, want.std), abs=1e-4)
    (tmp_path / "bad.csv").write_text("method,lora,lora std,lora n\nITA,1.0\n")
    with pytest.raises(ValueError, match="bad.csv: a row has 2 cells, the header 4"):
        read_table(tmp_path / "bad.csv")


def test_unlearning_table_target_control_and_normalised():
    runs = [
        RunRecord("ita", "lora", "none", 0, 60.0, SEED0),
        RunRecord("ita", "lora", "none", 1, 60.0, SEED1),
        RunRecord("ita", "full", "none", 0, 60.0, SEED0),
    ]  # another style: not in the lora table
    table = unlearning_table(runs, "lora")
    drop0 = table.select(method="ITA", edit="drop τ_k", k="0")
    # seed 0: target 40, control (60 + 44)/2 = 52, 40/80 = 0.5, (60/60 + 44/40)/2 = 1.05; seed 1: target 20
    assert drop0["target"] == Stat.of([40, 20]) and drop0["control"] == Stat.of([52, 52])
    assert drop0["target / before"] == Stat.of([0.5, 0.25])
    assert drop0["control / before"].mean == pytest.approx(1.05) and drop0["control / before"].std == 0
    drop2 = table.select(method="ITA", edit="drop τ_k", k="2")
    assert drop2["target"].mean == 0 and drop2["control / before"].mean == pytest.approx(
        (72 / 80 + 66 / 60) / 2
    )
    mean = table.select(method="ITA", edit="drop τ_k", k="mean")  # per seed over k, then over seeds
    seed0 = (0.5 + 0.5 + 0.0) / 3
    seed1 = (0.25 + 0.5 + 0.0) / 3
    assert mean["target / before"] == Stat.of([seed0, seed1])
    neg1 = table.select(method="ITA", edit="negate τ_k", k="1")
    assert neg1["target"] == Stat.of([15, 15]) and neg1["target / before"].mean == pytest.approx(0.25)
    assert len(table.rows) == 2 * 4  # drop and negate, k = 0, 1, 2 and the mean
    assert "γ = 1.0" in table.note


def test_specialization_table_subset_minus_full():
    runs = [
        RunRecord("ita", "lora", "none", 0, 60.0, SEED0),
        RunRecord("ita", "lora", "none", 1, 60.0, SEED1),
        RunRecord("seq", "lora", "none", 0, 60.0, SEED0),
    ]  # not editable: no row
    table = specialization_table(runs, "lora")
    assert [r["S"] for r in table.rows] == ["{0}", "{1, 2}", "mean"]
    pair = table.select(method="ITA", S="{1, 2}")
    assert pair["subset"] == Stat.of([60, 55]) and pair["full"] == Stat.of([55, 55])
    assert pair["subset − full"] == Stat.of([5, 0])
    mean = table.select(method="ITA", S="mean")
    assert mean["subset − full"] == Stat.of([(5 + 5) / 2, (0 - 5) / 2])


# --------------------------------------------------------------------------- measured edits of a real pool

FAST = {"epochs": 1, "batch_size": 16, "rank": 2}


def _small_run(tmp_path, bench, backbone, method="naive", seed=0):
    from compolab.run import run_config

    cfg = run_config(method, "lora", seed=seed, **FAST)
    run(cfg, tmp_path, benchmark=bench, backbone=backbone, progress=False)
    return cfg


def test_measure_edits_agrees_with_evaluate_tasks(tmp_path, bench, backbone):
    _small_run(tmp_path, bench, backbone)
    edits = measure_edits(tmp_path, backbone=backbone, bench=bench)
    theta0 = theta0_of(backbone)
    entries = Pool.open(tmp_path / "pool").load_all(theta0_sha256=fingerprint(backbone), theta0=theta0)
    every_head = IncrementalHead(
        [entries[t].head for t in range(3)], classes=[entries[t].classes for t in range(3)]
    )
    results = load_results(tmp_path)
    assert [round(edits["before"][str(t)], 2) for t in range(3)] == results["accuracy_matrix"][-1]
    for k in range(3):
        model, _ = compose_pool(backbone, theta0, entries, plan_composition([0, 1, 2], drop=[k]))
        expected = evaluate_tasks(model, every_head, bench, [0, 1, 2])
        assert edits["drop"][str(k)] == pytest.approx({str(t): a for t, a in expected.items()})
        rest = [t for t in range(3) if t != k]
        negated, _ = compose_pool(
            backbone, theta0, entries, plan_composition([0, 1, 2], tasks=rest, negate=[k], negate_coef=0.5)
        )
        expected = evaluate_tasks(negated, every_head, bench, [0, 1, 2])
        assert edits["negate"][str(k)] == pytest.approx({str(t): a for t, a in expected.items()})
        single, head = compose_pool(backbone, theta0, entries, plan_composition([0, 1, 2], tasks=[k]))
        assert edits["subsets"][str(k)]["subset"][str(k)] == pytest.approx(
            evaluate_tasks(single, head, bench)[k]
        )
    assert sorted(edits["subsets"]) == ["0", "0,1", "0,2", "1", "1,2", "2"]
    assert read_run(tmp_path, edits).edits is edits


# --------------------------------------------------------------------------- compolab reproduce


def test_plan_lists_the_grid_the_seeds_and_the_edits(tmp_path, capsys):
    code = main(
        [
            "reproduce",
            "--plan",
            "--json",
            "--cache",
            str(tmp_path / "c"),
            "--out",
            str(tmp_path / "f"),
            "--no-notebooks",
        ]
    )
    assert code == 0
    jobs = json.loads(capsys.readouterr().out)
    runs = [j for j in jobs if j["kind"] == "run"]
    # ITA: 3 styles × (plain, cls-only; no-reg is naive); IEL: 3 styles × (plain, no-reg, cls-only);
    # naive: 3 styles; TMC, seq, joint: LoRA; seeds 1-2 of ITA and IEL (LoRA) and of the other seeded
    # rows (naive LoRA, ITA full, naive full), all on the 10-task benchmark; K-FAC curvature: ITA and IEL
    # in LoRA and full for seed 0, ITA's two for seeds 1-2 too
    assert len(runs) == 3 * 2 + 3 * 3 + 3 + 3 + 2 * 2 + 2 * 3 + 4 + 2 * 2
    assert sum(j["name"].startswith(("naive-lora-s", "ita-full-s", "naive-full-s")) for j in runs) == 9
    kfac = sorted(j["name"].rsplit("-", 1)[0] for j in runs if "-kfac-" in j["name"])
    assert kfac == sorted([f"ita-{s}-kfac-s{i}" for s in ("lora", "full") for i in range(3)]
                          + ["iel-lora-kfac-s0", "iel-full-kfac-s0"])  # fmt: skip
    kfac_cost = {j["name"].rsplit("-", 2)[0]: j["cost"] for j in runs if "-s0-" in j["name"]}
    assert kfac_cost["ita-lora-kfac"] == 2 * kfac_cost["ita-lora"]
    planned = [j for j in plan(ReproduceConfig(notebooks=None)) if j.kind == "run"]
    assert {RunConfig.from_json(j.args["config"]).dataset for j in planned} == {"tiny10"}
    assert not any(j["name"].startswith("ita-") and "-no-reg-" in j["name"] for j in runs)
    assert [j["name"].split("-")[1] for j in runs if j["name"].startswith("tmc-")] == ["lora"]
    assert sum(j["name"].startswith(("seq-lora", "joint-lora")) for j in runs) == 2
    edits = sorted(j["name"].split()[1].rsplit("-", 1)[0] for j in jobs if j["kind"] == "edits")
    assert edits == sorted(
        [
            "ita-lora-s0",
            "ita-lora-s1",
            "ita-lora-s2",
            "iel-lora-s0",
            "iel-lora-s1",
            "iel-lora-s2",
            "tmc-lora-s0",
            "naive-lora-s0",
        ]
    )
    merged = sorted(j["name"].split()[1].rsplit("-", 1)[0] for j in jobs if j["kind"] == "merges")
    assert merged == sorted(f"{m}-{s}-s0" for m, s in MERGED_POOLS)  # seed 0 of the merging table's pools
    probed = sorted(j["name"].split()[1].rsplit("-", 1)[0] for j in jobs if j["kind"] == "curvature")
    pools = ("ita-full", "ita-full-kfac", "naive-full")
    assert probed == sorted(f"{p}-s{i}" for p in pools for i in range(3))
    assert all(j["status"] == "new" and j["cost"] > 0 for j in jobs)
    assert not (tmp_path / "c").exists()  # a plan creates nothing


@pytest.mark.parametrize(
    "argv",
    [
        ["--seeds", "0"],
        ["--methods", "ita,nope"],
        ["--styles", "lora,dora"],
        ["--workers", "-1"],
        ["--tasks", "0"],
        ["--preset", "huge"],
    ],
)
def test_reproduce_refuses_bad_input_in_one_line(tmp_path, capsys, argv):
    assert main(["reproduce", "--plan", "--cache", str(tmp_path), "--no-notebooks", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compolab: error:")


def test_reproduce_resumes_a_half_made_cache(tmp_path, bench, backbone, monkeypatch):
    cfg = ReproduceConfig(
        methods=("naive",),
        styles=("lora",),
        seeds=1,
        workers=1,
        notebooks=None,
        merges=False,
        epochs=1,
        cache=str(tmp_path / "cache"),
        out=str(tmp_path / "figures"),
    )
    method = type(get_method("naive"))
    train = method.train

    def killed_at_task_2(self, ctx, t):
        if t == 2:
            raise KeyboardInterrupt  # as a kill while task 2 trains
        return train(self, ctx, t)

    monkeypatch.setattr(method, "train", killed_at_task_2)
    with pytest.raises(KeyboardInterrupt):
        reproduce(cfg, progress=False, benchmark=bench, backbone=backbone)
    assert [j.status for j in plan(cfg)] == ["partial", "new"]  # the run, then its edits
    monkeypatch.setattr(method, "train", train)
    summary = reproduce(cfg, progress=False, benchmark=bench, backbone=backbone)
    assert summary["failed"] == {} and summary["done"] == 2
    assert json.loads((tmp_path / "cache" / "summary.json").read_text()) == summary
    assert set(summary["cpu_seconds"]) == {"run", "edits"} and summary["cpu_seconds"]["run"] > 0
    run_dir = plan(cfg)[0].args["out"]
    log = open(f"{run_dir}/log.txt").read()
    # tasks 0 and 1 were committed before the kill and are not trained again; task 2 is
    assert log.count("task 0: training") == 1 and log.count("task 2: training") == 2
    run_cfg = RunConfig.from_json(plan(cfg)[0].args["config"])
    assert run_cfg.finetune.epochs == 1 and run_cfg.num_tasks is None and run_cfg.dataset == "tiny10"
    reference = run(run_cfg, tmp_path / "ref", benchmark=bench, backbone=backbone, progress=False)
    assert load_results(run_dir)["accuracy_matrix"] == reference["accuracy_matrix"]
    table = (tmp_path / "figures" / "tables" / "composition.md").read_text()
    assert f"| naive task arithmetic | {reference['final_accuracy']:.1f} |" in table
    assert "ITA without" not in table  # its row comes from the naive run only when ITA is in the grid
    assert "compolab reproduce --seeds 1" in table and (tmp_path / "figures/tables/unlearning.csv").exists()
    assert [j.status for j in plan(cfg)] == ["cached", "cached"]
    again = reproduce(cfg, progress=False, benchmark=bench, backbone=backbone)
    assert again["cached"] == 2 and again["done"] == 2


def test_reproduce_refuses_objects_with_worker_processes(bench):
    with pytest.raises(Exception, match="workers=1"):
        reproduce(ReproduceConfig(workers=2, notebooks=None), progress=False, benchmark=bench)


def test_an_unfinished_run_is_not_read(tmp_path, bench, backbone):
    _small_run(tmp_path, bench, backbone)
    rec = read_run(tmp_path)
    assert rec.method == "naive" and rec.style == "lora" and rec.seed == 0 and rec.edits is None
    data = json.loads((tmp_path / "results.json").read_text())
    data["final_accuracy"] = None
    (tmp_path / "results.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not finished"):
        read_run(tmp_path)


def test_table_methods_are_labelled_and_the_claim_rows_are_editable():
    from compolab.tables import CLAIM_METHODS, TABLE_METHODS

    assert all(get_method(m).label for m in TABLE_METHODS)
    assert set(CLAIM_METHODS) <= set(TABLE_METHODS) and all(get_method(m).editable for m in CLAIM_METHODS)
    assert not get_method("seq").editable and not get_method("joint").editable


def test_tmc_gets_its_own_tiny_schedule_only_on_tiny():
    from compolab.config import get_preset, preset_configs

    tiny_tmc, _ = preset_configs(get_preset("tiny"), get_method("tmc"))
    tiny_ita, _ = preset_configs(get_preset("tiny"), get_method("ita"))
    paper_tmc, _ = preset_configs(get_preset("paper"), get_method("tmc"))
    assert (tiny_tmc.epochs, tiny_tmc.lr) == (8, 3e-2)
    assert (tiny_ita.epochs, tiny_ita.lr) == (4, 3e-3)
    assert paper_tmc == preset_configs(get_preset("paper"), get_method("ita"))[0]


def test_notebooks_wait_for_the_tables_they_read_and_are_cached_by_code(tmp_path):
    import nbformat

    from compolab.io import write_json

    nbs = tmp_path / "nbs"
    nbs.mkdir()
    sources = {"a.ipynb": "savefig(fig, 'a')", "c.ipynb": "print(1)",
               "b.ipynb": "open('../figures/tables/composition.md')\nsavefig(fig, 'b')"}
    for name, src in sources.items():
        nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src)]), nbs / name)
    cfg = ReproduceConfig(methods=("naive",), styles=("lora",), seeds=1, notebooks=str(nbs),
                          cache=str(tmp_path / "cache"), out=str(tmp_path / "figures"))  # fmt: skip
    jobs = {j.name: j for j in plan(cfg)}
    assert "c.ipynb" not in jobs  # draws nothing for the figures folder
    assert jobs["a.ipynb"].after == () and jobs["b.ipynb"].after == ("tables",)
    assert jobs["a.ipynb"].cost == 90.0  # never run: the default estimate
    jobs["a.ipynb"].seconds = 42.0
    _record_notebook(cfg, jobs["a.ipynb"])  # the time goes to the cache and into the notebook
    assert nbformat.read(nbs / "a.ipynb", as_version=4).metadata["compolab"] == {"seconds": 42.0}
    (tmp_path / "cache" / "notebooks.json").unlink()
    assert {j.name: j for j in plan(cfg)}["a.ipynb"].cost == 42.0  # a fresh clone: from the notebook
    record = {n: {"key": jobs[n].args["key"], "seconds": 1.0} for n in ("a.ipynb", "b.ipynb")}
    write_json(tmp_path / "cache" / "notebooks.json", record)
    jobs = {j.name: j for j in plan(cfg)}
    # same code and kit: a is skipped; b reads tables that the new run will change, so it runs again
    assert jobs["a.ipynb"].status == "cached" and jobs["b.ipynb"].status == "new"
    changed = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("savefig(fig, 'a2')")])
    nbformat.write(changed, nbs / "a.ipynb")
    assert {j.name: j for j in plan(cfg)}["a.ipynb"].status == "new"  # its code changed


def test_tables_show_a_shared_run_in_both_rows_and_say_so(tmp_path, monkeypatch):
    import compolab.reproduce.schedule as rp
    import compolab.tables.write as tw

    cfg = ReproduceConfig(methods=("ita", "naive"), styles=("full",), seeds=1, notebooks=None,
                          cache=str(tmp_path / "c"), out=str(tmp_path / "f"))  # fmt: skip
    runs = [j for j in plan(cfg) if j.kind == "run"]
    assert sorted(j.name.split("-s0")[0] for j in runs) == ["ita-full", "ita-full-cls-only", "ita-full-kfac",
                                                             "naive-full"]  # fmt: skip
    fa = {"ita-full": 70.0, "ita-full-cls-only": 65.0, "ita-full-kfac": 72.0, "naive-full": 60.0}
    for j in runs:
        Path(j.args["out"]).mkdir(parents=True)
        Path(j.args["out"], "results.json").write_text("{}")
    ablation = {"ita-full-cls-only": "cls-only"}

    def fake_read_run(out, edits=None):
        name = Path(out).name.split("-s0")[0]
        curvature = "kfac" if name.endswith("-kfac") else "diag"
        return RunRecord(name.split("-")[0], "full", ablation.get(name, "none"), 0, fa[name], edits, str(out),
                         curvature=curvature)  # fmt: skip

    monkeypatch.setattr(tw, "read_run", fake_read_run)
    rp.write_tables(cfg, plan(cfg))
    md = (tmp_path / "f" / "tables" / "composition.md").read_text()
    assert "| ITA without Eq. 12 reg. | 60.0 |" in md and "| naive task arithmetic | 60.0 |" in md
    rows = [md.index(row) for row in ("| ITA | 70.0 |", "| ITA, K-FAC curvature | 72.0 |", "without Eq. 12")]
    assert rows == sorted(rows)
    assert "one computation" in md
    assert "one computation" not in (tmp_path / "f" / "tables" / "unlearning.md").read_text()


def test_fa_by_tasks_table_is_the_mean_over_seeds_of_each_row_of_the_accuracy_matrix():
    from compolab.tables import fa_by_tasks_table

    runs = [RunRecord("ita", "lora", "none", s, 70.0 + s, fa_by_tasks=(90.0, 80.0 + 2 * s, 70.0 + s))
            for s in (0, 1)]
    runs += [RunRecord("naive", "lora", "none", 0, 60.0, fa_by_tasks=(90.0, 75.0, 60.0)),
             RunRecord("naive", "full", "none", 0, 50.0, fa_by_tasks=(85.0, 65.0, 50.0)),
             RunRecord("ita", "lora", "cls-only", 0, 71.0, fa_by_tasks=(90.0, 81.0, 71.0)),  # an ablation
             RunRecord("ita", "lora", "none", 0, 72.0, fa_by_tasks=(91.0, 82.0, 72.0), curvature="kfac"),
             RunRecord("joint", "lora", "none", 0, 85.0, fa_by_tasks=(85.0,))]  # one row: not a T curve
    table = fa_by_tasks_table(runs)
    assert table.columns == ["method", "style", "T=1", "T=2", "T=3"]
    assert [(r["method"], r["style"]) for r in table.rows] == [
        ("naive task arithmetic", "full"), ("ITA", "lora"), ("ITA, K-FAC curvature", "lora"),
        ("naive task arithmetic", "lora")]
    assert table.select(method="ITA, K-FAC curvature", style="lora")["T=2"].mean == 82.0
    assert table.select(method="naive task arithmetic", style="full")["T=2"].mean == 65.0
    ita = table.select(method="ITA", style="lora")
    assert (ita["T=2"].mean, ita["T=2"].n) == (81.0, 2) and ita["T=3"].std == pytest.approx(0.5**0.5)
    assert table.select(method="naive task arithmetic", style="lora")["T=3"].n == 1


def test_read_run_takes_fa_after_each_task_from_the_accuracy_matrix(tmp_path, bench, backbone):
    _small_run(tmp_path, bench, backbone)
    record = read_run(tmp_path)
    matrix = load_results(tmp_path)["accuracy_matrix"]
    assert record.fa_by_tasks == tuple(sum(r) / len(r) for r in matrix)
    assert len(record.fa_by_tasks) == 3
    assert record.fa_by_tasks[-1] == pytest.approx(record.final_accuracy, abs=0.01)


def test_merges_jobs_follow_their_run_and_are_redone_when_the_grids_change(tmp_path, monkeypatch):
    import compolab.merge_pool as mp

    cfg = ReproduceConfig(methods=("naive",), styles=("lora",), seeds=1, notebooks=None,
                          cache=str(tmp_path / "c"), out=str(tmp_path / "f"))  # fmt: skip
    jobs = plan(cfg)
    run, merges = jobs[0], next(j for j in jobs if j.kind == "merges")
    assert merges.after == (run.name,) and merges.args["run_dir"] == run.args["out"]
    assert not any(j.kind == "merges" for j in plan(replace(cfg, merges=False)))
    out = Path(run.args["out"])
    out.mkdir(parents=True)
    write_json(out / "results.json", {"final_accuracy": 50.0})
    Path(merges.args["path"]).parent.mkdir(parents=True)
    grids = {n: mp.GRIDS[n] for n in mp.DEFAULT_MERGES}  # the merges reproduce runs (not the opt-in K-FAC)
    write_json(merges.args["path"], {"results_sha256": file_sha256(out / "results.json"),
                                     "grids": json.loads(json.dumps(grids)), "merges": []})  # fmt: skip
    assert next(j for j in plan(cfg) if j.kind == "merges").status == "cached"
    monkeypatch.setitem(mp.GRIDS, "kfac", [{"damping": 0.5}])
    assert next(j for j in plan(cfg) if j.kind == "merges").status == "cached"  # not a merge it runs
    monkeypatch.setitem(mp.GRIDS, "ties", [{"density": 0.5, "scale": 1.0}])
    assert next(j for j in plan(cfg) if j.kind == "merges").status == "new"  # another grid: merged again


def test_reproduce_merges_a_pool_every_way_and_writes_the_merging_tables(tmp_path, bench, backbone):
    from compolab.merge_pool import DEFAULT_MERGES
    from compolab.merging import MERGES

    assert [n for n in MERGES if n not in DEFAULT_MERGES] == ["kfac"]  # its statistics are opt-in

    cfg = ReproduceConfig(methods=("naive",), styles=("lora",), seeds=1, workers=1, notebooks=None, epochs=1,
                          cache=str(tmp_path / "cache"), out=str(tmp_path / "figures"))  # fmt: skip
    summary = reproduce(cfg, progress=False, benchmark=bench, backbone=backbone)
    assert summary["failed"] == {} and summary["done"] == 3 and summary["cpu_seconds"]["merges"] > 0
    merges = next(j for j in plan(cfg) if j.kind == "merges")
    results = json.loads(Path(merges.args["path"]).read_text())["merges"]
    assert [r["merge"] for r in results] == ["task-arithmetic", *DEFAULT_MERGES]  # the composition first
    assert results[0]["reference"] and results[0]["chosen"] == {}
    table = read_table(tmp_path / "figures" / "tables" / "merging.csv")
    assert table.columns == ["merge", "naive task arithmetic lora"]
    assert len(table.rows) == 1 + len(DEFAULT_MERGES)
    assert (tmp_path / "figures" / "tables" / "merging_lens.md").exists()


def test_curvature_job_and_table_of_a_small_pool(tmp_path, bench, backbone):
    """The curvature job caches the Jensen gap with all three curvatures; the table reads it back:
    Ω / measured and the composed-loss error are the record's own numbers."""
    pytest.importorskip("curvlinops")
    from compolab.probes import JensenGap
    from compolab.reproduce.runs import job_curvature
    from compolab.tables.write import write_curvature_tables

    _small_run(tmp_path / "run", bench, backbone)
    path = tmp_path / "curvature" / "run.json"
    job_curvature(str(tmp_path / "run"), str(path), per_task=3, mc_samples=2, benchmark=bench,
                  backbone=backbone)
    record = json.loads(path.read_text())
    assert record["settings"] == {"per_task": 3, "mc_samples": 2}
    assert record["results_sha256"] == file_sha256(tmp_path / "run" / "results.json")
    gap = JensenGap.from_json(record["jensen"])
    assert set(gap.omegas()) == {"fisher", "kfac", "diagonal"} and gap.sizes == [1, 2, 3]
    written = write_curvature_tables([(str(tmp_path / "run"), str(path))], tmp_path / "tables")
    assert isinstance(written, list) and [p.name for p in written] == ["curvature.md", "curvature.csv"]
    table = read_table(tmp_path / "tables" / "curvature.csv")
    pool = "naive task arithmetic lora"
    kfac = table.select(pool=pool, quantity="Ω / measured", curvature="K-FAC")
    assert kfac["K=3"].mean == pytest.approx(gap.omega_kfac[2] / gap.measured[2], abs=1e-3)
    loss = table.select(pool=pool, quantity="composed-loss error", curvature="diagonal")
    expected = abs(gap.predicted["diagonal"][1] - gap.composed[1]) / gap.composed[1]
    assert loss["K=2"].mean == pytest.approx(expected, abs=1e-3)
    missing = [(str(tmp_path / "run"), str(tmp_path / "missing.json"))]
    assert write_curvature_tables(missing, tmp_path / "t2") == []
