"""The composition explorer: caches against uncached evaluations, the Eq. 2 quadratic against a dense
float64 computation, plane coordinates, and the widgets' state → bars / readout."""

from __future__ import annotations

import asyncio

import pytest
import torch
from torch import nn

from compolab.bench.explore import bench_explore, random_parts
from compolab.compose import merge
from compolab.errors import ConfigError
from compolab.explore import Edit, Explorer, ExplorerWidget, LambdaWidget, Quadratic
from compolab.explore.canvas import Throttled
from compolab.explore.stem import split_stem
from compolab.fisher_store import DiagonalFisher
from compolab.heads import IncrementalHead
from compolab.probes import ProbeData, second_order
from compolab.task_vector import TaskVector


@pytest.fixture(scope="module")
def parts() -> tuple:
    return random_parts(modules=3, per_task=12, scale=0.03, seed=3)


@pytest.fixture(scope="module")
def explorer(parts) -> Explorer:
    return Explorer(*parts)


def _uncached(parts, edit: Edit) -> dict[int, float]:
    """Accuracy of the merged model with the edit's heads, by a plain forward of the whole backbone."""
    backbone, theta0, taus, full, data = parts
    model = merge(backbone, theta0, [taus[t] for t in sorted(taus)], list(edit.effective))
    kept = (
        [i for i, m in enumerate(edit.modes) if m == "keep"] if edit.heads == "composed" else range(len(taus))
    )
    head = IncrementalHead(
        [full.heads[i] for i in kept],
        tasks=[full.tasks[i] for i in kept],
        classes=[full.classes[i] for i in kept],
    )
    with torch.no_grad():
        return {
            t: 100.0
            * (head.predict(model(data.x[t])) == full.global_labels[data.y[t]]).double().mean().item()
            for t in data.tasks
        }


def test_the_stem_cache_is_the_backbone(parts, explorer):
    backbone = parts[0]
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    trunk, stem = split_stem(backbone, explorer.names, x)
    assert type(trunk).__name__ == "_Trunk", "the tiny ViT's stem is cached"
    with torch.no_grad():
        torch.testing.assert_close(trunk(stem(x)), backbone(x), rtol=1e-5, atol=1e-6)
    other = nn.Sequential(nn.Linear(3, 3))
    assert split_stem(other, ["0.weight"], torch.zeros(1, 3))[0] is other, "no stem: the whole model"


@pytest.mark.parametrize(
    "coefs,modes,heads",
    [
        ((1 / 3, 1 / 3, 1 / 3), ("keep", "keep", "keep"), "all"),
        ((0.9, 0.2, 0.5), ("keep", "drop", "keep"), "all"),
        ((0.9, 0.2, 0.5), ("keep", "drop", "keep"), "composed"),
        ((0.4, 1.2, 0.7), ("negate", "keep", "keep"), "composed"),
    ],
)
def test_cached_accuracy_is_the_uncached_accuracy(parts, explorer, coefs, modes, heads):
    edit = Edit(coefs, modes, heads)
    view = explorer.evaluate(edit)
    assert view.accuracy == _uncached(parts, edit)
    assert view.roles == {
        t: "target" if m != "keep" else "control" for t, m in zip(explorer.modules, modes, strict=True)
    }
    if heads == "composed":
        assert all(
            view.accuracy[t] == 0.0 for t, m in zip(explorer.modules, modes, strict=True) if m != "keep"
        )


def test_a_head_only_edit_uses_the_cached_logits(explorer):
    first = explorer.evaluate(Edit((0.7, 0.1, 0.4), ("keep", "drop", "keep"), "all"))
    second = explorer.evaluate(Edit((0.7, 0.1, 0.4), ("keep", "drop", "keep"), "composed"))
    assert second.cached and second.loss == first.loss
    assert second.accuracy[1] == 0.0 and second.accuracy != first.accuracy


