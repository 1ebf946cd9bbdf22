"""compolab: a notebook-first teaching and analysis kit for model compositionality.

Reproduces "A Second-Order Perspective on Model Compositionality and Incremental Learning"
(Porrello et al., ICLR 2025: ITA and IEL) and Tangent Model Composition (Liu & Soatto, ICCV 2023)
on two presets that share one code path: ``tiny`` (offline, CPU, minutes) and ``paper``.

Glossary (paper symbol → code name): θ0 → ``theta0``, τ_t → ``taus[t]``, w_t → ``coefs``,
F → ``fisher``, α → ``alpha``, β → ``beta``.

The names below are the public API: a notebook's first cell is ``from compolab import ...``.
Submodules stay importable for the rest (``compolab.curvature``, ``compolab.tmc``, ...).
"""

from compolab.compose import ComposedForward, merge
from compolab.config import PRESETS, Preset, get_preset, load_benchmark_for, load_theta0
from compolab.curvature import hessian_diagonal_exact, hvp, make_loss_fn
from compolab.data import ArrayDataset, Benchmark, Task, TinyWorldConfig, make_loader, tiny_benchmark
from compolab.datasets import DATASETS
from compolab.editing import CompositionPlan, compose_pool, plan_composition
from compolab.errors import CompolabError, ConfigError, DataNotFoundError, TrainingDiverged
from compolab.evaluate import evaluate_tasks, final_average
from compolab.explore import Explorer, ExplorerWidget, LambdaWidget
from compolab.finetune import FinetuneConfig, finetune_task
from compolab.fisher import DiagonalFisher, FisherAccumulator, diagonal_fisher
from compolab.heads import IncrementalHead, new_head
from compolab.kfac import KFAC, kfac_at, kfac_penalty
from compolab.linear_probe import extract_features, fit_linear_probe, probe_accuracy
from compolab.linearize import LinearizedModel, TangentComponent, compose_linearized, linearized_forward
from compolab.methods import head_penalty, iel_penalty, ita_penalty
from compolab.models import (
    PAPER_VIT,
    TINY_VIT,
    BackboneSpec,
    fingerprint,
    load_backbone,
    make_backbone,
    math_attention,
    theta0_of,
    tuned_weight_names,
)
from compolab.plotting import image_grid, savefig, use_style
from compolab.pool import Pool, PoolEntry
from compolab.pretrain import probe_datasets
from compolab.probes import (
    ProbeData,
    composed_path,
    default_lambdas,
    evaluate_points,
    filter_normalized_direction,
    interpolate,
    jensen_gap,
    open_pool_probe,
    plane,
    probe_curvature,
    second_order,
    segment,
)
from compolab.run import RunConfig, load_results, run, run_config
from compolab.task_vector import TaskVector, compose
from compolab.tmc import (
    LogitColumns,
    OutputEnsemble,
    TMCConfig,
    base_head,
    component_of,
    compose_tmc_pool,
    scaled_square_loss,
)
from compolab.tuning import TaskModule
from compolab.workspace import OpenedPool, compose_and_evaluate, open_pool
from compolab.world import ALL_CLASSES, PATTERNS, SHAPES, generate, world_split

__version__ = "0.1.0"

__all__ = [
    # presets, data, backbones
    "Preset", "PRESETS", "get_preset", "load_theta0", "load_benchmark_for",
    "Benchmark", "Task", "ArrayDataset", "TinyWorldConfig", "tiny_benchmark", "make_loader",
    "SHAPES", "PATTERNS", "ALL_CLASSES", "generate", "world_split",
    "BackboneSpec", "TINY_VIT", "PAPER_VIT", "make_backbone", "load_backbone", "fingerprint",
    "tuned_weight_names", "theta0_of",
    "extract_features", "fit_linear_probe", "probe_accuracy", "probe_datasets", "DATASETS",
    # modules, composition, the pool, editing
    "TaskVector", "compose", "TaskModule", "merge", "ComposedForward", "Pool", "PoolEntry",
    "CompositionPlan", "plan_composition", "compose_pool", "IncrementalHead", "new_head",
    "evaluate_tasks", "final_average", "OpenedPool", "open_pool", "compose_and_evaluate",
    # Fisher, curvature, penalties (Eq. 11-12, 18-19)
    "diagonal_fisher", "DiagonalFisher", "FisherAccumulator", "hvp", "make_loss_fn", "hessian_diagonal_exact",
    "math_attention", "KFAC", "kfac_at", "kfac_penalty",
    "ita_penalty", "iel_penalty", "head_penalty",
    # training
    "FinetuneConfig", "finetune_task", "TrainingDiverged", "RunConfig", "run_config", "run", "load_results",
    # linearisation (TMC)
    "LinearizedModel", "TangentComponent", "linearized_forward", "compose_linearized",
    "TMCConfig", "base_head", "scaled_square_loss", "component_of", "compose_tmc_pool", "LogitColumns",
    "OutputEnsemble",
    # probes
    "ProbeData", "evaluate_points", "interpolate", "composed_path", "segment", "plane", "second_order",
    "jensen_gap", "default_lambdas", "open_pool_probe", "filter_normalized_direction", "probe_curvature",
    # interactive exploration
    "Explorer", "ExplorerWidget", "LambdaWidget",
    # plotting
    "use_style", "savefig", "image_grid",
    # errors
    "CompolabError", "ConfigError", "DataNotFoundError",
]  # fmt: skip
