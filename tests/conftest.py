"""Shared fixtures: one data cache per session, seeded torch, one CPU thread budget."""

from __future__ import annotations

import os

import pytest
import torch

from compolab.data import TinyWorldConfig, tiny_benchmark
from compolab.models import BackboneSpec, make_backbone

#: A 3-task, 9-class slice of the tiny world and a 2-block ViT: the size of the run-level tests.
SMALL_WORLD = TinyWorldConfig(num_tasks=3, classes_per_task=3, train_per_class=12, val_per_class=2,
                              test_per_class=6)  # fmt: skip
SMALL_SPEC = BackboneSpec(embed_dim=16, depth=2, num_heads=2)


def pytest_configure(config):
    # Generated images are cached; CI sets COMPOLAB_CACHE to a folder inside the clone.
    os.environ.setdefault("COMPOLAB_CACHE", os.path.join(os.getcwd(), ".cache", "compolab"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def bench():
    """The 3-task benchmark of the run-level tests."""
    return tiny_benchmark(SMALL_WORLD)


@pytest.fixture(scope="module")
def backbone():
    """A frozen, seeded 2-block ViT (random init)."""
    torch.manual_seed(0)
    return make_backbone(SMALL_SPEC).requires_grad_(False)
