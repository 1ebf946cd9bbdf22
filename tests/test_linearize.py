"""The linearised model: Taylor terms against finite differences (float64), exact composition and
unlearning, gradients only to the tangent, fused attention untouched outside the jvp."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.func import functional_call
from torch.testing import assert_close

from compolab.errors import ConfigError
from compolab.linearize import (
    LinearizedModel,
    TangentComponent,
    compose_linearized,
    linearize_at,
    linearized_forward,
    linearized_names,
)
from compolab.models import BackboneSpec, make_backbone, theta0_of, tuned_weight_names
from compolab.task_vector import TaskVector
from compolab.tuning import TaskModule

SPEC = BackboneSpec(embed_dim=16, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return make_backbone(SPEC).double().requires_grad_(False)


@pytest.fixture(scope="module")
def x():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, SPEC.img_size, SPEC.img_size, generator=gen).double()


def _random_tau(names, theta0, seed, scale=0.1):
    gen = torch.Generator().manual_seed(seed)
    return TaskVector({n: scale * torch.randn(theta0[n].shape, generator=gen).double() for n in names})


def _head(seed=0, classes=5):
    torch.manual_seed(seed)
    return nn.Linear(SPEC.embed_dim, classes).double().requires_grad_(False)


def _head_delta(head, seed):
    gen = torch.Generator().manual_seed(seed)
    params = dict(head.named_parameters())
    return TaskVector({n: 0.1 * torch.randn(p.shape, generator=gen).double() for n, p in params.items()})


def _lin(backbone, component, head):
    """One component's own linearised model."""
    return LinearizedModel(backbone, tau=component.tau, head=head, head_delta=component.head)


def _at(model, theta0, tau, eps):
    """f(x; θ0 + eps τ) through functional_call (the non-linear model)."""
    return lambda x: functional_call(model, {n: theta0[n] + eps * t for n, t in tau.items()}, (x,))


def test_at_zero_tangent_the_linearised_model_is_the_base_model(backbone, x):
    with torch.no_grad():
        assert_close(LinearizedModel(backbone)(x), backbone(x), rtol=1e-12, atol=1e-12)
        head = _head()
        assert_close(LinearizedModel(backbone, head=head)(x), head(backbone(x)), rtol=1e-12, atol=1e-12)


def test_jvp_matches_central_finite_difference_float64(backbone, x):
    theta0 = theta0_of(backbone)
    names = tuned_weight_names(backbone)  # transformer blocks only: no ReLU kink of the conv stem
    tau = _random_tau(names, theta0, seed=2)
    with torch.no_grad():
        f0, jvp = linearized_forward(backbone, theta0, tau, x)

        def fd(eps):
            return (_at(backbone, theta0, tau, eps)(x) - _at(backbone, theta0, tau, -eps)(x)) / (2 * eps)

        err = [float((fd(eps) - jvp).abs().max()) for eps in (1e-4, 1e-5)]
        assert_close(f0, backbone(x), rtol=1e-12, atol=1e-12)
        assert jvp.abs().max() > 1e-1  # a real direction, not a vacuous zero
        assert_close(jvp, fd(1e-6), rtol=1e-8, atol=1e-8)
    assert 50 < err[0] / err[1] < 200  # the central difference converges as eps^2 to exactly J tau


def test_every_parameter_can_be_linearised_on_any_timm_model():
    # A smooth ViT (linear patch embedding): finite differences are exact to O(eps^2) for all names.
    torch.manual_seed(3)
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=8, depth=1, num_heads=2, num_classes=0)
    vit = vit.double().eval().requires_grad_(False)
    names = linearized_names(vit, "all")
    assert "patch_embed.proj.weight" in names and "cls_token" in names and "norm.bias" in names
    theta0 = theta0_of(vit)
    tau = _random_tau(names, theta0, seed=4)
    xs = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    model = LinearizedModel(vit, tau=tau)
    assert model.names == tuple(names)
    with torch.no_grad():
        eps = 1e-5
        fd = (_at(vit, theta0, tau, eps)(xs) - _at(vit, theta0, tau, -eps)(xs)) / (2 * eps)
        assert_close(model(xs) - vit(xs), fd, rtol=1e-7, atol=1e-9)


def test_the_head_is_linearised_with_the_backbone(backbone, x):
    # W0 (f0 + J tau) + dW f0 + b0 + db: the first-order expansion of head ∘ backbone.
    theta0, names, head = theta0_of(backbone), tuned_weight_names(backbone), _head()
    tau, delta = _random_tau(names, theta0, seed=5), _head_delta(head, seed=6)
    model = LinearizedModel(backbone, tau=tau, head=head, head_delta=delta)
    with torch.no_grad():
        f0, jvp = linearized_forward(backbone, theta0, tau, x)
        expected = head.weight @ (f0 + jvp).T + delta["weight"] @ f0.T
        expected = expected.T + head.bias + delta["bias"]
        assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("style", ["full", "lora", "ia3"])
