"""Per-task pool statistics (``compolab.pool_stats``): Grams, Fishers and K-FAC factors at θ0 + τ_t against
independent float64 / brute-force references, the file round trip, and missing / stale / bad-kind refusals."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from torch import nn

from compolab.data import TinyWorldConfig, make_loader, tiny_benchmark
from compolab.errors import CompolabError, ConfigError
from compolab.fisher import diagonal_fisher
from compolab.heads import IncrementalHead, new_head
from compolab.kfac import KFAC, kfac_at
from compolab.methods import get_method
from compolab.models import fingerprint, load_backbone, theta0_of, tuned_weight_names
from compolab.pool import Pool, PoolEntry
from compolab.pool_stats import (
    DEFAULT_KINDS,
    STAT_KINDS,
    has_pool_statistics,
    load_pool_kfacs,
    load_pool_statistics,
    save_pool_statistics,
    stats_path,
)
from compolab.task_vector import TaskVector
from compolab.tuning import TaskModule
from compolab.workspace import open_pool

WORLD = TinyWorldConfig(num_tasks=2, classes_per_task=2, train_per_class=4, val_per_class=1, test_per_class=2)
STYLES = ("lora", "full")  # task 0, task 1


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    """A hand-made 2-task pool of the shipped θ0 (random LoRA / full modules, random heads), with its
    statistics (every kind) saved in batches of 3 (the 8 training images of a task: uneven batches)."""
    backbone = load_backbone()[0]
    bench = tiny_benchmark(WORLD)
    names = tuned_weight_names(backbone)
    theta0 = theta0_of(backbone, names)
    root = tmp_path_factory.mktemp("pool_stats") / "pool"
    pool = Pool.create(root, theta0_sha256=fingerprint(backbone), preset="tiny",
                       benchmark={"name": "tiny", **bench.info})  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for t, style in enumerate(STYLES):
        module = TaskModule.create(style, theta0, names, rank=2, generator=gen)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        head = new_head(backbone.embed_dim, WORLD.classes_per_task, generator=gen)
        with torch.no_grad():
            head.weight.mul_(50.0)  # confident enough that p is far from uniform
        pool.save(PoolEntry(t, module, head, {"classes": list(bench.tasks[t].classes)}))
    save_pool_statistics(open_pool(root), STAT_KINDS, batch_size=3)
    return root


@pytest.fixture(scope="module")
def opened(pool_dir):
    return open_pool(pool_dir)


def _finetuned(opened, t):
    """θ0 + τ_t as an ordinary model (a deep copy: another path than the kit's functional call)."""
    tau = opened.entries[t].module.delta(opened.theta0).detach()
    return TaskVector(tau).apply_to(opened.backbone).eval(), tau


def _copy(pool_dir, dst):
    shutil.copytree(pool_dir, dst, ignore=shutil.ignore_patterns("stats"))
    return dst


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- the numbers


def test_files_and_their_metadata(pool_dir, opened):
    pool = opened.pool
    folder = pool_dir / "stats"
    assert sorted(p.name for p in folder.iterdir()) == [f"{k}_task_{t:03d}.safetensors" for k in STAT_KINDS
                                                        for t in (0, 1)]  # fmt: skip
    for kind in STAT_KINDS:
        for t in (0, 1):
            with safe_open(str(stats_path(pool, kind, t)), framework="pt") as f:
                meta = json.loads(f.metadata()["compolab"])
                names = opened.entries[t].module.names
                assert sorted(f.keys()) == sorted(f"{n}::{p}" if kind == "kfac" else n for n in names
                                                  for p in ("AG" if kind == "kfac" else "-"))  # fmt: skip
            assert meta["kind"] == kind and meta["task"] == t and meta["num_images"] == 8
            assert meta["theta0_sha256"] == pool.manifest["theta0_sha256"]
            assert meta["module_sha256"] == opened.entries[t].card["sha256"]
            assert meta["count"] == (8 * 17 if kind == "grams" else 8)  # images; 16 patches + CLS per image


@pytest.mark.parametrize("t", [0, 1])
def test_grams_equal_a_float64_product_of_independently_captured_inputs(opened, t):
    model, tau = _finetuned(opened, t)
    rows: dict[str, list] = {n: [] for n in tau}
    inputs_of = {"attn.qkv": "norm1", "attn.proj": "attn.norm", "mlp.fc1": "norm2", "mlp.fc2": "mlp.norm"}
    handles = []
    for name in tau:  # the *outputs* of the modules that feed each linear layer
        block, layer = name.removesuffix(".weight").split(".", 2)[1:]
        feeder = model.get_submodule(f"blocks.{block}.{inputs_of[layer]}")
        handles.append(feeder.register_forward_hook(
            lambda m, a, out, n=name: rows[n].append(out.detach().reshape(-1, out.shape[-1]).double())))
    try:
        with torch.no_grad():
            for x, _ in make_loader(opened.bench.tasks[t].train, 8):
                model(x)
    finally:
        for h in handles:
            h.remove()
    (grams,) = load_pool_statistics(opened.pool, "grams", [t])
    assert sorted(grams) == sorted(tau)
    for name, parts in rows.items():
        x = torch.cat(parts)
        assert x.shape == (8 * 17, tau[name].shape[1])
        expected = x.T @ x
        assert grams[name].dtype == torch.float32
        tol = 1e-5 * expected.abs().max()
        torch.testing.assert_close(grams[name].double(), expected, rtol=1e-5, atol=tol)


def test_grams_are_symmetric_psd_and_the_count_is_tokens_times_images(opened):
    tokens = opened.backbone.patch_embed.num_patches + opened.backbone.num_prefix_tokens
    for t, grams in zip((0, 1), load_pool_statistics(opened.pool, "grams", [0, 1]), strict=True):
        with safe_open(str(stats_path(opened.pool, "grams", t)), framework="pt") as f:
            assert json.loads(f.metadata()["compolab"])["count"] == tokens * len(opened.bench.tasks[t].train)
        for name, g in grams.items():
            g = g.double()
            torch.testing.assert_close(g, g.T, rtol=1e-6, atol=1e-6 * g.abs().max())
            assert torch.linalg.eigvalsh((g + g.T) / 2).min() >= -1e-5 * g.diagonal().max(), name
            assert bool((g.diagonal() > 0).all())


@pytest.mark.parametrize("t", [0, 1])
def test_fisher_is_the_kits_fisher_at_the_finetuned_model(opened, t):
    model, tau = _finetuned(opened, t)
    entry = opened.entries[t]
    head = IncrementalHead([copy.deepcopy(entry.head)], tasks=[t], classes=[entry.classes])
    loader = make_loader(opened.bench.tasks[t].train, 8)
    expected = diagonal_fisher(model, head, loader, names=list(tau)).mean()
    (saved,) = load_pool_statistics(opened.pool, "fisher", [t])
    assert sorted(saved) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(saved[name], expected[name], rtol=1e-4, atol=1e-6 * expected[name].max())
    at_theta0 = diagonal_fisher(opened.backbone, head, loader, names=list(tau)).mean()
    gap = max(float((at_theta0[n] - saved[n]).abs().max() / saved[n].max()) for n in saved)
    assert gap > 1e-2, "the Fisher must be the fine-tuned model's, not θ0's"


def _brute_force_fisher(model, head, images, labels=None):
    """Mean over images of Σ_c p_c (∇ log p_c)² (``labels``: (∇ log p_y)² at those head columns),
    one autograd backward per image and class."""
    names = tuned_weight_names(model)
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    model.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
    for i, x in enumerate(images):
        logp = head(model(x[None])).log_softmax(-1)[0]
        columns = range(logp.numel()) if labels is None else [labels[i]]
        for c in columns:
            grads = torch.autograd.grad(logp[c], [params[n] for n in names], retain_graph=True)
            weight = 1.0 if labels is not None else float(logp[c].detach().exp())
            for n, g in zip(names, grads, strict=True):
                total[n] += weight * g.double() ** 2
    return {n: v / len(images) for n, v in total.items()}


def test_fisher_matches_per_sample_autograd(opened, tmp_path):
    """The exact Fisher (saved) and the empirical one (labels mapped to the head's columns: task 1 owns
    global labels 2 and 3) against one backward per image and class."""
    t = 1
    model, _ = _finetuned(opened, t)
    head = copy.deepcopy(opened.entries[t].head)
    data = opened.bench.tasks[t].train
    images, labels = next(iter(make_loader(data, len(data))))
    assert set(labels.tolist()) == {2, 3}
    cases = [("exact", opened.pool, None)]
    copied = open_pool(_copy(opened.pool.root, tmp_path / "pool"), tasks=[t])
    save_pool_statistics(copied, ["fisher"], tasks=[t], fisher_kind="empirical", batch_size=5)
    cases.append(("empirical", copied.pool, [opened.entries[t].classes.index(y) for y in labels.tolist()]))
    for kind, pool, local in cases:
        expected = _brute_force_fisher(model, head, images, local)
        (saved,) = load_pool_statistics(pool, "fisher", [t])
        for name, value in expected.items():
            torch.testing.assert_close(saved[name].double(), value, rtol=1e-3, atol=1e-6 * value.max(),
                                       msg=lambda m, k=kind, n=name: f"{k} {n}: {m}")  # fmt: skip


@pytest.mark.parametrize("t", [0, 1])
def test_kfac_is_the_type_2_kfac_of_the_finetuned_model_and_its_a_is_the_gram_over_the_rows(opened, t):
    """The saved factors against ``kfac_at`` on the fine-tuned model built another way (all 8 images),
    and A of K-FAC-expand (the mean of a aᵀ over every token of every image) against the saved Grams."""
    model, tau = _finetuned(opened, t)
    entry = opened.entries[t]
    head = IncrementalHead([copy.deepcopy(entry.head)], tasks=[t], classes=[entry.classes])
    loader = make_loader(opened.bench.tasks[t].train, 8)
    expected = kfac_at(model, head, loader, list(tau), fisher_type="type-2")
    (saved,) = load_pool_kfacs(opened.pool, [t])
    assert isinstance(saved, KFAC) and list(saved.factors) == list(expected.factors)
    assert (saved.num_samples, saved.fisher_type, saved.kfac_approx) == (8, "type-2", "expand")
    (grams,) = load_pool_statistics(opened.pool, "grams", [t])
    for name, (a, g) in expected.factors.items():
        torch.testing.assert_close(saved.factors[name][0], a, rtol=1e-4, atol=1e-6 * a.abs().max())
        torch.testing.assert_close(saved.factors[name][1], g, rtol=1e-4, atol=1e-5 * g.abs().max())
        torch.testing.assert_close(saved.factors[name][0], grams[name] / (8 * 17), rtol=1e-4,
                                   atol=1e-6 * a.abs().max())  # fmt: skip
    at_theta0 = kfac_at(opened.backbone, head, loader, list(tau), fisher_type="type-2")
    g_of = {n: (at_theta0.factors[n][1], saved.factors[n][1]) for n in saved.factors}
    gap = max(float((g0 - g).abs().max() / g.abs().max()) for g0, g in g_of.values())
    assert gap > 1e-2, "the K-FAC must be the fine-tuned model's, not θ0's"
    flat = load_pool_statistics(opened.pool, "kfac", [t])[0]  # the file's own tensors
    assert sorted(flat) == sorted(f"{n}::{p}" for n in tau for p in "AG")
    assert sum(saved.memory_bytes().values()) == sum(v.numel() * 4 for v in flat.values())


def test_kfac_and_fisher_take_the_same_subset_of_images(opened, tmp_path):
    t = 1
    copied = open_pool(_copy(opened.pool.root, tmp_path / "pool"), tasks=[t])
    save_pool_statistics(copied, ["kfac", "fisher"], tasks=[t], fisher_images=5, batch_size=2)
    data = opened.bench.tasks[t].train
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(t))[:5].tolist()  # seeded by t
    model, tau = _finetuned(opened, t)
    entry = opened.entries[t]
    head = IncrementalHead([copy.deepcopy(entry.head)], tasks=[t], classes=[entry.classes])
    loader = make_loader(torch.utils.data.Subset(data, pick), 5)
    expected = kfac_at(model, head, loader, list(tau), fisher_type="type-2")
    (saved,) = load_pool_kfacs(copied.pool, [t])
    assert saved.num_samples == 5
    for name, (_, g) in expected.factors.items():
        torch.testing.assert_close(saved.factors[name][1], g, rtol=1e-4, atol=1e-5 * g.abs().max())
    (fisher,) = load_pool_statistics(copied.pool, "fisher", [t])
    reference = diagonal_fisher(model, head, loader, names=list(tau)).mean()
    for name, value in reference.items():
        torch.testing.assert_close(fisher[name], value, rtol=1e-4, atol=1e-6 * value.max())
    for kind in ("kfac", "fisher"):
        with safe_open(str(stats_path(copied.pool, kind, t)), framework="pt") as f:
            assert json.loads(f.metadata()["compolab"])["num_images"] == 5


