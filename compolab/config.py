"""The two presets, one code path: ``tiny`` (offline, CPU, minutes) and ``paper`` (ViT-B/16, GPU).

A preset only chooses sizes and sources: which backbone (θ0), which benchmark, where its files
live. Every function of the kit takes the same arguments under both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch import nn

from compolab.data import Benchmark, TinyWorldConfig, tiny_benchmark
from compolab.errors import ConfigError
from compolab.models import PAPER_VIT, TINY_VIT, BackboneSpec, load_backbone, make_backbone

__all__ = ["Preset", "PRESETS", "get_preset", "load_theta0", "load_benchmark_for"]


@dataclass(frozen=True)
class Preset:
    """Sizes and sources of a run.

    Attributes:
        name: ``tiny`` or ``paper``.
        backbone: Shape of θ0.
        dataset: Default benchmark (``tiny`` or a real dataset name of :mod:`compolab.datasets`).
        data_root: Folder of the real datasets (``$COMPOLAB_DATA`` or ``./data``).
        world: Sizes of the tiny benchmark (tiny preset only).
    """

    name: str
    backbone: BackboneSpec
    dataset: str
    data_root: str = field(default_factory=lambda: os.environ.get("COMPOLAB_DATA", "data"))
    world: TinyWorldConfig = field(default_factory=TinyWorldConfig)


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", TINY_VIT, "tiny"),
    "paper": Preset("paper", PAPER_VIT, "cifar100"),
}


def get_preset(name: str | None = None, **overrides) -> Preset:
    """A preset by name (default ``$COMPOLAB_PRESET`` or ``tiny``), with field overrides.

    Raises:
        ConfigError: For an unknown name or field.
    """
    name = name or os.environ.get("COMPOLAB_PRESET", "tiny")
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    fields = set(Preset.__dataclass_fields__)
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ConfigError(f"unknown preset field(s) {bad}; fields are {sorted(fields)}")
    return replace(PRESETS[name], **overrides)


def load_theta0(preset: Preset, checkpoint: str | Path | None = None) -> nn.Module:
    """The pre-trained backbone θ0 of a preset, in eval mode.

    ``tiny`` loads the checkpoint shipped in the package (or ``checkpoint``); ``paper`` asks timm for
    ``vit_base_patch16_224.augreg_in21k``, which downloads the weights on first use.
    """
    if preset.name == "paper" and checkpoint is None:
        return make_backbone(preset.backbone, pretrained=True)
    return load_backbone(checkpoint)[0]


def load_benchmark_for(preset: Preset, dataset: str | None = None, *, download: bool = False) -> Benchmark:
    """The class-incremental benchmark of a preset (or the named ``dataset``)."""
    name = dataset or preset.dataset
    if name == "tiny":
        return tiny_benchmark(preset.world)
    from compolab.datasets import load_benchmark

    return load_benchmark(name, preset.data_root, download=download, img_size=preset.backbone.img_size)
