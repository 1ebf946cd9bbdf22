"""TMC as a method: the loss and its schedule, training one component, a run through ``run()`` that is
evaluated with the linearised composition, and the output-ensemble baseline."""

import json

import pytest
import torch
from conftest import SMALL_SPEC, SMALL_WORLD
from torch.testing import assert_close

from compolab.editing import plan_composition
from compolab.evaluate import evaluate_tasks
from compolab.finetune import FinetuneConfig
from compolab.linearize import LinearizedModel
from compolab.models import fingerprint, theta0_of, tuned_weight_names
from compolab.pool import Pool
from compolab.run import RunConfig, load_results, run
from compolab.task_vector import TaskVector
from compolab.tmc import (
    OutputEnsemble,
    TMCConfig,
    base_head,
    component_of,
    compose_tmc_pool,
    ensemble_predict,
    norm_penalty,
    scaled_square_loss,
    step_factor,
    train_component,
)

SMALL = SMALL_WORLD
SPEC = SMALL_SPEC


def test_square_loss_targets_kappa_on_the_true_class_and_zero_elsewhere():
    labels = torch.tensor([1, 3])
    # all-zero outputs: the only error is kappa on each true class, averaged over 2 x 4 entries
    assert float(scaled_square_loss(torch.zeros(2, 4), labels, kappa=15.0)) == pytest.approx(2 * 15**2 / 8)
    assert float(scaled_square_loss(torch.zeros(2, 4), labels, kappa=5.0)) == pytest.approx(2 * 5**2 / 8)
    perfect = 15.0 * torch.nn.functional.one_hot(labels, 4).float()
    assert float(scaled_square_loss(perfect, labels, kappa=15.0)) == 0.0
    # one wrong unit on an unseen-class column counts as much as on the true one
    off = perfect.clone()
    off[0, 2] = 1.0
    assert float(scaled_square_loss(off, labels)) == pytest.approx(1 / 8)


def test_norm_penalty_is_the_l2_norm_not_its_square():
    p = [torch.tensor([3.0, 0.0], requires_grad=True), torch.tensor([[4.0]], requires_grad=True)]
    value = norm_penalty(p, wd=1e-5)
    assert value.item() == pytest.approx(1e-5 * (25 + 1e-6) ** 0.5)
    value.backward()
    assert_close(p[0].grad, 1e-5 * torch.tensor([3.0, 0.0]) / (25 + 1e-6) ** 0.5)
    zero = torch.zeros(3, requires_grad=True)
    norm_penalty([zero]).backward()
    assert torch.isfinite(zero.grad).all()  # the 1e-6 keeps the gradient finite at tau = 0


def test_step_schedule_divides_by_ten_at_half_and_four_fifths():
    assert [step_factor(e, 10) for e in range(10)] == pytest.approx([1.0] * 5 + [0.1] * 3 + [0.01] * 2)
    paper = [step_factor(e, 50) for e in (0, 24, 25, 39, 40, 49)]  # x0.1 after epochs 25 and 40
    assert paper == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert step_factor(0, 1) == 1.0


def test_base_head_is_seeded_and_shared():
    a, b, c = base_head(16, 9, seed=3), base_head(16, 9, seed=3), base_head(16, 9, seed=4)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)
    assert a.weight.abs().max() <= 16**-0.5 and not a.weight.requires_grad


def test_training_a_component_moves_only_the_tangent_and_fits_the_task(bench, backbone):
    theta0, names = theta0_of(backbone), tuned_weight_names(backbone)
    before = fingerprint(backbone)
    head = base_head(SPEC.embed_dim, bench.num_classes, seed=0)
    head_before = head.weight.clone()
    cfg = FinetuneConfig(style="full", epochs=4, batch_size=12, lr=1e-2)
    result = train_component(backbone, theta0, bench.tasks[1], head, cfg, names=names)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert result.head.weight.shape == (bench.num_classes, SPEC.embed_dim)  # a full-size output
    assert fingerprint(backbone) == before and torch.equal(head.weight, head_before)
    assert result.module.delta(theta0).norm() > 0 and result.head.weight.abs().sum() > 0