def test_the_measured_loss_is_the_probes_loss_and_eq2_is_exact_at_theta0(explorer):
    curve = explorer.curve(0, [0.0, 0.5])
    view = explorer.evaluate(Edit((0.5, 0.0, 0.0), ("keep",) * 3))
    assert view.loss == pytest.approx(curve.mean()[1], rel=1e-5)
    at0 = explorer.evaluate(Edit((0.0, 0.0, 0.0), ("keep",) * 3))
    assert at0.predicted == pytest.approx(at0.loss, rel=1e-5)


def test_plane_coordinates(explorer):
    (a, b), off = explorer.plane_coords([0.3, -0.7, 0.0], (0, 1))
    assert (a, b) == pytest.approx((0.3, -0.7)) and off == pytest.approx(0.0, abs=1e-6)
    c = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    (a, b), off = explorer.plane_coords(c.tolist(), (2, 0))
    flat = torch.stack([explorer.taus[t].flatten().double() for t in explorer.modules])
    delta = c @ flat
    ab, *_ = torch.linalg.lstsq(flat[[2, 0]].T, delta[:, None])
    assert (a, b) == pytest.approx(ab[:, 0].tolist(), rel=1e-8)
    assert off == pytest.approx(float((delta - ab[:, 0] @ flat[[2, 0]]).norm() / delta.norm()), rel=1e-6)


def test_bad_edits_are_refused(explorer):
    with pytest.raises(ConfigError):
        Edit((0.5,), ("keep", "drop"))
    with pytest.raises(ConfigError):
        Edit((0.5,), ("forget",))
    with pytest.raises(ConfigError):
        Edit((float("nan"),), ("keep",))
    with pytest.raises(ConfigError):
        explorer.evaluate(Edit((0.5,), ("keep",)))
    with pytest.raises(ConfigError):
        explorer.plane_coords([0.1, 0.2, 0.3], (1, 1))


# --------------------------------------------------------------------------- Eq. 2, float64


def _small_problem():
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).double().eval()
    head = nn.Linear(5, 3).double().requires_grad_(False)
    names = ["0.weight", "2.weight"]
    theta0 = {n: p.detach().clone() for n, p in net.named_parameters() if n in names}
    taus = {
        t: TaskVector(
            {n: 0.3 * torch.randn(v.shape, generator=gen, dtype=torch.float64) for n, v in theta0.items()}
        )
        for t in (0, 1, 2)
    }
    x = {k: torch.randn(7, 4, generator=gen, dtype=torch.float64) for k in (0, 1)}
    y = {k: torch.randint(3, (7,), generator=gen) for k in (0, 1)}
    return net, head, theta0, taus, ProbeData(x, y)


def _dense_prediction(net, head, theta0, data, task, delta):
    """L0 + gᵀΔ + ½ ΔᵀFΔ with the dense Jacobian and the dense Fisher (GGN) of one task."""
    names = list(theta0)
    shapes = [theta0[n].shape for n in names]
    flat0 = torch.cat([theta0[n].reshape(-1) for n in names])

    def logits(flat):
        parts, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            parts[n] = flat[i : i + s.numel()].reshape(s)
            i += s.numel()
        return head(torch.func.functional_call(net, parts, (data.x[task],)))

    y = data.y[task]
    loss = lambda flat: nn.functional.cross_entropy(logits(flat), y)  # noqa: E731
    J = torch.autograd.functional.jacobian(logits, flat0)  # (N, C, P)
    p = logits(flat0).softmax(-1)
    fisher = sum(J[n].T @ (torch.diag(p[n]) - torch.outer(p[n], p[n])) @ J[n] for n in range(len(y))) / len(y)
    g = torch.autograd.functional.jacobian(loss, flat0)
    d = torch.cat([delta[n].reshape(-1) for n in names])
    return float((loss(flat0) + g @ d + 0.5 * d @ fisher @ d).detach())


