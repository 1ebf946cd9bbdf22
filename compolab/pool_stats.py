"""Per-task statistics of a pool for the merges that need them: diagonal Fishers, input Grams, K-FAC.

One file per kind and task, next to the pool, never pickled::

    <pool>/stats/fisher_task_000.safetensors   mean diagonal Fisher of task 0 at θ0 + τ_0
    <pool>/stats/grams_task_000.safetensors    Gram matrices of the tuned linear layers' inputs
    <pool>/stats/kfac_task_000.safetensors     K-FAC factors (A, G) of task 0 at θ0 + τ_0

Tensors are keyed by weight name; the header's ``compolab`` metadata (JSON) holds the kind, the
task, the count, the pool's θ0 fingerprint and the sha256 of the module card the statistics were
computed from, so that a file outlived by a retrained module is refused as stale.

* ``fisher`` (Fisher merging, Matena & Raffel 2022): the diagonal Fisher of ``head_t(θ0 + τ_t)`` on
  task t's training images, from :func:`compolab.fisher.diagonal_fisher` at ``params = θ0 + τ_t``,
  **averaged** over the images (``count`` = images).
* ``grams`` (RegMean, Jin et al. 2023): for every tuned 2-D weight ``W`` (out×in) the **sum**
  :math:`G_t = \\sum_x x x^\\top` (in×in) over the layer's inputs (every token of every training
  image) under θ0 + τ_t; accumulated in float64, stored in float32 (``count`` = rows summed).

* ``kfac`` (K-FAC merging, :mod:`compolab.merging.kfac_merging`): per tuned weight the Kronecker
  factors :math:`\\bar F \\approx A \\otimes G` of :func:`compolab.kfac.kfac_at` (tensors
  ``<name>::A`` / ``<name>::G`` as :meth:`KFAC.tensors <compolab.kfac.KFAC.tensors>` writes them) on the
  **same images, point and head** as ``fisher``, and its kind: ``"exact"`` is curvlinops' ``"type-2"``
  (the true Fisher over the head's softmax, one backward per class), ``count`` = images. Read back as
  :class:`~compolab.kfac.KFAC` objects by :func:`load_pool_kfacs`. Opt-in (not in
  :data:`DEFAULT_KINDS`): it needs curvlinops, and its factors take :math:`\\text{in}^2 + \\text{out}^2`
  numbers per weight (about 1.3 GB per task for ViT-B/16's 48 weights). They are the shareable
  curvature: a K-FAC merge (and a later ITA-KFAC task) reads them, not the tasks' data.

``fisher`` and ``grams`` run under the opened pool's runtime (device and autocast), as ITA's Fisher
does; ``kfac`` on its device in float32, as ITA's K-FAC does.
"""

from __future__ import annotations

import copy
import json
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn
from torch.func import functional_call

from compolab.data import make_loader
from compolab.errors import CompolabError, ConfigError
from compolab.fisher import KINDS as FISHER_KINDS
from compolab.fisher import diagonal_fisher
from compolab.heads import IncrementalHead
from compolab.io import read_json, read_safetensors, write_safetensors
from compolab.kfac import KFAC, kfac_at
from compolab.pool import Pool
from compolab.workspace import OpenedPool, require_weights

__all__ = ["STAT_KINDS", "DEFAULT_KINDS", "STATS_FOLDER", "stats_path", "save_pool_statistics",
           "load_pool_statistics", "load_pool_kfacs", "has_pool_statistics", "task_grams"]  # fmt: skip

#: The statistics a pool can keep.
STAT_KINDS = ("fisher", "grams", "kfac")
#: What ``compolab stats`` and ``train --save-stats`` make unless told (K-FAC is opt-in).
DEFAULT_KINDS = ("fisher", "grams")
#: The pool's sub-folder that holds them.
STATS_FOLDER = "stats"
_FORMAT = "compolab.PoolStatistics/1"


def stats_path(pool: Pool, kind: str, task: int) -> Path:
    """``<pool>/stats/<kind>_task_<ttt>.safetensors``."""
    return Path(pool.root) / STATS_FOLDER / f"{kind}_task_{task:03d}.safetensors"


def _remake(pool: Pool, kind: str, again: bool = True) -> str:
    """How to make the file: the command, with the pool's folder quoted for a shell."""
    verb = "remake" if again else "make"
    return (f"{verb} it with `compolab stats --pool {shlex.quote(str(pool.root))} --kind {kind}` "
            "(or train with `compolab train ... --save-stats`)")


