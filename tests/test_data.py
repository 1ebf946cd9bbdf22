import numpy as np
import pytest
import torch

from compolab.data import (
    ArrayDataset,
    Benchmark,
    Task,
    TinyWorldConfig,
    make_loader,
    task_sizes,
    tiny_benchmark,
)
from compolab.errors import ConfigError

SMALL = TinyWorldConfig(num_tasks=3, classes_per_task=4, train_per_class=6, val_per_class=2,
                        test_per_class=3)  # fmt: skip


def test_tiny_benchmark_structure():
    bench = tiny_benchmark(SMALL)
    assert bench.num_tasks == 3 and bench.num_classes == 12
    assert bench.offsets == [0, 4, 8, 12]
    for t, task in enumerate(bench.tasks):
        assert task.classes == tuple(range(4 * t, 4 * t + 4))
        for split, per_class in (("train", 6), ("val", 2), ("test", 3)):
            ds = getattr(task, split)
            labels = torch.stack([ds[i][1] for i in range(len(ds))])
            assert len(ds) == 4 * per_class
            assert torch.bincount(labels - 4 * t, minlength=4).tolist() == [per_class] * 4
        x, y = task.train[0]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert -1.0 <= x.min() and x.max() <= 1.0
        assert bench.task_of_class(int(y)) == t


def test_tiny_benchmark_is_reproducible_and_splits_differ():
    a, b = tiny_benchmark(SMALL), tiny_benchmark(SMALL)
    assert torch.equal(a.tasks[1].train.images, b.tasks[1].train.images)
    assert not torch.equal(a.tasks[0].train.images[:3], a.tasks[0].test.images[:3])
    assert a.class_names == b.class_names and len(set(a.class_names)) == 12


def test_default_tiny_benchmark_size():
    cfg = TinyWorldConfig()
    assert cfg.num_tasks == 5 and cfg.num_tasks * cfg.classes_per_task == 50


def test_task_sizes_spreads_remainder():
    assert task_sizes(67, 10) == [7] * 7 + [6] * 3
    assert task_sizes(100, 10) == [10] * 10
    with pytest.raises(ConfigError):
        task_sizes(3, 5)


@pytest.mark.parametrize("field", ["num_tasks", "classes_per_task", "train_per_class", "img_size"])
def test_negative_sizes_name_the_field(field):
    with pytest.raises(ConfigError, match=field):
        TinyWorldConfig(**{field: -1})


def test_benchmark_rejects_overlapping_or_empty_tasks():
    ds = ArrayDataset(np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 1]))
    empty = ArrayDataset(np.zeros((0, 8, 8, 3), np.uint8), np.array([], dtype=int))
    with pytest.raises(ConfigError, match="repeats"):
        Benchmark("x", [Task(0, (0, 1), ds, ds, ds), Task(1, (1,), ds, ds, ds)], ["a", "b"])
    with pytest.raises(ConfigError, match="empty train"):
        Benchmark("x", [Task(0, (0,), empty, empty, ds)], ["a"])


def test_loader_batches_and_seeded_shuffle():
    ds = ArrayDataset(np.arange(10 * 4 * 4 * 3, dtype=np.uint8).reshape(10, 4, 4, 3), np.arange(10))
    order1 = torch.cat([y for _, y in make_loader(ds, 4, shuffle=True, seed=1)])
    order2 = torch.cat([y for _, y in make_loader(ds, 4, shuffle=True, seed=1)])
    assert torch.equal(order1, order2) and sorted(order1.tolist()) == list(range(10))
    x, _ = next(iter(make_loader(ds, 4)))
    assert x.shape == (4, 3, 4, 4)
