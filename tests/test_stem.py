"""The stem cache (compolab.stem): tokens once per image give the same forwards, the same run and the
same edits as images; it stays off where a module tunes the stem; the 10-task benchmark; the grid's
choice rule."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import SMALL_SPEC

from compolab.compose import ComposedForward
from compolab.config import TINY_DATASETS, get_preset, load_benchmark_for
from compolab.data import Benchmark
from compolab.models import load_backbone, make_backbone, theta0_of, tuned_weight_names
from compolab.reproduce.grid import GRID, choose, format_grid
from compolab.run import run, run_config
from compolab.stem import TokenDataset, cache_stem, stem_is_frozen
from compolab.tuning import TaskModule


def test_a_composed_forward_on_tokens_equals_the_forward_on_images_in_float64():
    vit = load_backbone()[0].double().requires_grad_(False)
    theta0, names = theta0_of(vit), tuned_weight_names(vit)
    gen = torch.Generator().manual_seed(0)
    module = TaskModule.create("lora", theta0, names, rank=4, generator=gen)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.1, generator=gen)  # a module that moves every block (B = 0 at creation)
    model = ComposedForward(vit, theta0, module=module.double()).eval()
    x = torch.randn(5, 3, 32, 32, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        tokens = vit.patch_embed(x)
        assert tokens.shape == (5, 16, 128)
        assert torch.allclose(model(tokens), model(x), rtol=0, atol=1e-12)
        assert not torch.allclose(model(x), vit(x), atol=1e-3)  # the module does change the forward


def test_cache_stem_maps_every_split_and_keeps_the_labels(bench):
    vit = make_backbone(SMALL_SPEC)
    cached = cache_stem(bench, vit, tuned_weight_names(vit), batch_size=7)
    assert isinstance(cached, Benchmark) and cached is not bench
    assert cached.class_names == bench.class_names and cached.info == bench.info
    for task, new in zip(bench.tasks, cached.tasks, strict=True):
        assert new.classes == task.classes
        for split in ("train", "val", "test"):
            old_d, new_d = getattr(task, split), getattr(new, split)
            assert isinstance(new_d, TokenDataset) and len(new_d) == len(old_d)
            x, y = old_d[0]
            tok, y2 = new_d[0]
            assert int(y) == int(y2)
            with torch.no_grad():
                assert torch.allclose(tok, vit.patch_embed(x[None])[0], atol=1e-5)
    assert bench.tasks[0].train[0][0].dim() == 3  # the given benchmark still yields images


def test_the_cache_stays_off_where_a_module_tunes_the_stem_or_the_stem_takes_no_tokens(bench):
    vit = make_backbone(SMALL_SPEC)
    stem_weight = next(n for n, _ in vit.named_parameters() if n.startswith("patch_embed."))
    assert stem_is_frozen(vit, tuned_weight_names(vit))
    assert not stem_is_frozen(vit, [*tuned_weight_names(vit), stem_weight])
    assert cache_stem(bench, vit, [stem_weight]) is bench
    plain = torch.nn.Linear(3, 3)  # no patch_embed that accepts tokens
    assert not stem_is_frozen(plain, []) and cache_stem(bench, plain, []) is bench


def test_a_run_on_cached_tokens_matches_a_run_on_images(tmp_path, bench, monkeypatch):
    """The run driver caches the stem; with the cache switched off the accuracies are the same."""
    vit = make_backbone(SMALL_SPEC)
    cfg = run_config("ita", "lora", epochs=1, fisher_samples=8)
    cached = run(cfg, tmp_path / "cached", benchmark=bench, backbone=vit, progress=False)
    run_module = importlib.import_module("compolab.run")  # the module (``compolab.run`` is the function)
    monkeypatch.setattr(run_module, "cache_stem", lambda b, *a, **k: b)
    images = run(cfg, tmp_path / "images", benchmark=bench, backbone=vit, progress=False)
    for row_c, row_i in zip(cached["accuracy_matrix"], images["accuracy_matrix"], strict=True):
        assert row_c == pytest.approx(row_i, abs=1e-6)


def test_tiny10_is_ten_tasks_of_ten_classes_over_the_hundred_downstream_classes():
    assert TINY_DATASETS["tiny10"] == {"num_tasks": 10}
    preset = get_preset("tiny", world=get_preset("tiny").world.__class__(train_per_class=1, val_per_class=1,
                                                                         test_per_class=1))
    b = load_benchmark_for(preset, "tiny10")
    assert b.num_tasks == 10 and [t.num_classes for t in b.tasks] == [10] * 10
    assert b.num_classes == 100 and len(set(b.class_names)) == 100
    five = load_benchmark_for(preset, "tiny")
    assert five.num_tasks == 5 and five.class_names == b.class_names[:50]  # the same class order


def test_the_grid_keeps_the_best_mean_validation_fa_over_styles():
    rows = []
    for (method, field), values in GRID.items():
        for i, v in enumerate(values):
            # lora prefers the second value, full the last; the mean picks the last (ties: the smaller)
            point = {"method": method, "field": field, "value": v}
            rows.append({**point, "style": "lora", "val_fa": 60.0 - abs(i - 1)})
            rows.append({**point, "style": "full", "val_fa": 40.0 + 3 * i})
    chosen = choose(rows)
    assert chosen == {m: {"field": f, "value": GRID[(m, f)][-1]} for m, f in GRID}
    text = format_grid(rows, chosen)
    assert text.count("(chosen)") == len(GRID) and "validation split only" in text
