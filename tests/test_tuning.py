"""Tuning styles (spec §A.7) and the composed forward, in float64 on a tiny ViT."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load, save

from compolab.compose import ComposedForward, merge
from compolab.errors import ConfigError
from compolab.models import BackboneSpec, make_backbone, theta0_of, tuned_weight_names
from compolab.task_vector import TaskVector
from compolab.tuning import STYLES, LoRAModule, TaskModule

SMALL = BackboneSpec(embed_dim=16, depth=2, num_heads=2)
RANK = 2


@pytest.fixture(scope="module")
def backbone():
    return make_backbone(SMALL).double()


@pytest.fixture(scope="module")
def theta0(backbone):
    return theta0_of(backbone)


@pytest.fixture(scope="module")
def names(backbone):
    return tuned_weight_names(backbone)


@pytest.fixture
def x():
    return torch.randn(2, 3, SMALL.img_size, SMALL.img_size, dtype=torch.float64)


def trained(style: str, theta0, names, seed: int) -> TaskModule:
    """A fresh module whose tensors are then moved at random, so that its delta is not zero."""
    gen = torch.Generator().manual_seed(seed)
    module = TaskModule.create(style, theta0, names, rank=RANK, generator=gen)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


@pytest.mark.parametrize("style", sorted(STYLES))
def test_fresh_module_has_zero_delta(style, theta0, names):
    module = TaskModule.create(style, theta0, names, rank=RANK)
    delta = module.delta(theta0)
    assert list(delta) == names
    assert delta.allclose(TaskVector.zeros_like(theta0, names), rtol=0, atol=0)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_merged_model_matches_functional_forward(style, backbone, theta0, names, x):
    frozen = [trained(style, theta0, names, seed).delta(theta0).detach() for seed in range(3)]
    current = trained(style, theta0, names, seed=3)
    coefs = [0.25] * 4
    composed = ComposedForward(backbone, theta0, frozen, coefs[:3], module=current, coef=0.25)
    taus = [*frozen, current.delta(theta0).detach()]
    merged = merge(backbone, theta0, taus, coefs)
    reference = sum(w * tau for w, tau in zip(coefs, taus, strict=True)).apply_to(backbone)
    out = composed(x)
    torch.testing.assert_close(out, merged(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(out, reference(x), rtol=0, atol=1e-6)
    assert (out - backbone(x)).abs().max() > 1e-4  # the modules do change the output


def test_lora_delta_is_B_times_A_with_rank_3r_on_qkv(theta0, names):
    module = trained("lora", theta0, names, seed=0)
    assert isinstance(module, LoRAModule)
    delta = module.delta(theta0)
    for i, name in enumerate(names):
        a, b = module.lora_A[i], module.lora_B[i]
        out_features, in_features = theta0[name].shape
        r = 3 * RANK if name.endswith("attn.qkv.weight") else RANK
        assert a.shape == (r, in_features) and b.shape == (out_features, r)
        torch.testing.assert_close(delta[name], b @ a, rtol=0, atol=0)


def test_lora_init_follows_the_kaiming_bound(theta0, names):
    gen = torch.Generator().manual_seed(0)
    module = TaskModule.create("lora", theta0, names, rank=4, generator=gen)
    for a, b in zip(module.lora_A, module.lora_B, strict=True):
        bound = 1 / math.sqrt(a.shape[0] * a.shape[1])  # kaiming(a=√5) on (1, r', in)
        assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
        assert not b.any()


def test_ia3_delta_scales_output_rows(theta0, names):
    module = trained("ia3", theta0, names, seed=0)
    delta = module.delta(theta0)
    for i, name in enumerate(names):
        ell = module.ia3_l[i]
        assert ell.shape == (theta0[name].shape[0],)
        torch.testing.assert_close(delta[name], theta0[name] * (ell - 1)[:, None], rtol=0, atol=0)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_gradients_reach_only_the_current_module(style, theta0, names, x):
    backbone = make_backbone(SMALL).double()
    backbone.load_state_dict(theta0, strict=False)
    # Not detached: merging must cut their graph.
    frozen = [trained(style, theta0, names, seed).delta(theta0) for seed in range(2)]
    current = trained(style, theta0, names, seed=2)
    composed = ComposedForward(backbone, theta0, frozen, [1 / 3] * 2, module=current, coef=1 / 3)
    composed(x).square().sum().backward()
    for name, p in current.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())
    assert not any(t.requires_grad for t in composed.merged.values())
    trainable = {id(p) for p in composed.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in current.parameters()}


@pytest.mark.parametrize("style", sorted(STYLES))
def test_num_trainable_matches_the_formula(style, theta0, names):
    module = TaskModule.create(style, theta0, names, rank=RANK)
    shapes = [theta0[n].shape for n in names]
    expected = {
        "full": sum(o * i for o, i in shapes),
        "lora": sum(
            LoRAModule.effective_rank(n, RANK) * (i + o)
            for n, (o, i) in zip(names, shapes, strict=True)
        ),
        "ia3": sum(o for o, _ in shapes),
    }[style]
    assert module.num_trainable() == expected
    assert f"{expected:,}" in module.describe() and style in repr(module)


@pytest.mark.parametrize("num_frozen", [1, 10])
def test_frozen_pool_is_one_merged_tensor_per_target(num_frozen, backbone, theta0, names, x):
    frozen = [trained("lora", theta0, names, s).delta(theta0).detach() for s in range(num_frozen)]
    current = TaskModule.create("lora", theta0, names, rank=RANK)
    composed = ComposedForward(backbone, theta0, frozen, module=current, coef=0.5)
    assert list(composed.merged) == names  # one dense tensor per target, whatever the pool size
    assert all(composed.merged[n].shape == theta0[n].shape for n in names)
    params = composed.params()
    assert set(params) == set(theta0)
    torch.testing.assert_close(composed(x), merge(backbone, theta0, frozen)(x), rtol=0, atol=1e-6)


def test_set_frozen_remerges_and_unlearns(backbone, theta0, names, x):
    taus = [trained("full", theta0, names, seed).delta(theta0).detach() for seed in range(2)]
    composed = ComposedForward(backbone, theta0, taus, [0.5, 0.5])
    composed.set_frozen(taus[:1], [1.0])  # drop task 1
    torch.testing.assert_close(composed(x), taus[0].apply_to(backbone)(x), rtol=0, atol=1e-6)
    composed.set_frozen([])
    torch.testing.assert_close(composed(x), backbone(x), rtol=0, atol=1e-12)
    with pytest.raises(ConfigError, match="expected 2 coefs .* got 1"):
        composed.set_frozen(taus, [1.0])


def test_composed_forward_moves_its_dicts_and_keeps_the_backbone_in_eval(theta0, names):
    backbone = make_backbone(SMALL).double()
    module = TaskModule.create("ia3", theta0, names)
    composed = ComposedForward(backbone, theta0, module=module).float().train()
    assert composed.training and module.training and not backbone.training
    moved = [*composed.theta0.values(), *composed.merged.values()]
    assert all(t.dtype == torch.float32 for t in moved)
    out = composed(torch.randn(1, 3, SMALL.img_size, SMALL.img_size))
    assert out.dtype == torch.float32


@pytest.mark.parametrize("style", sorted(STYLES))
def test_state_tensors_roundtrip_through_safetensors(style, theta0, names):
    module = trained(style, theta0, names, seed=0)
    stored = load(save(module.state_tensors()))
    assert all("::" in k for k in stored)
    again = TaskModule.from_state_tensors(style, names, stored)
    assert type(again) is type(module) and again.names == module.names
    assert again.delta(theta0).allclose(module.delta(theta0), rtol=0, atol=0)
    assert all(p.requires_grad for p in again.parameters())
    del stored[next(iter(stored))]
    with pytest.raises(ConfigError, match="missing keys"):
        TaskModule.from_state_tensors(style, names, stored)


def test_bad_arguments_raise(backbone, theta0, names):
    with pytest.raises(ConfigError, match=r"valid styles: \['full', 'ia3', 'lora'\]"):
        TaskModule.create("dora", theta0, names)
    with pytest.raises(ConfigError, match="not 2-D"):
        TaskModule.create("full", theta0, ["blocks.0.norm1.weight"])
    with pytest.raises(ConfigError, match="rank must be > 0"):
        TaskModule.create("lora", theta0, names, rank=0)
    with pytest.raises(ConfigError, match="lora_B: expected 1 tensors"):
        LoRAModule(names[:1], [torch.zeros(2, 16)], [])
    with pytest.raises(ConfigError, match="not in the backbone"):
        ComposedForward(backbone, {"ghost.weight": torch.zeros(1)})


def test_theta0_of_is_a_detached_copy():
    model = make_backbone(SMALL)
    theta0 = theta0_of(model, ["blocks.0.attn.qkv.weight"])
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.add_(1.0)
    assert not theta0["blocks.0.attn.qkv.weight"].requires_grad
    assert not torch.equal(theta0["blocks.0.attn.qkv.weight"], model.blocks[0].attn.qkv.weight)
    with pytest.raises(ConfigError, match="ghost"):
        theta0_of(model, ["ghost"])