# --------------------------------------------------------------------------- files


def test_round_trip_and_an_atomic_overwrite(opened, tmp_path):
    copied = open_pool(_copy(opened.pool.root, tmp_path / "pool"))
    first = save_pool_statistics(copied, tasks=[1, 0], batch_size=3)  # the default kinds: not K-FAC
    assert first == [stats_path(copied.pool, k, t) for t in (1, 0) for k in DEFAULT_KINDS]
    assert {p.name: p.read_bytes() for p in first} == {
        p.name: (opened.pool.root / "stats" / p.name).read_bytes() for p in first
    }, "the same pool and batches: the same bytes"
    again = save_pool_statistics(copied, ["grams", "fisher", "grams"], tasks=[0, 1], batch_size=8)
    assert sorted(again) == sorted(first)  # overwritten in place, a repeated kind once
    assert sorted(p.name for p in (copied.pool.root / "stats").iterdir()) == sorted(p.name for p in first)
    for kind in DEFAULT_KINDS:
        fresh = load_pool_statistics(copied.pool.root, kind, [1, 0])  # a path, and task order
        kept = load_pool_statistics(opened.pool, kind, [1, 0])
        for a, b in zip(fresh, kept, strict=True):
            assert sorted(a) == sorted(b)
            for n in a:  # other batches, the same sums up to float32 rounding
                torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6 * b[n].abs().max())
    assert has_pool_statistics(copied.pool, "fisher", [0, 1])
    assert has_pool_statistics(copied.pool, "grams", [0])


