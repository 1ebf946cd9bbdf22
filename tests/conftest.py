"""Shared fixtures: one data cache per session, seeded torch, one CPU thread budget."""

from __future__ import annotations

import os

import pytest
import torch


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