def _check_kinds(kinds: Sequence[str] | str, field: str) -> tuple[str, ...]:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in STAT_KINDS]
    if bad or not kinds:
        raise ConfigError(f"`{field}` {bad if bad else 'is empty'}: unknown statistics; "
                          f"known kinds: {', '.join(STAT_KINDS)}")  # fmt: skip
    return tuple(dict.fromkeys(kinds))


# --------------------------------------------------------------------------- computing


def task_grams(
    backbone: nn.Module, params: Mapping[str, Tensor], loader, names: Sequence[str]
) -> tuple[dict[str, Tensor], int, int]:
    """:math:`\\sum_x x x^\\top` of the inputs of the ``nn.Linear`` layers that own ``names``.

    Forward hooks on the layers (removed in a ``finally``) see ``backbone`` at ``params`` (a
    :func:`torch.func.functional_call`; ``backbone`` itself is unchanged); every token is a row.

    Args:
        backbone: The model (its own parameters where ``params`` has none).
        params: Parameters to evaluate at (e.g. θ0 + τ), keyed by ``backbone``'s names.
        loader: Yields image batches or ``(images, labels)``.
        names: 2-D weights, each the ``weight`` of an ``nn.Linear``.

    Returns:
        ``(grams, rows, images)``: float64 ``name -> (in, in)`` sums, the rows each one summed, the images.

    Raises:
        ConfigError: A name that is not the weight of an ``nn.Linear``, or an empty loader.
    """
    layers: dict[str, nn.Linear] = {}
    for name in names:
        owner, _, attr = name.rpartition(".")
        module = backbone.get_submodule(owner) if owner else None
        if attr != "weight" or not isinstance(module, nn.Linear):
            raise ConfigError(f"grams need the weights of nn.Linear layers; {name!r} is not one")
        layers[name] = module
    device = next(iter(params.values())).device
    sums = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=device)
            for n, m in layers.items()}  # fmt: skip
    rows = dict.fromkeys(layers, 0)

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            sums[name].addmm_(x.T, x)
            rows[name] += x.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    images = 0
    try:
        with torch.no_grad():
            for batch in loader:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                functional_call(backbone, dict(params), (x.to(device),))
                images += x.shape[0]
    finally:
        for h in handles:
            h.remove()
    if images == 0:
        raise ConfigError("the loader yielded no images: no Gram matrices")
    if len(set(rows.values())) > 1:
        raise CompolabError(f"the linear layers saw different numbers of rows ({rows}); one count cannot "
                            "describe their Grams")  # fmt: skip
    return sums, next(iter(rows.values())), images


def _task_point(opened: OpenedPool, t: int) -> tuple[dict[str, Tensor], IncrementalHead]:
    """``(θ0 + τ_t on the tuned names, head t)`` on the runtime's device; the entry is left as it is."""
    entry = opened.entries[t]
    module_device = next(entry.module.parameters()).device
    with torch.no_grad():
        tau = entry.module.delta({n: opened.theta0[n].to(module_device) for n in entry.module.names})
    params = {n: opened.theta0[n] + d.to(opened.theta0[n]) for n, d in tau.items()}
    head = IncrementalHead([copy.deepcopy(entry.head)], tasks=[t], classes=[entry.classes])
    return params, head.to(opened.device).eval()  # maps global labels to the head's columns


def _subset(loader, images: int | None, seed: int, batch_size: int):
    """``loader`` itself, or a loader over ``images`` of its images drawn with ``seed``."""
    data = loader.dataset
    if images is None or images >= len(data):
        return loader
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:images].tolist()
    return make_loader(torch.utils.data.Subset(data, pick), batch_size)