def test_a_missing_file_says_how_to_make_it(opened, tmp_path):
    root = _copy(opened.pool.root, tmp_path / "my pool")
    save_pool_statistics(open_pool(root, tasks=[0]), ["grams"], tasks=[0])
    assert has_pool_statistics(root, "grams", [0]) and not has_pool_statistics(root, "grams", [0, 1])
    assert not has_pool_statistics(root, "fisher", [0])
    with pytest.raises(CompolabError) as e:
        load_pool_statistics(root, "grams", [0, 1])
    message = _one_line(e)
    assert str(stats_path(Pool.open(root), "grams", 1)) in message
    assert f"`compolab stats --pool '{root}' --kind grams`" in message  # quoted: the folder has a space
    with pytest.raises(ConfigError, match="task 7 is not in the pool"):
        load_pool_statistics(root, "grams", [7])


def test_kfac_files_missing_or_stale_are_refused_with_the_command(opened, tmp_path):
    root = _copy(opened.pool.root, tmp_path / "my pool")
    with pytest.raises(CompolabError) as e:
        load_pool_kfacs(root, [0])
    message = _one_line(e)
    assert "kfac_task_000.safetensors not found: no kfac statistics of task 0" in message
    assert f"`compolab stats --pool '{root}' --kind kfac`" in message
    (root / "stats").mkdir()
    shutil.copy(opened.pool.root / "stats" / "kfac_task_000.safetensors", root / "stats")
    assert has_pool_statistics(root, "kfac", [0]) and not has_pool_statistics(root, "kfac", [0, 1])
    (kfac,) = load_pool_kfacs(root, [0])
    (kept,) = load_pool_kfacs(opened.pool, [0])
    assert all(torch.equal(kfac.factors[n][i], kept.factors[n][i]) for n in kept.factors for i in (0, 1))
    pool = Pool.open(root)
    entry = pool.load(0, theta0_sha256=pool.manifest["theta0_sha256"])
    entry.card = {k: v for k, v in entry.card.items() if k != "sha256"} | {"metrics": {"retrained": True}}
    pool.save(entry)
    with pytest.raises(CompolabError) as e:
        load_pool_kfacs(root, [0])
    assert "kfac_task_000.safetensors is stale" in _one_line(e) and "--kind kfac" in str(e.value)
    shutil.copy(opened.pool.root / "stats" / "fisher_task_001.safetensors",
                root / "stats" / "kfac_task_001.safetensors")  # fmt: skip
    with pytest.raises(CompolabError, match="is not the kfac statistics file of task 1"):
        load_pool_kfacs(root, [1])