def test_a_task_module_gives_the_tangent_of_any_style(backbone, x, style):
    theta0, names = theta0_of(backbone), tuned_weight_names(backbone)
    module = TaskModule.create(style, theta0, names, rank=2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, dtype=p.dtype))
    model = LinearizedModel(backbone, theta0, module=module)
    tau = model.task_vector()
    assert list(tau) == names and tau.allclose(module.delta(theta0), rtol=0, atol=0)
    assert set(tau.apply_to(backbone).state_dict()) == set(backbone.state_dict())  # an ordinary τ
    with torch.no_grad():
        assert_close(model(x), LinearizedModel(backbone, theta0, tau=tau)(x), rtol=1e-12, atol=1e-12)


def _components(backbone, head, n=3):
    theta0, names = theta0_of(backbone), tuned_weight_names(backbone)
    return [TangentComponent(_random_tau(names, theta0, 10 + i), _head_delta(head, 20 + i)) for i in range(n)]


def test_composition_equals_the_average_of_linearised_outputs(backbone, x):
    head = _head()
    comps = _components(backbone, head)
    coefs = [0.5, 0.2, 0.3]
    composed = compose_linearized(backbone, comps, coefs, head=head)
    with torch.no_grad():
        ensemble = sum(w * _lin(backbone, c, head)(x) for w, c in zip(coefs, comps, strict=True))
        assert_close(composed(x), ensemble, rtol=1e-12, atol=1e-12)
    assert composed.task_vector().allclose(sum(w * c.tau for w, c in zip(coefs, comps, strict=True)))
    assert not any(p.requires_grad for p in composed.parameters())


def test_unlearning_recomposes_without_the_component_with_no_residual(backbone, x):
    head = _head()
    comps = dict(enumerate(_components(backbone, head)))
    with torch.no_grad():
        forgotten = compose_linearized(backbone, comps, drop=[1], head=head)(x)
        never_seen = compose_linearized(backbone, {0: comps[0], 2: comps[2]}, head=head)(x)
        everything = compose_linearized(backbone, comps, head=head)(x)
        pair = [_lin(backbone, comps[k], head)(x) for k in (0, 2)]
    assert torch.equal(forgotten, never_seen)  # bit for bit: nothing of component 1 remains
    assert not torch.allclose(forgotten, everything)
    assert_close(forgotten, (pair[0] + pair[1]) / 2, rtol=1e-12, atol=1e-12)


def test_gradients_reach_only_the_tangent(backbone, x):
    theta0, names, head = theta0_of(backbone), tuned_weight_names(backbone), _head()
    module = TaskModule.create("lora", theta0, names, rank=2, generator=torch.Generator().manual_seed(0))
    model = LinearizedModel(backbone, theta0, module=module, head=head).train()
    assert not backbone.training and not head.training  # frozen statistics, always
    model(x).square().sum().backward()
    assert all(p.grad is None for p in [*backbone.parameters(), *head.parameters()])
    assert all(t.grad is None for t in model.theta0.values())
    assert module.lora_A[0].grad is not None and float(module.lora_B[0].grad.abs().sum()) > 0
    assert all(float(p.grad.abs().sum()) > 0 for p in model.head_delta.values())


def test_fused_attention_is_bypassed_only_inside_the_jvp(backbone, x):
    seen = []
    def record(module, args):
        seen.append(module.fused_attn)

    hooks = [b.attn.register_forward_pre_hook(record) for b in backbone.blocks]
    try:
        assert all(b.attn.fused_attn for b in backbone.blocks)
        with torch.no_grad():
            LinearizedModel(backbone)(x)
            assert seen == [False] * len(backbone.blocks)
            assert all(b.attn.fused_attn for b in backbone.blocks)  # restored after the forward
            seen.clear()
            plain = backbone(x)  # the default path still works, fused
            assert seen == [True] * len(backbone.blocks)
    finally:
        for h in hooks:
            h.remove()
    assert_close(plain, functional_call(backbone, theta0_of(backbone), (x,)), rtol=1e-10, atol=1e-10)


def test_linearize_at_traces_the_same_jvp(backbone, x):
    theta0, names, head = theta0_of(backbone), tuned_weight_names(backbone), _head()
    comps = _components(backbone, head, n=2)
    f0, jvp_fn = linearize_at(backbone, theta0, names, x, head=head)
    with torch.no_grad():
        for c in comps:
            ref0, ref = linearized_forward(backbone, theta0, c.tau, x, head=head, head_delta=c.head)
            assert_close(f0, ref0, rtol=1e-12, atol=1e-12)
            assert_close(jvp_fn(c.tau, c.head), ref, rtol=1e-10, atol=1e-12)


def test_bad_arguments_are_refused(backbone):
    theta0, names = theta0_of(backbone), tuned_weight_names(backbone)
    module = TaskModule.create("full", theta0, names)
    with pytest.raises(ConfigError, match="not both"):
        LinearizedModel(backbone, module=module, tau=module.delta(theta0))
    with pytest.raises(ConfigError, match="not among the model's parameters"):
        LinearizedModel(backbone, names=["blocks.0.nope"])
    with pytest.raises(ConfigError, match="'tuned', 'all'"):
        linearized_names(backbone, "some")
    comps = [TangentComponent(TaskVector.zeros_like(theta0, names))]
    with pytest.raises(ConfigError, match="unknown component"):
        compose_linearized(backbone, comps, drop=[3])
    with pytest.raises(ConfigError, match="nothing left"):
        compose_linearized(backbone, comps, drop=[0])
    with pytest.raises(ConfigError, match="coefs"):
        compose_linearized(backbone, comps, [0.5, 0.5])