def _statistic(opened: OpenedPool, kind: str, t: int, loader, sample, fisher_kind: str) -> tuple:
    """``(tensors, count, images, extra metadata)`` of ``kind`` for task ``t`` (``sample``: the Fisher's)."""
    params, head = _task_point(opened, t)
    if kind == "kfac":  # float32, outside autocast, as ITA's K-FAC
        two_d = [n for n, p in params.items() if p.ndim == 2]
        kfac = kfac_at(opened.backbone, head, sample, names=two_d, fisher_type=fisher_kind, params=params,
                       seed=t)  # fmt: skip
        tensors, meta = kfac.tensors()
        return tensors, kfac.num_samples, kfac.num_samples, {"fisher_kind": fisher_kind, "kfac": meta}
    with opened.runtime.autocast_context():
        if kind == "fisher":
            gen = torch.Generator().manual_seed(t)  # "mc" labels, reproducibly
            fisher = diagonal_fisher(opened.backbone, head, sample, names=list(params), kind=fisher_kind,
                                     params=params, generator=gen)  # fmt: skip
            extra = {"fisher_kind": fisher_kind, "reduction": "mean over images"}
            return fisher.mean(), fisher.num_samples, fisher.num_samples, extra
        two_d = [n for n, p in params.items() if p.ndim == 2]
        values, count, images = task_grams(opened.backbone, params, loader, two_d)
        return values, count, images, {"reduction": "sum over rows (tokens of every image)"}


def save_pool_statistics(
    opened: OpenedPool,
    kinds: Sequence[str] = DEFAULT_KINDS,
    *,
    tasks: Sequence[int] | None = None,
    batch_size: int = 64,
    fisher_kind: str = "exact",
    fisher_images: int | None = None,
    progress: bool | None = False,
) -> list[Path]:
    """Compute and write the per-task statistics of a pool (see the module docstring).

    Each task's statistics are taken at its fine-tuned model θ0 + τ_t with its own head, on its
    training images; an existing file for the task is replaced atomically.

    Args:
        opened: From :func:`compolab.workspace.open_pool` (with the benchmark and the tasks' modules).
        kinds: Among :data:`STAT_KINDS` (default :data:`DEFAULT_KINDS`).
        tasks: Tasks to compute (default: every loaded module).
        batch_size: Images per forward (memory only: the sums are exact).
        fisher_kind: ``"exact"`` (the true Fisher, over the head's softmax), ``"mc"`` or ``"empirical"``
            (at the true labels); see :func:`~compolab.fisher.diagonal_fisher`. The K-FAC's too
            (:data:`~compolab.kfac.KIND_TO_FISHER_TYPE`: ``"exact"`` is ``"type-2"``).
        fisher_images: The Fisher and the K-FAC on this many training images of each task (the same
            ones, seeded by the task id; default all). The exact Fisher costs one backward per class.
        progress: Show a progress bar.

    Returns:
        The files written, task by task, in the order of ``kinds``.

    Raises:
        ConfigError: Before any work, for an unknown kind, Fisher kind or task, a bad batch size, a
            pool opened without its benchmark, or a TMC pool (its modules are tangents of the
            linearised model).
    """
    kinds = _check_kinds(kinds, "kinds")
    if fisher_kind not in FISHER_KINDS:  # the K-FAC takes the same kinds (KIND_TO_FISHER_TYPE)
        known = ", ".join(FISHER_KINDS)
        raise ConfigError(f"`fisher_kind` {fisher_kind!r} is unknown; choose one of {known}")
    if batch_size <= 0:
        raise ConfigError(f"`batch_size` must be > 0, got {batch_size}")
    if fisher_images is not None and fisher_images <= 0:
        raise ConfigError(f"`fisher_images` must be > 0, got {fisher_images}")
    pool = opened.pool
    require_weights(pool, "per-task statistics do not apply", opened.method)
    ids = sorted(opened.entries) if tasks is None else list(dict.fromkeys(tasks))
    unknown = [t for t in ids if t not in opened.entries]
    if unknown:
        raise ConfigError(f"`tasks` {unknown} are not loaded; the opened pool has {sorted(opened.entries)}")
    if opened.bench is None:
        raise ConfigError("the pool was opened with load_data=False: no training images for the statistics")
    from tqdm.auto import tqdm

    (Path(pool.root) / STATS_FOLDER).mkdir(exist_ok=True)
    written = []
    with tqdm(total=len(ids) * len(kinds), desc="pool statistics", disable=not progress) as bar:
        for t in ids:
            loader = make_loader(opened.bench.tasks[t].train, batch_size)
            sample = _subset(loader, fisher_images, t, batch_size)  # the Fisher's and the K-FAC's images
            card = opened.entries[t].card
            for kind in kinds:
                bar.set_postfix(task=t, kind=kind)
                values, count, images, extra = _statistic(opened, kind, t, loader, sample, fisher_kind)
                meta = {"format": _FORMAT, "kind": kind, "task": t, "count": count, "num_images": images,
                        "theta0_sha256": pool.manifest["theta0_sha256"], "module_sha256": card["sha256"],
                        "style": card.get("style"), "precision": opened.runtime.precision,
                        **extra}  # fmt: skip
                tensors = {n: v.to(torch.float32) for n, v in values.items()}
                path = stats_path(pool, kind, t)
                written.append(write_safetensors(path, tensors, metadata={"compolab": json.dumps(meta)}))
                bar.update()
    return written


