"""ITA and IEL with ``curvature="kfac"``: the default leaves configs and modules as they were, the
penalty is the saved factors', a killed run resumes with them, and bad input is refused by name."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from compolab.cli import main
from compolab.errors import CompolabError, ConfigError
from compolab.finetune import FinetuneConfig
from compolab.fisher import DiagonalFisher, FisherAccumulator
from compolab.io import WRITE_STAGES
from compolab.kfac import KFAC, iel_kfac_penalty, kfac_penalty
from compolab.methods import MethodConfig, get_method, ita_iel
from compolab.methods.penalties import iel_penalty
from compolab.methods.state import kfac_path, load_second_order_state
from compolab.models import theta0_of
from compolab.pool import Pool
from compolab.reproduce.plan import _run_name
from compolab.run import RunConfig, load_results, run, run_config

pytest.importorskip("curvlinops")

FAST = FinetuneConfig(style="lora", rank=2, epochs=1, batch_size=16)
FAST_METHOD = MethodConfig(pretune_epochs=1, align_epochs=1, align_samples=8, fisher_samples=20)

#: ``run_config("iel", "lora", num_tasks=2).to_json()`` and its ``compolab reproduce`` name, as made
#: before ``curvature`` existed: a cached run must keep both.
OLD_CONFIG = json.loads("""{"method": "iel", "preset": "tiny", "dataset": null, "finetune": {"style": "lora",
"rank": 4, "epochs": 4, "batch_size": 64, "accumulate": 1, "lr": 0.003, "weight_decay": 0.0, "seed": 0},
"method_cfg": {"alpha": 1000.0, "beta": 1000.0, "ewc_lambda": 1.0, "ablation": "none", "pretune": true,
"req_weight_cls": 1.0, "simple_reg_weight_cls": 0.001, "pretune_epochs": 3, "pretune_lr": 0.01,
"align_epochs": 10, "align_samples": 64, "fisher_kind": "mc", "fisher_top_k": null, "fisher_samples": 200,
"mc_samples": 1, "decoupled": false}, "checkpoint": null, "num_tasks": 2}""")
OLD_NAME = "iel-lora-s0-9cc0ac61"


def _cfg(method, **kw):
    return RunConfig(method=method, finetune=FAST, method_cfg=MethodConfig(**{**FAST_METHOD.__dict__, **kw}),
                     num_tasks=2)  # fmt: skip


def _modules(folder):
    pool = Pool.open(folder / "pool")
    return {t: pool.load(t, theta0_sha256=pool.manifest["theta0_sha256"]).module for t in pool.tasks()}


def _equal_modules(a, b):
    return a.keys() == b.keys() and all(
        all(torch.equal(x, y) for x, y in zip(a[t].state_tensors().values(), b[t].state_tensors().values(),
                                              strict=True))
        for t in a
    )  # fmt: skip


# --------------------------------------------------------------------------- diag: nothing changes


def test_the_default_curvature_keeps_old_configs_and_their_cache_names():
    new = run_config("iel", "lora", num_tasks=2)
    assert new.method_cfg.curvature == "diag"
    assert new.to_json() == OLD_CONFIG and "curvature" not in new.to_json()["method_cfg"]
    assert RunConfig.from_json(OLD_CONFIG) == new
    assert _run_name(new) == _run_name(run_config("iel", "lora", num_tasks=2, curvature="diag")) == OLD_NAME
    kfac = run_config("iel", "lora", num_tasks=2, curvature="kfac")
    assert kfac.to_json()["method_cfg"]["curvature"] == "kfac" and _run_name(kfac) != OLD_NAME
    assert RunConfig.from_json(json.loads(json.dumps(kfac.to_json()))) == kfac


@pytest.mark.parametrize("method", ["ita", "iel"])
def test_diag_modules_equal_the_default_run(tmp_path, bench, backbone, method):
    default, diag = _cfg(method), _cfg(method, curvature="diag")
    assert diag.to_json() == default.to_json()
    for name, cfg in (("default", default), ("diag", diag)):
        run(cfg, tmp_path / name, benchmark=bench, backbone=backbone, progress=False)
    assert _equal_modules(_modules(tmp_path / "default"), _modules(tmp_path / "diag"))
    assert not list((tmp_path / "diag" / "state").glob("kfac_*"))
    card = json.loads((tmp_path / "diag" / "pool" / "task_000.json").read_text())
    assert "curvature" not in card["hparams"]["method_cfg"]


# --------------------------------------------------------------------------- kfac: the penalty


def test_iel_kfac_penalty_is_iel_penalty_when_the_kfacs_are_diagonal():
    """Diagonal A and G make A ⊗ G the diagonal outer(g, a); with integer entries and sample counts
    1 and 3 (weights 1/4, 3/4) every product and sum is exact in float64, so the two are equal."""
    gen = torch.Generator().manual_seed(0)

    def ints(*shape):
        return torch.randint(-4, 5, shape, generator=gen).double()

    names = {"a": (3, 5), "b": (2, 4)}  # (out, in)
    tau, prev = ({n: ints(*s) for n, s in names.items()} for _ in range(2))
    kfacs, acc = [], FisherAccumulator(prior=0.0)
    for count in (1, 3):
        factors = {n: (torch.diag(ints(i).abs()), torch.diag(ints(o).abs())) for n, (o, i) in names.items()}
        kfacs.append(KFAC(factors, num_samples=count))
        diagonal = kfacs[-1].diagonal()
        acc.add_task(DiagonalFisher({n: count * d for n, d in diagonal.items()}, count))  # a sum over samples
    for t in (0, 1):
        expected = iel_penalty(tau, prev if t else {}, acc.iel(1), beta=3.0, t=t)
        got = iel_kfac_penalty(tau, prev if t else {}, kfacs, beta=3.0, t=t)
        assert got.dtype == torch.float64 and torch.equal(got, expected) and got != 0
    assert iel_kfac_penalty(tau, prev, [], beta=3.0, t=1) == 0
    with pytest.raises(ConfigError, match="without K-FAC factors"):
        iel_kfac_penalty({"c": torch.zeros(1, 1)}, {}, kfacs, beta=1.0, t=0)


def _spy_penalties(monkeypatch):
    """The backbone + head penalty closure each task trains with, by task order."""
    closures, real = [], ita_iel.finetune_task

    def spy(*args, penalty, **kwargs):
        closures.append(penalty)
        return real(*args, penalty=penalty, **kwargs)

    monkeypatch.setattr(ita_iel, "finetune_task", spy)
    return closures


@pytest.mark.parametrize("method", ["ita", "iel"])
def test_kfac_penalty_is_the_saved_factors_on_the_saved_module(tmp_path, bench, backbone, method,
                                                                monkeypatch):  # fmt: skip
    closures = _spy_penalties(monkeypatch)
    cfg = _cfg(method, curvature="kfac", alpha=50.0, beta=50.0)
    results = run(cfg, tmp_path, benchmark=bench, backbone=backbone, progress=False)
    assert results["final_accuracy"] is not None and len(closures) == 2
    state = tmp_path / "state"
    k0, k1 = (KFAC.load(kfac_path(state, t)) for t in (0, 1))
    assert [k0.num_samples, k1.num_samples] == [20, 20]  # fisher_samples
    assert k0.fisher_type == k1.fisher_type == "type-2"  # fisher_kind "exact"
    theta0, modules = theta0_of(backbone), _modules(tmp_path)
    tau0, tau1 = (dict(modules[t].delta(theta0)) for t in (0, 1))
    anchor = load_second_order_state(state, 1).cpre.heads[1]  # C_pre[1]: the head penalty is 0 there
    with torch.no_grad():
        trained = closures[1](modules[1], anchor)
        if method == "ita":  # Eq. 12: task 0's K-FAC only
            expected = kfac_penalty(tau1, [k0], 50.0)
        else:  # Eq. 19: both tasks' K-FACs, the cross term with τ_0
            expected = iel_kfac_penalty(tau1, tau0, [k0, k1], 50.0, 1)
    assert float(trained) > 0
    torch.testing.assert_close(trained, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("ablation", ["no-reg", "cls-only"])
def test_the_ablations_without_the_backbone_penalty_compute_no_kfac(tmp_path, bench, backbone, ablation,
                                                                     monkeypatch):  # fmt: skip
    monkeypatch.setattr(ita_iel, "kfac_at", lambda *a, **k: pytest.fail("K-FAC computed"))
    run(_cfg("iel", curvature="kfac", ablation=ablation), tmp_path, benchmark=bench, backbone=backbone,
        progress=False)  # fmt: skip
    assert not list((tmp_path / "state").glob("kfac_*"))


# --------------------------------------------------------------------------- kfac: resume


@pytest.mark.parametrize("method", ["ita", "iel"])
def test_a_kfac_run_killed_after_task_0_resumes_with_the_saved_factors(
    tmp_path, bench, backbone, method, monkeypatch
):
    cfg = _cfg(method, curvature="kfac", alpha=50.0, beta=50.0)
    reference = run(cfg, tmp_path / "ref", benchmark=bench, backbone=backbone, progress=False)
    cls = type(get_method(method))
    train = cls.train

    def killed_in_task_1(self, ctx, t):
        if t == 1:
            raise KeyboardInterrupt  # simulated kill while task 1 trains
        return train(self, ctx, t)

    monkeypatch.setattr(cls, "train", killed_in_task_1)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "run", benchmark=bench, backbone=backbone, progress=False)
    monkeypatch.setattr(cls, "train", train)
    assert len(load_results(tmp_path / "run")["accuracy_matrix"]) == 1
    assert kfac_path(tmp_path / "run" / "state", 0).exists()
    shutil.copytree(tmp_path / "run", tmp_path / "damaged")

    computed, real = [], ita_iel.kfac_at
    monkeypatch.setattr(ita_iel, "kfac_at", lambda *a, **k: computed.append(1) or real(*a, **k))
    resumed = run(cfg, tmp_path / "run", resume=True, benchmark=bench, backbone=backbone, progress=False)
    assert computed == [1]  # task 1's factors only: task 0's were read back
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"]
    assert _equal_modules(_modules(tmp_path / "run"), _modules(tmp_path / "ref"))

    path = kfac_path(tmp_path / "damaged" / "state", 0)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(CompolabError, match="kfac_000.safetensors is missing or does not match"):
        run(cfg, tmp_path / "damaged", resume=True, benchmark=bench, backbone=backbone, progress=False)


#: Kill points around the K-FAC file of task 1 (as ``tests/test_faults.py``, for one kfac run).
KFAC_KILLS = [f"kfac_001.safetensors:{s}@1" for s in WRITE_STAGES] + [
    "after_001.json:partial@1", "task 1:finished", "task 1:committed"]  # fmt: skip


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a child that kills itself")
@pytest.mark.parametrize("point", KFAC_KILLS)
def test_a_kfac_run_killed_at_a_write_resumes_to_identical_tensors(tmp_path, bench, backbone, point):
    cfg = _cfg("iel", curvature="kfac", beta=50.0)
    reference = run(cfg, tmp_path / "ref", benchmark=bench, backbone=backbone, progress=False)
    pid = os.fork()
    if pid == 0:  # the child SIGKILLs itself at the point (compolab.io.fault)
        code = 1
        try:
            os.environ["COMPOLAB_FAULT"] = point
            run(cfg, tmp_path / "run", benchmark=bench, backbone=backbone, progress=False)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"{point!r} not reached"
    resumed = run(cfg, tmp_path / "run", resume=True, benchmark=bench, backbone=backbone, progress=False)
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"]
    files = sorted(p.relative_to(tmp_path / "ref") for p in (tmp_path / "ref").rglob("*.safetensors"))
    assert files == sorted(p.relative_to(tmp_path / "run") for p in (tmp_path / "run").rglob("*.safetensors"))
    for rel in files:
        a, b = load_file(str(tmp_path / "ref" / rel)), load_file(str(tmp_path / "run" / rel))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel


# --------------------------------------------------------------------------- bad input


def _one_line_error(capsys, argv) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("compolab: error: "), err
    return err


def test_an_unknown_curvature_is_refused_by_its_flag(capsys, tmp_path):
    argv = ["train", "--method", "ita", "--curvature", "cubic", "--out", tmp_path / "r"]
    err = _one_line_error(capsys, argv)
    assert "--curvature 'cubic' is unknown" in err and not (tmp_path / "r").exists()
    with pytest.raises(ConfigError) as e:
        MethodConfig(curvature="cubic")
    assert e.value.field == "curvature"


def test_kfac_is_refused_for_methods_without_it(capsys, tmp_path):
    argv = ["train", "--method", "naive", "--curvature", "kfac", "--out", tmp_path / "r"]
    err = _one_line_error(capsys, argv)
    assert "--curvature 'kfac': --method 'naive' takes only ['diag']" in err and not (tmp_path / "r").exists()
    for method in ("seq", "ewc", "joint", "tmc"):
        with pytest.raises(ConfigError) as e:
            run_config(method, curvature="kfac")
        assert e.value.field == "curvature"
    with pytest.raises(ConfigError, match="`curvature` 'kfac' takes no `fisher_top_k`"):
        _cfg("ita", curvature="kfac", fisher_top_k=2)


def test_the_probe_keeps_its_own_flag_for_curvature():
    from compolab.cli.parser import build_parser, flags_of

    parser = build_parser()
    assert flags_of(parser, "train")["curvature"] == "--curvature"
    assert flags_of(parser, "probe")["curvature"] == flags_of(parser)["curvature"] == "--second-order"
