"""The methods: penalties (Eq. 11–12, 18–19) against their closed forms in float64, the head
pipeline, the METHODS table and the state files."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from compolab.config import get_preset, preset_configs
from compolab.errors import CompolabError, ConfigError
from compolab.fisher_store import DiagonalFisher
from compolab.heads import ClassGaussians, IncrementalHead, new_head
from compolab.methods import (
    METHODS,
    Method,
    SecondOrderState,
    get_method,
    head_penalty,
    iel_penalty,
    ita_penalty,
    linear_head_fisher,
    saved_fisher,
)
from compolab.methods.state import load_second_order_state, save_second_order_state

SHAPES = {"a.weight": (3, 4), "b.weight": (2, 3)}


def _named(gen: torch.Generator, *, positive: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    for name, shape in SHAPES.items():
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        out[name] = x.abs() + 0.1 if positive else x
    return out


def _grad(fn, tau: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tau = {n: v.clone().requires_grad_(True) for n, v in tau.items()}
    grads = torch.autograd.grad(fn(tau), list(tau.values()))
    return dict(zip(tau, grads, strict=True))


# --------------------------------------------------------------------------- penalties


def test_ita_penalty_gradient_is_alpha_fisher_times_tau():
    gen = torch.Generator().manual_seed(0)
    tau, fisher, alpha = _named(gen), _named(gen, positive=True), 0.7
    value = ita_penalty(tau, fisher, alpha)
    assert_close(value, 0.5 * alpha * sum((fisher[n] * tau[n] ** 2).sum() for n in tau))
    grad = _grad(lambda d: ita_penalty(d, fisher, alpha), tau)
    for n in tau:
        assert_close(grad[n], alpha * fisher[n] * tau[n])


@pytest.mark.parametrize("t", [1, 2, 4])
def test_iel_penalty_gradient_matches_the_closed_form(t):
    gen = torch.Generator().manual_seed(t)
    tau, previous, fisher, beta = _named(gen), _named(gen), _named(gen, positive=True), 3.0
    T = t + 1
    grad = _grad(lambda d: iel_penalty(d, previous, fisher, beta, t), tau)
    for n in tau:
        expected = beta * (1 - 1 / T) * fisher[n] * tau[n] - beta / T * fisher[n] * previous[n]
        assert_close(grad[n], expected)


def test_iel_penalty_treats_the_first_task_as_T_2():
    gen = torch.Generator().manual_seed(1)
    tau, fisher, beta = _named(gen), _named(gen, positive=True), 2.0
    value = iel_penalty(tau, {}, fisher, beta, t=0)
    # T := 2: β · ½ · (1 − ½) Σ F τ², not 0 as T = 1 would give
    assert_close(value, beta * 0.25 * sum((fisher[n] * tau[n] ** 2).sum() for n in tau))
    grad = _grad(lambda d: iel_penalty(d, {}, fisher, beta, t=0), tau)
    for n in tau:
        assert_close(grad[n], 0.5 * beta * fisher[n] * tau[n])


def test_iel_cross_term_rewards_agreement_with_earlier_modules():
    gen = torch.Generator().manual_seed(2)
    previous, fisher, beta, t = _named(gen), _named(gen, positive=True), 1.5, 2
    aligned = {n: v.clone() for n, v in previous.items()}
    opposed = {n: -v for n, v in previous.items()}
    gap = iel_penalty(aligned, previous, fisher, beta, t) - iel_penalty(opposed, previous, fisher, beta, t)
    # the self terms cancel; the cross term is subtracted: −(2β/T) Σ F τ_prev² < 0
    expected = -2 * beta / (t + 1) * sum((fisher[n] * previous[n] ** 2).sum() for n in previous)
    assert_close(gap, expected)
    assert gap < 0


def test_iel_gradient_is_beta_T_times_the_jensen_gap_gradient():
    gen = torch.Generator().manual_seed(3)
    t, beta, fisher = 2, 0.8, _named(gen, positive=True)
    T = t + 1
    earlier = [_named(gen) for _ in range(t)]
    previous = {n: sum(e[n] for e in earlier) for n in SHAPES}

    def omega(tau):  # Jensen gap of the quadratic ½ θᵀFθ, w_s = 1/T (the paper's Theorem 1, H → F)
        taus = [*earlier, tau]
        mean_of_losses = sum(0.5 * (fisher[n] * x[n] ** 2).sum() for x in taus for n in SHAPES) / T
        bar = {n: sum(x[n] for x in taus) / T for n in SHAPES}
        return mean_of_losses - sum(0.5 * (fisher[n] * bar[n] ** 2).sum() for n in SHAPES)

    tau = _named(gen)
    g_iel = _grad(lambda d: iel_penalty(d, previous, fisher, beta, t), tau)
    g_omega = _grad(omega, tau)
    for n in SHAPES:
        assert_close(g_iel[n], beta * T * g_omega[n])


def test_head_penalty_gradient_and_anchor():
    torch.manual_seed(0)
    head, anchor = nn.Linear(4, 3).double(), nn.Linear(4, 3).double()
    fisher = {"weight": torch.rand(3, 4, dtype=torch.float64), "bias": torch.rand(3, dtype=torch.float64)}
    lam_f, lam_2 = 0.3, 0.05
    head_penalty(head, anchor, fisher, lam_f, lam_2).backward()
    for name in ("weight", "bias"):
        diff = (getattr(head, name) - getattr(anchor, name)).detach()
        assert_close(getattr(head, name).grad, 2 * (lam_f * fisher[name] * diff + lam_2 * diff))
        assert getattr(anchor, name).grad is None  # the pre-tuned head is a constant
    same = head_penalty(head, head, fisher, lam_f, lam_2)
    assert float(same.detach()) == 0.0


@pytest.mark.parametrize("index", [0, 1, 2])
def test_linear_head_fisher_equals_a_dense_reference(index):
    gen = torch.Generator().manual_seed(index)
    heads = [nn.Linear(5, k).double() for k in (2, 3, 4)]
    for h in heads:
        nn.init.normal_(h.weight, std=0.5, generator=gen)
    head = IncrementalHead(heads)
    x = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    target = head.heads[index]
    reference = {"weight": torch.zeros_like(target.weight), "bias": torch.zeros_like(target.bias)}
    for xi in x:  # Σ_c p_c (∇ log p_c)², one example and one class at a time
        log_p = head(xi[None]).log_softmax(-1)[0]
        for c in range(len(log_p)):
            gw, gb = torch.autograd.grad(log_p[c], [target.weight, target.bias], retain_graph=True)
            reference["weight"] += log_p[c].exp().detach() * gw**2
            reference["bias"] += log_p[c].exp().detach() * gb**2
    got = linear_head_fisher(head, index, x)
    assert_close(got["weight"], reference["weight"] / len(x))
    assert_close(got["bias"], reference["bias"] / len(x))


# --------------------------------------------------------------------------- the table


def test_every_method_follows_the_protocol_under_its_own_name():
    assert len(METHODS) == 7
    for name, method in METHODS.items():
        assert isinstance(method, Method) and method.name == name and get_method(name) is method


def test_only_tmc_is_linearised():
    assert [name for name, m in METHODS.items() if m.linearised] == ["tmc"]


def test_unknown_method_names_the_choices():
    with pytest.raises(ConfigError, match=r"`method` 'magic' is unknown; choose one of \['ita', 'iel'"):
        get_method("magic")


def test_training_and_evaluation_plan_of_each_method(bench):
    everything = list(range(bench.num_tasks))
    for name, m in METHODS.items():
        ones = name in ("seq", "ewc", "joint")
        assert m.eval_coefs(4) == ([1.0] * 4 if ones else [0.25] * 4)
        assert m.tasks(bench) == ([0] if name == "joint" else everything)
        assert m.evaluated_tasks(bench, 1) == (everything if name == "joint" else [0, 1])


def test_iel_changes_its_head_penalty_in_both_presets():
    for preset, weight in (("tiny", 1.0), ("paper", 0.1)):
        _, iel = preset_configs(get_preset(preset), get_method("iel"))
        _, ita = preset_configs(get_preset(preset), get_method("ita"))
        assert iel.req_weight_cls == weight and ita.req_weight_cls != weight


# --------------------------------------------------------------------------- state files


def test_second_order_state_round_trips_and_refuses_another_task(tmp_path):
    gen = torch.Generator().manual_seed(0)
    stats = ClassGaussians()
    stats.update(torch.randn(12, 4, generator=gen), torch.tensor([3, 4, 5] * 4))
    cpre = IncrementalHead([new_head(4, 3, generator=gen)], classes=[[3, 4, 5]])
    fisher = DiagonalFisher({"a.weight": torch.rand(3, 4, generator=gen)}, num_samples=12)
    save_second_order_state(tmp_path, SecondOrderState(stats, cpre, fisher), after_task=1)
    back = load_second_order_state(tmp_path, after_task=1)
    assert back.cpre.classes == ((3, 4, 5),) and back.fisher.num_samples == 12
    assert_close(back.cpre.heads[0].weight, cpre.heads[0].weight)
    assert_close(back.fisher.values["a.weight"], fisher.values["a.weight"])
    for c in (3, 4, 5):
        assert_close(back.stats.means[c], stats.means[c])
        assert_close(back.stats.variances[c], stats.variances[c])
    assert_close(saved_fisher(tmp_path).values["a.weight"], fisher.values["a.weight"])
    with pytest.raises(CompolabError, match="after task 2"):
        load_second_order_state(tmp_path, after_task=2)
    assert saved_fisher(tmp_path / "missing") is None
