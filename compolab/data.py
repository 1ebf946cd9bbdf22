"""Class-incremental benchmarks: one abstraction for the tiny world and the real datasets.

A :class:`Benchmark` is an ordered list of :class:`Task` s with disjoint class sets. Labels are
*global* and follow the fixed class order: task ``t`` owns the labels
``offsets[t] .. offsets[t + 1] - 1``. Each task has train / val / test splits.

The tiny preset's benchmark (:func:`tiny_benchmark`) is drawn from the downstream classes of the
tiny world; the paper preset's ones come from :mod:`compolab.datasets` (torchvision /
ImageFolder formats), through :func:`split_by_class`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from compolab.errors import ConfigError
from compolab.world import cached_generate, class_name, world_split

__all__ = [
    "ArrayDataset",
    "Task",
    "Benchmark",
    "TinyWorldConfig",
    "tiny_benchmark",
    "split_by_class",
    "task_sizes",
    "make_loader",
]

#: The tiny preset's input normalisation (the paper's in21k ViT also uses mean = std = 0.5).
TINY_MEAN, TINY_STD = 0.5, 0.5


class ArrayDataset(Dataset):
    """Images held in memory as ``uint8`` (N, H, W, 3), returned normalised as (3, H, W) floats.

    Implements ``__getitems__`` so a DataLoader fetches a whole batch with one indexing operation.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean=TINY_MEAN, std=TINY_STD):
        if len(images) != len(labels):
            raise ConfigError(f"{len(images)} images but {len(labels)} labels")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.labels)

    def _convert(self, x: torch.Tensor) -> torch.Tensor:
        return (x.permute(0, 3, 1, 2).float() / 255 - self.mean) / self.std

    def __getitem__(self, i: int):
        return self._convert(self.images[i : i + 1])[0], self.labels[i]

    def __getitems__(self, idx: list[int]):
        idx_t = torch.as_tensor(idx)
        return list(zip(self._convert(self.images[idx_t]), self.labels[idx_t], strict=True))


@dataclass
class Task:
    """One task of a class-incremental benchmark.

    Attributes:
        index: Position ``t`` in the sequence.
        classes: The global labels of this task, in order (contiguous: ``offset .. offset+n-1``).
        train, val, test: Datasets yielding ``(image, global_label)``.
    """

    index: int
    classes: tuple[int, ...]
    train: Dataset
    val: Dataset
    test: Dataset

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class Benchmark:
    """An ordered list of tasks with disjoint classes.

    Attributes:
        name: Benchmark name (``tiny``, ``cifar100``, ...).
        tasks: The tasks, in training order.
        class_names: Name of each global label.
        info: Free-form provenance (seed, sizes, source folder).
    """

    name: str
    tasks: list[Task]
    class_names: list[str]
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        seen: set[int] = set()
        for t, task in enumerate(self.tasks):
            if task.index != t:
                raise ConfigError(f"task {t} has index {task.index}")
            if not task.classes:
                raise ConfigError(f"benchmark {self.name!r}: task {t} has no class")
            if seen & set(task.classes):
                raise ConfigError(f"benchmark {self.name!r}: task {t} repeats classes")
            seen |= set(task.classes)
            for split in ("train", "test"):
                if len(getattr(task, split)) == 0:
                    raise ConfigError(f"benchmark {self.name!r}: task {t} has an empty {split} split")

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_classes(self) -> int:
        return sum(t.num_classes for t in self.tasks)

    @property
    def offsets(self) -> list[int]:
        """Class offsets: task ``t`` owns labels ``offsets[t]`` to ``offsets[t + 1] - 1``."""
        out = [0]
        for task in self.tasks:
            out.append(out[-1] + task.num_classes)
        return out

    def task_of_class(self, label: int) -> int:
        """The task that owns a global label."""
        return int(np.searchsorted(self.offsets, label, side="right") - 1)

    def describe(self) -> str:
        sizes = ", ".join(f"{len(t.train)}/{len(t.val)}/{len(t.test)}" for t in self.tasks[:3])
        return (
            f"{self.name}: {self.num_tasks} tasks, {self.num_classes} classes "
            f"(train/val/test of the first tasks: {sizes}{', ...' if self.num_tasks > 3 else ''})"
        )


def task_sizes(num_classes: int, num_tasks: int) -> list[int]:
    """Classes per task, the remainder spread over the first tasks (MIT-67: [7]*7 + [6]*3)."""
    if num_tasks <= 0 or num_classes < num_tasks:
        raise ConfigError(f"cannot split {num_classes} classes into {num_tasks} tasks")
    base, extra = divmod(num_classes, num_tasks)
    return [base + (1 if t < extra else 0) for t in range(num_tasks)]


