"""compolab: a notebook-first teaching and analysis kit for model compositionality.

Reproduces "A Second-Order Perspective on Model Compositionality and Incremental Learning"
(Porrello et al., ICLR 2025: ITA and IEL) and Tangent Model Composition (Liu & Soatto, ICCV 2023)
on two presets that share one code path: ``tiny`` (offline, CPU, minutes) and ``paper``.

Glossary (paper symbol → code name): θ0 → ``theta0``, τ_t → ``taus[t]``, w_t → ``coefs``,
F → ``fisher``, α → ``alpha``, β → ``beta``.
"""

from compolab.config import PRESETS, Preset, get_preset, load_benchmark_for, load_theta0
from compolab.data import ArrayDataset, Benchmark, Task, TinyWorldConfig, tiny_benchmark
from compolab.errors import CompolabError, ConfigError, DataNotFoundError
from compolab.linear_probe import extract_features, fit_linear_probe, probe_accuracy
from compolab.models import (
    PAPER_VIT,
    TINY_VIT,
    BackboneSpec,
    fingerprint,
    load_backbone,
    make_backbone,
    tuned_weight_names,
)
from compolab.world import ALL_CLASSES, PATTERNS, SHAPES, generate, world_split

__version__ = "0.1.0"

__all__ = [
    # presets and data
    "Preset", "PRESETS", "get_preset", "load_theta0", "load_benchmark_for",
    "Benchmark", "Task", "ArrayDataset", "TinyWorldConfig", "tiny_benchmark",
    "SHAPES", "PATTERNS", "ALL_CLASSES", "generate", "world_split",
    # backbones
    "BackboneSpec", "TINY_VIT", "PAPER_VIT", "make_backbone", "load_backbone", "fingerprint",
    "tuned_weight_names",
    # features
    "extract_features", "fit_linear_probe", "probe_accuracy",
    # errors
    "CompolabError", "ConfigError", "DataNotFoundError",
]  # fmt: skip
