"""The run driver: every method trains, resumes to identical results, and refuses bad input early."""

import json

import pytest
import torch
from conftest import SMALL_WORLD

from compolab.data import tiny_benchmark
from compolab.errors import ConfigError, TrainingDiverged
from compolab.finetune import FinetuneConfig
from compolab.methods import MethodConfig, get_method
from compolab.pool import Pool
from compolab.run import RunConfig, load_results, run, run_config

SMALL = SMALL_WORLD
FAST = FinetuneConfig(style="lora", rank=2, epochs=1, batch_size=16)
FAST_METHOD = MethodConfig(pretune_epochs=1, align_epochs=1, align_samples=8)


def _cfg(method, style="lora", **kw):
    return RunConfig(method=method, finetune=FinetuneConfig(**{**FAST.__dict__, "style": style}),
                     method_cfg=MethodConfig(**{**FAST_METHOD.__dict__, **kw}))  # fmt: skip


@pytest.mark.parametrize("method", ["ita", "iel", "seq", "naive", "ewc", "joint"])
@pytest.mark.parametrize("style", ["full", "lora", "ia3"])
def test_every_method_and_style_writes_pool_and_results(tmp_path, bench, backbone, method, style):
    results = run(_cfg(method, style), tmp_path, benchmark=bench, backbone=backbone, progress=False)
    saved = load_results(tmp_path)
    assert saved == json.loads(json.dumps(results))
    n_rows = 1 if method == "joint" else 3
    assert len(saved["accuracy_matrix"]) == n_rows and len(saved["task_seconds"]) == n_rows
    last = saved["accuracy_matrix"][-1]
    assert len(last) == 3 and all(0 <= a <= 100 for a in last)
    assert saved["final_accuracy"] == pytest.approx(sum(last) / 3, abs=0.01)
    assert saved["config"]["method"] == method and saved["config"]["finetune"]["style"] == style
    pool = Pool.open(tmp_path / "pool")
    assert pool.tasks() == ([0] if method == "joint" else [0, 1, 2])


@pytest.mark.parametrize("style", ["full", "lora"])
def test_ita_without_its_penalties_is_naive_task_arithmetic(tmp_path, bench, backbone, style):
    """ITA's "no-reg" ablation and naive task arithmetic are one computation: ``compolab reproduce``
    runs it once and reports it in both rows."""
    ita = run(_cfg("ita", style, ablation="no-reg"), tmp_path / "ita", benchmark=bench, backbone=backbone,
              progress=False)  # fmt: skip
    naive = run(_cfg("naive", style), tmp_path / "naive", benchmark=bench, backbone=backbone, progress=False)
    assert ita["accuracy_matrix"] == naive["accuracy_matrix"]
    pools = [Pool.open(tmp_path / m / "pool") for m in ("ita", "naive")]
    for t in range(3):
        a, b = (p.load(t, theta0_sha256=p.manifest["theta0_sha256"]).module.state_dict() for p in pools)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        ha, hb = (p.load(t, theta0_sha256=p.manifest["theta0_sha256"]).head.state_dict() for p in pools)
        assert all(torch.equal(ha[k], hb[k]) for k in ha)


def test_resume_after_a_kill_gives_identical_results(tmp_path, bench, backbone, monkeypatch):
    cfg = _cfg("ita", "lora", alpha=1.0)
    reference = run(cfg, tmp_path / "ref", benchmark=bench, backbone=backbone, progress=False)

    method = type(get_method("ita"))
    train = method.train

    def killed_after_task_1(self, ctx, t):
        if t == 2:
            raise KeyboardInterrupt  # simulated kill while task 2 trains
        return train(self, ctx, t)

    monkeypatch.setattr(method, "train", killed_after_task_1)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "run", benchmark=bench, backbone=backbone, progress=False)
    partial = load_results(tmp_path / "run")
    assert len(partial["accuracy_matrix"]) == 2 and partial["final_accuracy"] is None
    monkeypatch.setattr(method, "train", train)
    resumed = run(cfg, tmp_path / "run", resume=True, benchmark=bench, backbone=backbone, progress=False)
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"]
    assert resumed["final_accuracy"] == reference["final_accuracy"]