@pytest.mark.parametrize("style", ["full", "lora"])
def test_run_trains_tmc_and_evaluates_the_linearised_composition(tmp_path, bench, backbone, style):
    finetune = FinetuneConfig(style=style, rank=2, epochs=1, batch_size=16, lr=1e-3)
    cfg = RunConfig(method="tmc", finetune=finetune)
    results = run(cfg, tmp_path, benchmark=bench, backbone=backbone, progress=False)
    saved = load_results(tmp_path)
    assert saved == json.loads(json.dumps(results))
    last = saved["accuracy_matrix"][-1]
    assert len(saved["accuracy_matrix"]) == 3 and len(last) == 3
    assert 0 <= saved["final_accuracy"] <= 100
    assert saved["final_accuracy"] == pytest.approx(sum(last) / 3, abs=0.01)
    pool = Pool.open(tmp_path / "pool")
    assert pool.tasks() == [0, 1, 2] and pool.manifest["method"] == "tmc"
    entries = pool.load_all(theta0_sha256=fingerprint(backbone))
    assert entries[0].card["hparams"]["tmc"]["kappa"] == 15.0
    # re-evaluating the stored pool with the linearised composition gives the run's last row
    theta0 = theta0_of(backbone)
    model, head = compose_tmc_pool(backbone, theta0, entries, plan_composition([0, 1, 2]))
    assert isinstance(model, LinearizedModel)
    acc = evaluate_tasks(model, head, bench, [0, 1, 2])
    assert [round(acc[t], 2) for t in range(3)] == last
    # unlearning task 1: its classes leave the output, the others keep the linearised average of 0 and 2
    model, head = compose_tmc_pool(backbone, theta0, entries, plan_composition([0, 1, 2], drop=[1]))
    assert head.global_labels.tolist() == [*bench.tasks[0].classes, *bench.tasks[2].classes]
    x = torch.stack([bench.tasks[0].test[i][0] for i in range(4)])
    comps = [component_of(entries[t], theta0) for t in (0, 2)]
    shared = base_head(SPEC.embed_dim, bench.num_classes, seed=cfg.finetune.seed)
    with torch.no_grad():
        pair = [LinearizedModel(backbone, tau=c.tau, head=shared, head_delta=c.head)(x) for c in comps]
        assert_close(model(x), (pair[0] + pair[1]) / 2, rtol=1e-4, atol=1e-5)
    # negating task 0 while composing 1 and 2: every component keeps its own weight, whatever the id order
    plan = plan_composition([0, 1, 2], tasks=[1, 2], negate=[0], negate_coef=0.25)
    model, _ = compose_tmc_pool(backbone, theta0, entries, plan)
    comps = {t: component_of(entries[t], theta0) for t in range(3)}
    expected = 0.5 * comps[1].tau + 0.5 * comps[2].tau - 0.25 * comps[0].tau
    assert model.task_vector().allclose(expected, atol=1e-7)


def test_output_ensemble_averages_the_nonlinear_models(backbone):
    theta0, names = theta0_of(backbone), tuned_weight_names(backbone)
    gen = torch.Generator().manual_seed(0)
    taus = [TaskVector({n: 0.05 * torch.randn(theta0[n].shape, generator=gen) for n in names})
            for _ in range(3)]  # fmt: skip
    head = base_head(SPEC.embed_dim, 4, seed=0)
    x = torch.randn(2, 3, SPEC.img_size, SPEC.img_size)
    ensemble = OutputEnsemble(backbone, theta0, taus, heads=head)
    assert len(ensemble.members) == 3  # T models: T forwards
    with torch.no_grad():
        expected = sum(head(tau.apply_to(backbone)(x)) for tau in taus) / 3
        assert_close(ensemble(x), expected, rtol=1e-5, atol=1e-6)
    assert_close(ensemble_predict(backbone, theta0, taus, x, heads=head), expected, rtol=1e-5, atol=1e-6)


def test_tmc_config_refuses_bad_values():
    from compolab.errors import ConfigError

    with pytest.raises(ConfigError):
        TMCConfig(kappa=0)
    with pytest.raises(ConfigError):
        TMCConfig(milestones=(1.5,))


def test_a_resumed_tmc_run_gives_identical_results(tmp_path, bench, backbone, monkeypatch):
    from compolab.methods import get_method

    cfg = RunConfig(method="tmc", finetune=FinetuneConfig(style="full", epochs=1, batch_size=16, lr=1e-3))
    reference = run(cfg, tmp_path / "ref", benchmark=bench, backbone=backbone, progress=False)
    method = type(get_method("tmc"))
    train = method.train

    def killed_at_task_2(self, ctx, t):
        if t == 2:
            raise KeyboardInterrupt
        return train(self, ctx, t)

    monkeypatch.setattr(method, "train", killed_at_task_2)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "run", benchmark=bench, backbone=backbone, progress=False)
    monkeypatch.setattr(method, "train", train)
    resumed = run(cfg, tmp_path / "run", resume=True, benchmark=bench, backbone=backbone, progress=False)
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"]


def test_negating_a_component_gives_it_the_negated_weight(backbone):
    """Regression: the composed tangent of ``tasks=[1, 2], negate=[0]`` is (τ1 + τ2)/2 − λτ0, not a
    shuffle of the weights (the components were passed as a mapping, whose ids the composition sorts)."""
    from compolab.pool import PoolEntry
    from compolab.tuning import TaskModule

    theta0, names = theta0_of(backbone), tuned_weight_names(backbone)
    gen = torch.Generator().manual_seed(3)
    entries = {}
    for t in range(3):
        module = TaskModule.create("full", theta0, names)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        head = torch.nn.Linear(SPEC.embed_dim, 9)
        card = {"classes": list(range(3 * t, 3 * t + 3)), "hparams": {"tmc": {"base_head_seed": 0}}}
        entries[t] = PoolEntry(t, module, head, card)
    comps = {t: component_of(e, theta0) for t, e in entries.items()}
    plan = plan_composition([0, 1, 2], tasks=[1, 2], negate=[0], negate_coef=0.25)
    model, head = compose_tmc_pool(backbone, theta0, entries, plan)
    tau = model.task_vector()
    for n in names:
        assert_close(tau[n], 0.5 * comps[1].tau[n] + 0.5 * comps[2].tau[n] - 0.25 * comps[0].tau[n])
    for n in ("weight", "bias"):
        expected = 0.5 * comps[1].head[n] + 0.5 * comps[2].head[n] - 0.25 * comps[0].head[n]
        assert_close(model.head_delta[n], expected)
    assert head.tasks == (1, 2)