# --------------------------------------------------------------------------- reading


def _open_pool(pool: Pool | str | Path) -> Pool:
    return pool if isinstance(pool, Pool) else Pool.open(pool)


def _checked(pool: Pool, kind: str, task: int, available: Sequence[int]) -> tuple[Path, dict]:
    """The file of ``kind`` for ``task`` and its metadata, after checking it exists and fits the pool's
    current module."""
    if task not in available:
        raise ConfigError(f"`tasks`: task {task} is not in the pool {pool.root}; it has tasks "
                          f"{list(available)}")  # fmt: skip
    path = stats_path(pool, kind, task)
    if not path.is_file():
        raise CompolabError(f"{path} not found: no {kind} statistics of task {task}; "
                            f"{_remake(pool, kind, again=False)}")  # fmt: skip
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("compolab", "{}"))
    except Exception as e:  # safetensors raises several types (SafetensorError, OSError, ...)
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CompolabError(f"cannot read {path} ({first}); {_remake(pool, kind)}") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT or meta.get("kind") != kind \
            or meta.get("task") != task:  # fmt: skip
        raise CompolabError(f"{path} is not the {kind} statistics file of task {task}; {_remake(pool, kind)}")
    card = read_json(pool.card_path(task), what="module card")
    if meta.get("module_sha256") != card.get("sha256") or \
            meta.get("theta0_sha256") != pool.manifest.get("theta0_sha256"):  # fmt: skip
        raise CompolabError(f"{path} is stale: task {task}'s module changed since it was computed (its card "
                            f"sha256 differs); {_remake(pool, kind)}")  # fmt: skip
    return path, meta


def load_pool_statistics(pool: Pool | str | Path, kind: str, tasks: Sequence[int]) -> list[dict[str, Tensor]]:
    """The saved statistics of ``tasks``, in that order (float32 tensors on the CPU, by weight name).

    ``fisher``: the mean diagonal Fisher at θ0 + τ_t; ``grams``: :math:`\\sum_x x x^\\top` per 2-D weight;
    ``kfac``: the flat ``<name>::A`` / ``<name>::G`` factors (:func:`load_pool_kfacs` makes KFACs of them).

    Raises:
        ConfigError: An unknown kind or a task not in the pool.
        CompolabError: One line naming a file that is missing, unreadable or stale (computed from
            another module than the pool's current card), with the command that makes it.
    """
    pool = _open_pool(pool)
    _check_kinds([kind], "kind")
    available = pool.tasks()
    out = []
    for t in tasks:
        path, _ = _checked(pool, kind, t, available)
        with safe_open(str(path), framework="pt") as f:
            out.append({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 - safe_open has no __iter__
    return out


def load_pool_kfacs(pool: Pool | str | Path, tasks: Sequence[int]) -> list[KFAC]:
    """The saved ``kfac`` statistics of ``tasks`` as :class:`~compolab.kfac.KFAC` objects (CPU), in order.

    Raises:
        ConfigError: A task not in the pool.
        CompolabError: As :func:`load_pool_statistics`, or a file that does not hold a K-FAC.
    """
    pool = _open_pool(pool)
    available = pool.tasks()
    out = []
    for t in tasks:
        path, meta = _checked(pool, "kfac", t, available)
        tensors, _ = read_safetensors(path, what="K-FAC statistics")
        out.append(KFAC.from_tensors(tensors, meta.get("kfac", {}), path))
    return out


def has_pool_statistics(pool: Pool | str | Path, kind: str, tasks: Sequence[int]) -> bool:
    """True when every task of ``tasks`` has a readable, up-to-date ``kind`` file.

    Raises:
        ConfigError: An unknown kind.
    """
    pool = _open_pool(pool)
    _check_kinds([kind], "kind")
    available = pool.tasks()
    try:
        for t in tasks:
            _checked(pool, kind, t, available)
    except CompolabError:
        return False
    return True
