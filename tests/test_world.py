import numpy as np
import pytest

from compolab.errors import ConfigError
from compolab.world import (
    ALL_CLASSES,
    PATTERNS,
    SHAPES,
    cached_generate,
    generate,
    world_split,
)


def test_world_has_at_least_200_factorial_classes():
    assert len(ALL_CLASSES) == len(SHAPES) * len(PATTERNS) >= 200
    assert len(set(ALL_CLASSES)) == len(ALL_CLASSES)


def test_split_is_disjoint_and_shares_every_factor():
    split = world_split()
    pre, down = set(split.pretrain), set(split.downstream)
    assert not pre & down
    assert pre | down == set(ALL_CLASSES)
    assert len(down) == 100
    for factor in (0, 1):  # shapes, then patterns: each appears on both sides
        assert {c[factor] for c in pre} == {c[factor] for c in down}


def test_split_order_is_seeded():
    assert world_split(seed=0) == world_split(seed=0)
    assert world_split(seed=0).downstream != world_split(seed=1).downstream


def test_generate_is_deterministic_and_seed_dependent():
    classes = world_split().downstream[:5]
    a, la = generate(classes, 64, seed=3)
    b, lb = generate(classes, 64, seed=3)
    c, _ = generate(classes, 64, seed=4)
    assert a.dtype == np.uint8 and a.shape == (64, 32, 32, 3)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, c)


def test_generate_respects_labels_size_and_variation():
    classes = world_split().downstream[:3]
    labels = np.array([0, 0, 0, 0, 1, 2])
    imgs, out = generate(classes, 6, seed=0, size=48, labels=labels)
    assert imgs.shape == (6, 48, 48, 3)
    assert np.array_equal(out, labels)
    # natural variation: two images of the same class differ, and use the full intensity range
    assert np.abs(imgs[0].astype(int) - imgs[1].astype(int)).mean() > 10
    assert imgs.min() < 40 and imgs.max() > 200


def test_chunking_does_not_change_a_chunk():
    classes = world_split().downstream[:4]
    labels = np.arange(10) % 4
    a, _ = generate(classes, 10, seed=1, labels=labels, chunk=5)
    b, _ = generate(classes, 5, seed=1, labels=labels[:5], chunk=5)
    assert np.array_equal(a[:5], b)


def test_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPOLAB_CACHE", str(tmp_path))
    classes = world_split().downstream[:2]
    a, la = cached_generate(classes, 20, seed=0)
    files = sorted(p.name for p in (tmp_path / "world").iterdir())
    assert len(files) == 2 and all(f.endswith(".npy") for f in files)
    b, lb = cached_generate(classes, 20, seed=0)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    # a damaged cache entry is regenerated, not trusted
    (tmp_path / "world" / files[0]).write_bytes(b"garbage")
    c, _ = cached_generate(classes, 20, seed=0)
    assert np.array_equal(a, c)


@pytest.mark.parametrize("kwargs", [{"n": -1}, {"size": 4}, {"classes": []}])
def test_bad_arguments_raise_config_error(kwargs):
    args = {"classes": world_split().downstream[:2], "n": 4, "seed": 0, **kwargs}
    with pytest.raises(ConfigError):
        generate(args.pop("classes"), args.pop("n"), **args)
    with pytest.raises(ConfigError):
        world_split(num_downstream=0)
