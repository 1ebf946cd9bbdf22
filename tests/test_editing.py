"""Editing a pool: composition, unlearning by removal and by negation, specialization."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from compolab.editing import compose_pool, plan_composition
from compolab.errors import ConfigError
from compolab.heads import new_head
from compolab.models import theta0_of
from compolab.pool import PoolEntry
from compolab.tuning import TaskModule

NAMES = ["0.weight", "2.weight"]


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4)).requires_grad_(False)
    theta0 = theta0_of(backbone)
    entries = {}
    for t in range(3):
        gen = torch.Generator().manual_seed(t)
        module = TaskModule.create("full", theta0, NAMES, rank=1, generator=gen)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        entries[t] = PoolEntry(t, module, new_head(4, 2, generator=gen), {"classes": [2 * t, 2 * t + 1]})
    return backbone, theta0, entries


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if n in NAMES}


def _expected(theta0, entries, coefs: dict[int, float]) -> dict[str, torch.Tensor]:
    return {n: theta0[n] + sum(c * entries[t].module.delta(theta0)[n].detach() for t, c in coefs.items())
            for n in NAMES}  # fmt: skip


def test_default_composition_is_the_uniform_average(world):
    backbone, theta0, entries = world
    plan = plan_composition([0, 1, 2])
    model, head = compose_pool(backbone, theta0, entries, plan)
    for n, w in _expected(theta0, entries, {0: 1 / 3, 1: 1 / 3, 2: 1 / 3}).items():
        assert_close(_weights(model)[n], w)
    assert head.global_labels.tolist() == [0, 1, 2, 3, 4, 5]


def test_removal_is_the_composition_of_the_rest(world):
    backbone, theta0, entries = world
    dropped, _ = compose_pool(backbone, theta0, entries, plan_composition([0, 1, 2], drop=[1]))
    rest, head = compose_pool(backbone, theta0, entries, plan_composition([0, 2]))
    for n in NAMES:
        assert_close(_weights(dropped)[n], _weights(rest)[n])
    x = torch.randn(16, 3)
    assert not set(head.predict(backbone(x)).tolist()) & {2, 3}  # task 1's classes are gone


def test_specialization_and_negation_weights(world):
    backbone, theta0, entries = world
    plan = plan_composition([0, 1, 2], tasks=[0, 2], coefs=[0.7, 0.3], negate=[1], negate_coef=0.5)
    model, head = compose_pool(backbone, theta0, entries, plan)
    for n, w in _expected(theta0, entries, {0: 0.7, 2: 0.3, 1: -0.5}).items():
        assert_close(_weights(model)[n], w)
    assert head.tasks == (0, 2)
    assert json.loads(json.dumps(plan.describe())) == {
        "tasks": [0, 2], "coefs": [0.7, 0.3], "negated": [1], "negated_coefs": [0.5], "dropped": [],
    }  # fmt: skip


def test_a_planned_task_that_is_not_loaded_is_refused(world):
    backbone, theta0, entries = world
    with pytest.raises(ConfigError, match=r"task\(s\) \[2\] are planned but not loaded"):
        compose_pool(backbone, theta0, {0: entries[0], 1: entries[1]}, plan_composition([0, 1, 2]))