def split_by_class(
    name: str,
    train: Dataset,
    train_labels: Sequence[int],
    test: Dataset,
    test_labels: Sequence[int],
    class_names: Sequence[str],
    sizes: Sequence[int],
    *,
    val_fraction: float = 0.0,
    seed: int = 0,
    info: dict | None = None,
) -> Benchmark:
    """Cut a labelled dataset into class-incremental tasks (classes in natural order).

    The datasets must already yield the benchmark's global labels ``0 .. sum(sizes) - 1`` (classes
    beyond ``sum(sizes)`` are dropped). ``val_fraction`` of each task's training images (a seeded
    choice) form its validation split.
    """
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    rng = np.random.default_rng(seed)
    tasks, start = [], 0
    for t, size in enumerate(sizes):
        classes = tuple(range(start, start + size))
        tr = np.nonzero((train_labels >= start) & (train_labels < start + size))[0]
        te = np.nonzero((test_labels >= start) & (test_labels < start + size))[0]
        perm = rng.permutation(tr)
        n_val = int(round(val_fraction * len(tr)))
        tasks.append(
            Task(
                t,
                classes,
                Subset(train, sorted(perm[n_val:].tolist())),
                Subset(train, sorted(perm[:n_val].tolist())),
                Subset(test, te.tolist()),
            )
        )
        start += size
    return Benchmark(name, tasks, list(class_names[:start]), info or {})


@dataclass(frozen=True)
class TinyWorldConfig:
    """Sizes of the tiny preset's class-incremental benchmark.

    Attributes:
        num_tasks: Number of tasks.
        classes_per_task: Classes per task (``num_tasks * classes_per_task <= 100``).
        train_per_class, val_per_class, test_per_class: Images per class and split.
        img_size: Image side in pixels.
        seed: Data seed (class order and images).
    """

    num_tasks: int = 5
    classes_per_task: int = 10
    train_per_class: int = 50
    val_per_class: int = 10
    test_per_class: int = 30
    img_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        for f in ("num_tasks", "classes_per_task", "train_per_class", "test_per_class", "img_size"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"TinyWorldConfig.{f} must be > 0, got {getattr(self, f)}")
        if self.val_per_class < 0:
            raise ConfigError(f"TinyWorldConfig.val_per_class must be >= 0, got {self.val_per_class}")
        if self.num_tasks * self.classes_per_task > 100:
            raise ConfigError(
                "TinyWorldConfig: num_tasks * classes_per_task must be <= 100 downstream classes"
            )


def tiny_benchmark(cfg: TinyWorldConfig = TinyWorldConfig()) -> Benchmark:
    """The tiny preset's class-incremental benchmark, drawn from the tiny world's downstream classes.

    Task ``t`` gets downstream classes ``t * classes_per_task ...`` of the fixed (seeded) downstream
    order. Train, val and test images come from three independent seeds, with exactly
    ``*_per_class`` images per class.
    """
    n_cls = cfg.num_tasks * cfg.classes_per_task
    classes = world_split(seed=cfg.seed).downstream[:n_cls]
    splits = {}
    for k, (split, per_class) in enumerate(
        (("train", cfg.train_per_class), ("val", cfg.val_per_class), ("test", cfg.test_per_class))
    ):
        labels = np.repeat(np.arange(n_cls), per_class)
        labels = np.random.default_rng([cfg.seed, 99, k]).permutation(labels)
        images, labels = cached_generate(
            classes, len(labels), seed=cfg.seed * 1000 + 100 + k, size=cfg.img_size, labels=labels
        )
        splits[split] = (images, labels)
    tasks = []
    for t in range(cfg.num_tasks):
        lo, hi = t * cfg.classes_per_task, (t + 1) * cfg.classes_per_task
        parts = []
        for split in ("train", "val", "test"):
            images, labels = splits[split]
            keep = (labels >= lo) & (labels < hi)
            parts.append(ArrayDataset(images[keep], labels[keep]))
        tasks.append(Task(t, tuple(range(lo, hi)), *parts))
    names = [class_name(c) for c in classes]
    return Benchmark("tiny", tasks, names, info={"config": cfg.__dict__.copy()})


def make_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0, num_workers: int = 0
) -> DataLoader:
    """A DataLoader with a seeded shuffle (the same order for the same seed)."""
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be > 0, got {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=num_workers)