def test_quadratic_is_the_dense_second_order_expansion_in_float64():
    net, head, theta0, taus, data = _small_problem()
    q = Quadratic.from_model(net, theta0, taus, data, head)
    for coefs in ([0.5, 0.25, 0.25], [1.0, -0.4, 0.0], [0.0, 0.0, 0.0]):
        delta = sum(c * taus[t] for c, t in zip(coefs, (0, 1, 2), strict=True))
        dense = [_dense_prediction(net, head, theta0, data, k, delta) for k in data.tasks]
        torch.testing.assert_close(
            q.predict_tasks(coefs), torch.tensor(dense, dtype=torch.float64), rtol=1e-10, atol=1e-12
        )
        assert q.predict(coefs) == pytest.approx(sum(dense) / len(dense), rel=1e-10)


def test_quadratic_along_a_module_is_the_probes_second_order():
    net, head, theta0, taus, data = _small_problem()
    q = Quadratic.from_model(net, theta0, taus, data, head)
    ref = second_order(net, theta0, taus[1], data, head, curvature="fisher", progress=False)
    along = q.along(1)
    for field in ("loss0", "slope", "curvature"):
        assert getattr(along, field) == pytest.approx(getattr(ref, field), rel=1e-10)


def test_quadratic_with_a_diagonal_fisher():
    net, head, theta0, taus, data = _small_problem()
    gen = torch.Generator().manual_seed(5)
    fisher = DiagonalFisher(
        {n: torch.rand(v.shape, generator=gen, dtype=torch.float64) for n, v in theta0.items()}, 4
    )
    q = Quadratic.from_model(net, theta0, taus, data, head, curvature=fisher)
    assert q.kind == "diagonal"
    for t in taus:
        assert float(q.gram[0, t, t]) == pytest.approx(float(fisher.quadratic(taus[t])), rel=1e-12)
    assert float(q.gram[1, 0, 2]) == pytest.approx(
        float(taus[0].fisher_dot(taus[2], fisher.mean())), rel=1e-12
    )
    with pytest.raises(ConfigError):
        Quadratic.from_model(net, theta0, taus, data, head, curvature="hessian")


# --------------------------------------------------------------------------- widgets


def test_explorer_widget_state_changes_update_the_bars(explorer):
    w = ExplorerWidget(explorer, plane_steps=3, debounce=0)
    before_png, before = w.image.value, dict(w.view.accuracy)
    assert before == explorer.reference.accuracy and before_png[:4] == b"\x89PNG"
    w.modes[0].value = "drop"
    w.sliders[1].value = 1.2
    assert w.edit() == Edit((1 / 3, 1.2, 1 / 3), ("drop", "keep", "keep"), "all")
    assert w.view.accuracy == explorer.evaluate(w.edit()).accuracy
    assert [b.get_height() for b in w._bars] == [w.view.accuracy[t] for t in explorer.tasks]
    assert w._bars[0].get_facecolor() != w._bars[1].get_facecolor(), "target and control colours"
    assert w.image.value != before_png
    assert f"{w.view.accuracy[1]:.1f}" in w.readout.value and "update" in w.readout.value
    w.heads.value = True  # head-only: the logits are cached
    assert w.view.cached and w.view.accuracy[0] == 0.0
    w.reset.click()
    assert w.view.accuracy == before


def test_lambda_widget_follows_the_slider(explorer):
    w = LambdaWidget(explorer, module=2, lambdas=[-0.5, 0.0, 0.5, 1.0], debounce=0)
    w.lam.value = 0.5
    curve = explorer.curve(2, [-0.5, 0.0, 0.5, 1.0])
    assert w.view.loss == pytest.approx(curve.mean()[2], rel=1e-5)
    assert w.predicted == pytest.approx(explorer.quadratic.along(2).predict([0.5])[0])
    assert "λ = 0.50" in w.readout.value and w.image.value[:4] == b"\x89PNG"


def test_bench_explore_reports_latencies():
    out = bench_explore(modules=2, per_task=4, repeats=3, widget=False)
    assert out["images"] == 8 and out["modules"] == 2 and out["repeats"] == 3
    for key in ("weight_change", "head_only", "quadratic"):
        assert 0 < out[key]["median_ms"] <= out[key]["p90_ms"] < float("inf")