def test_resume_refuses_another_config(tmp_path, bench, backbone):
    run(_cfg("naive"), tmp_path, benchmark=bench, backbone=backbone, progress=False)
    before = sorted(p.name for p in (tmp_path / "pool").iterdir())
    with pytest.raises(ConfigError, match="another config.*method"):
        run(_cfg("ita"), tmp_path, resume=True, benchmark=bench, backbone=backbone, progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        run(_cfg("naive"), tmp_path, benchmark=bench, backbone=backbone, progress=False)
    assert sorted(p.name for p in (tmp_path / "pool").iterdir()) == before


def test_nan_loss_stops_with_the_pool_intact(tmp_path, bench, backbone, monkeypatch):
    import compolab.finetune as ft

    calls = {"n": 0}
    real = ft.nn.functional.cross_entropy

    def poisoned(logits, y, *a, **k):
        calls["n"] += 1
        loss = real(logits, y, *a, **k)
        return loss * float("nan") if calls["n"] > 3 else loss  # task 0 has 2 batches; NaN in task 1

    monkeypatch.setattr(ft.nn.functional, "cross_entropy", poisoned)
    with pytest.raises(TrainingDiverged, match="task 1"):
        run(_cfg("naive"), tmp_path, benchmark=bench, backbone=backbone, progress=False)
    pool = Pool.open(tmp_path / "pool")
    assert pool.tasks() == [0]
    pool.load(0, theta0_sha256=pool.manifest["theta0_sha256"])  # still valid


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"method": "magic"}, "`method` 'magic' is unknown"),
        ({"method": "ita", "tuning": "prefix"}, "`style` 'prefix' is not a tuning style"),
        ({"method": "ita", "alpha": -1.0}, "`alpha` must be >= 0"),
        ({"method": "iel", "beta": -0.5}, "`beta` must be >= 0"),
        ({"method": "ita", "ablation": "half"}, "`ablation` 'half' is unknown"),
        ({"method": "ita", "preset": "medium"}, "`preset` 'medium' is unknown"),
    ],
)
def test_bad_config_is_refused_before_training(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        run_config(**kwargs)


def test_empty_task_is_refused_before_training(tmp_path, backbone, monkeypatch):
    bench = tiny_benchmark(SMALL)
    bench.tasks[1].train.labels = bench.tasks[1].train.labels[:0]
    bench.tasks[1].train.images = bench.tasks[1].train.images[:0]
    with pytest.raises(ConfigError, match="task 1 .* no training data"):
        run(_cfg("ita"), tmp_path, benchmark=bench, backbone=backbone, progress=False)
    assert not (tmp_path / "pool").exists()


def test_paper_preset_cifar100_config_matches_the_spec():
    cfg = run_config("ita", "lora", preset="paper", dataset="cifar100")
    ft, mc = cfg.finetune, cfg.method_cfg
    assert (ft.batch_size, ft.accumulate, ft.batch_size * ft.accumulate) == (8, 16, 128)
    assert (ft.lr, ft.weight_decay, ft.epochs, ft.rank, ft.style) == (3e-4, 0.0, 20, 16, "lora")
    assert (mc.alpha, mc.req_weight_cls, mc.simple_reg_weight_cls) == (0.02, 0.025, 0.001)
    assert (mc.pretune_epochs, mc.pretune_lr, mc.align_epochs, mc.align_samples) == (3, 0.01, 10, 256)
    assert mc.fisher_kind == "exact" and mc.fisher_top_k is None
    iel = run_config("iel", "lora", preset="paper", dataset="cifar100", beta=20.0)
    assert (iel.method_cfg.beta, iel.method_cfg.req_weight_cls) == (20.0, 0.1)
    crop = run_config("ita", "lora", preset="paper", dataset="cropdisease")
    assert (crop.finetune.epochs, crop.method_cfg.alpha, crop.method_cfg.pretune_epochs) == (5, 5.0, 1)