def test_a_stale_file_is_refused_until_remade(opened, tmp_path):
    root = _copy(opened.pool.root, tmp_path / "pool")
    save_pool_statistics(open_pool(root), ["fisher"])
    pool = Pool.open(root)
    entry = pool.load(0, theta0_sha256=pool.manifest["theta0_sha256"])
    entry.card = {k: v for k, v in entry.card.items() if k != "sha256"} | {"metrics": {"retrained": True}}
    pool.save(entry)  # the module of task 0, saved again: a new card hash
    assert not has_pool_statistics(root, "fisher", [0, 1]) and has_pool_statistics(root, "fisher", [1])
    with pytest.raises(CompolabError) as e:
        load_pool_statistics(root, "fisher", [1, 0])
    message = _one_line(e)
    assert "fisher_task_000.safetensors is stale" in message
    assert f"compolab stats --pool {root} --kind fisher" in message
    save_pool_statistics(open_pool(root, tasks=[0]), ["fisher"])
    assert has_pool_statistics(root, "fisher", [0, 1])


def test_a_damaged_file_is_one_line(opened, tmp_path):
    root = _copy(opened.pool.root, tmp_path / "pool")
    (root / "stats").mkdir()
    (root / "stats" / "grams_task_000.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CompolabError) as e:
        load_pool_statistics(root, "grams", [0])
    assert "cannot read" in _one_line(e) and "compolab stats --pool" in str(e.value)
    stats = opened.pool.root / "stats"
    shutil.copy(stats / "fisher_task_000.safetensors", root / "stats" / "grams_task_000.safetensors")
    with pytest.raises(CompolabError, match="is not the grams statistics file of task 0"):
        load_pool_statistics(root, "grams", [0])


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"kinds": ["fisher", "hessian"]}, "`kinds` ['hessian']: unknown statistics; known kinds: fisher, "
                                           "grams, kfac"),
        ({"kinds": "fishers"}, "`kinds` ['fishers']"),
        ({"kinds": []}, "`kinds` is empty"),
        ({"fisher_kind": "diagonal"}, "`fisher_kind` 'diagonal' is unknown"),
        ({"batch_size": 0}, "`batch_size` must be > 0"),
        ({"tasks": [0, 5]}, "`tasks` [5] are not loaded"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(opened, tmp_path, kwargs, needle):
    copied = open_pool(_copy(opened.pool.root, tmp_path / "pool"))
    with pytest.raises(ConfigError) as e:
        save_pool_statistics(copied, **kwargs)
    assert needle in _one_line(e)
    assert not (copied.pool.root / "stats").exists()


def test_a_bad_kind_to_read_and_a_tmc_pool_are_refused(opened, tmp_path):
    with pytest.raises(ConfigError, match="`kind` \\['fishers'\\]: unknown statistics; known kinds"):
        load_pool_statistics(opened.pool, "fishers", [0])
    with pytest.raises(ConfigError, match="`kind`"):
        has_pool_statistics(opened.pool, "hessian", [0])
    copied = open_pool(_copy(opened.pool.root, tmp_path / "pool"))
    tmc = dataclasses.replace(copied, method=get_method("tmc"))
    with pytest.raises(CompolabError) as e:
        save_pool_statistics(tmc)
    assert "is a TMC pool" in _one_line(e)
    assert not (copied.pool.root / "stats").exists()


def test_the_hooks_are_removed_even_when_the_forward_fails(opened):
    from compolab.pool_stats import task_grams

    params = {n: p for n, p in opened.theta0.items() if n in tuned_weight_names(opened.backbone)}
    names = list(params)
    params["blocks.0.mlp.fc2.weight"] = torch.zeros(3, 3)  # fails after the hooks of qkv, proj and fc1 ran
    with pytest.raises(RuntimeError):
        task_grams(opened.backbone, params, [torch.zeros(1, 3, 32, 32)], names)
    linears = [m for m in opened.backbone.modules() if isinstance(m, nn.Linear)]
    assert linears and not any(m._forward_pre_hooks for m in linears)