def test_throttled_updates_coalesce_in_an_event_loop_and_flush():
    calls = []
    throttle = Throttled(lambda: calls.append(len(calls)), delay=0.01)
    throttle()
    assert calls == [0], "no running loop: at once"

    async def changes():
        for _ in range(5):
            throttle()
        assert calls == [0], "in a loop: deferred"
        await asyncio.sleep(0.05)
        assert calls == [0, 1], "five changes, one update"
        throttle()
        throttle.flush()
        assert calls == [0, 1, 2]
        await asyncio.sleep(0.05)
        assert calls == [0, 1, 2], "a flushed update does not run twice"

    asyncio.run(changes())


# --------------------------------------------------------------------------- a trained pool


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory):
    """A 3-task ITA pool trained briefly on a small tiny-world benchmark, and that benchmark."""
    from compolab.data import TinyWorldConfig, tiny_benchmark
    from compolab.models import load_backbone
    from compolab.run import run, run_config

    out = tmp_path_factory.mktemp("explore-run")
    world = TinyWorldConfig(
        num_tasks=3, classes_per_task=2, train_per_class=8, val_per_class=1, test_per_class=4
    )
    bench = tiny_benchmark(world)
    cfg = run_config("ita", "lora", epochs=1, batch_size=16, rank=2, fisher_samples=8)
    run(cfg, out, benchmark=bench, backbone=load_backbone()[0], progress=False)
    return out / "pool", bench


@pytest.mark.parametrize(
    "plan_args,edit",
    [
        ({}, Edit((1 / 3, 1 / 3, 1 / 3), ("keep",) * 3, "composed")),
        ({"drop": [1]}, Edit((0.5, 0.0, 0.5), ("keep", "drop", "keep"), "composed")),
        (
            {"tasks": [0, 1], "negate": [2], "negate_coef": 0.3},
            Edit((0.5, 0.5, 0.3), ("keep", "keep", "negate"), "composed"),
        ),
    ],
)
def test_from_pool_agrees_with_the_kits_editing(small_pool, plan_args, edit):
    from compolab.editing import compose_pool, plan_composition
    from compolab.evaluate import evaluate_tasks
    from compolab.workspace import open_pool

    path, bench = small_pool
    explorer = Explorer.from_pool(path, per_task=1000)  # every test image of each task
    opened = open_pool(path, load_data=False)
    plan = plan_composition(opened.tasks, **plan_args)
    model, head = compose_pool(opened.backbone, opened.theta0, opened.entries, plan)
    expected = evaluate_tasks(model, head, bench, opened.tasks, split="test")
    assert explorer.evaluate(edit).accuracy == expected


def test_from_pool_with_the_saved_diagonal_fisher(small_pool):
    explorer = Explorer.from_pool(small_pool[0], per_task=4, curvature="diagonal")
    assert explorer.quadratic.kind == "diagonal"
    at0 = explorer.evaluate(Edit((0.0, 0.0, 0.0), ("keep",) * 3))
    assert at0.predicted == pytest.approx(at0.loss, rel=1e-5)


def test_from_pool_with_kfac_on_its_images(small_pool):
    """``curvature="kfac"``: K-FAC of the explorer's loss at θ0; same ℓ(θ0) and slopes as the exact
    quadratic, its own Gram matrix τ_sᵀ(A ⊗ G)τ_t (the same for every task)."""
    pytest.importorskip("curvlinops")
    kfac = Explorer.from_pool(small_pool[0], per_task=4, curvature="kfac").quadratic
    exact = Explorer.from_pool(small_pool[0], per_task=4).quadratic
    assert kfac.kind == "kfac" and exact.kind == "fisher"
    assert torch.equal(kfac.loss0, exact.loss0) and torch.equal(kfac.slope, exact.slope)
    assert torch.equal(kfac.gram[0], kfac.gram[-1]) and not torch.allclose(kfac.gram[0], exact.gram.mean(0))
    assert bool((torch.linalg.eigvalsh(kfac.gram[0]) > -1e-9).all())  # positive semi-definite
