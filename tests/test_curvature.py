"""Curvature tools against dense float64 references on a small model, and attention through forward AD."""

from __future__ import annotations

import pytest
import torch
from reference import dense_hessian_reference
from torch import nn
from torch.func import functional_call, jacrev

from compolab.curvature import (
    dense_hessian,
    ggn_diagonal,
    hessian_diagonal_exact,
    hutchinson_trace,
    hvp,
    make_loss_fn,
    math_attention,
    top_eigenvalues,
)
from compolab.errors import ConfigError
from compolab.models import BackboneSpec, make_backbone


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny float64 problems; 2 threads on a shared machine only contend
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randint(3, (10,))
    loss_fn, params = make_loss_fn(model, x, y)
    leaves = list(model.parameters())
    dense = dense_hessian_reference(lambda: nn.functional.cross_entropy(model(x), y), leaves)
    return model, x, y, loss_fn, params, dense


def _flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in d.values()])


@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_hvp_equals_dense_hessian_times_v(problem, mode):
    *_, loss_fn, params, dense = problem
    v = {k: torch.randn_like(t) for k, t in params.items()}
    product = _flat(hvp(loss_fn, params, v, mode=mode))
    torch.testing.assert_close(product, dense @ _flat(v), rtol=1e-10, atol=1e-12)


def test_dense_hessian_and_its_diagonal_equal_the_reference(problem):
    *_, loss_fn, params, dense = problem
    torch.testing.assert_close(dense_hessian(loss_fn, params), dense, rtol=1e-10, atol=1e-12)
    diag = hessian_diagonal_exact(loss_fn, params, chunk=16)
    torch.testing.assert_close(_flat(diag), dense.diagonal(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_top_eigenvalues_equal_the_dense_spectrum(problem, which):
    *_, loss_fn, params, dense = problem
    spectrum = torch.linalg.eigvalsh(dense)
    found = top_eigenvalues(loss_fn, params, k=3, which=which, tol=0.0)
    expected = spectrum[-3:].flip(0) if which == "LA" else spectrum[:3].flip(0)
    torch.testing.assert_close(found, expected, rtol=1e-8, atol=1e-10)
    with pytest.raises(ConfigError, match="k must be"):
        top_eigenvalues(loss_fn, params, k=dense.shape[0])


def test_hutchinson_converges_to_the_trace(problem):
    *_, loss_fn, params, dense = problem
    trace = float(dense.trace())
    few, many = (hutchinson_trace(loss_fn, params, n, seed=1) for n in (10, 1000))
    assert many.std_error < 0.3 * few.std_error  # shrinks like 1 / sqrt(n)
    assert abs(many.value - trace) < 4 * many.std_error


def test_ggn_diagonal_equals_dense_gauss_newton(problem):
    model, x, y, *_ = problem
    backbone, head = model[:2], model[2]
    params = dict(model.named_parameters())
    ggn = torch.zeros(sum(p.numel() for p in params.values()), dtype=torch.float64)
    for n in range(x.shape[0]):
        jac = jacrev(lambda p, xn=x[n]: functional_call(model, p, (xn[None],))[0])(params)
        j = torch.cat([jac[k].reshape(3, -1) for k in params], dim=1)  # (C, P)
        p = model(x[n : n + 1]).softmax(-1)[0].detach()
        ggn += (j.T @ (torch.diag(p) - torch.outer(p, p)) @ j).diagonal() / x.shape[0]
    got = ggn_diagonal(backbone, head, [(x, y)], names=["0.weight", "0.bias"], include_head=True)
    flat = torch.cat([got["0.weight"].reshape(-1), got["0.bias"], got["head.weight"].reshape(-1),
                      got["head.bias"]])
    torch.testing.assert_close(flat, ggn, rtol=1e-10, atol=1e-14)


def test_math_attention_enables_forward_ad_through_the_vit_and_restores_fused_attention():
    torch.manual_seed(0)
    vit = make_backbone(BackboneSpec(embed_dim=16, depth=2, num_heads=2)).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    params = {k: v.detach() for k, v in vit.named_parameters()}
    # Move the transformer blocks only: finite differences through the conv stem's ReLUs cross kinks.
    direction = {k: torch.randn_like(v) * k.startswith("blocks.") for k, v in params.items()}
    assert all(b.attn.fused_attn for b in vit.blocks)

    def features(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(vit, p, (x,))

    with math_attention(vit):
        assert not any(b.attn.fused_attn for b in vit.blocks)
        _, tangent = torch.func.jvp(features, (params,), (direction,))
    assert all(b.attn.fused_attn for b in vit.blocks)
    eps = 1e-6
    plus = features({k: params[k] + eps * direction[k] for k in params})
    minus = features({k: params[k] - eps * direction[k] for k in params})
    torch.testing.assert_close(tangent, (plus - minus) / (2 * eps), rtol=1e-6, atol=1e-6)


def test_hvp_runs_through_fused_attention_models():
    torch.manual_seed(0)
    vit = make_backbone(BackboneSpec(embed_dim=16, depth=1, num_heads=2)).double()
    model = nn.Sequential(vit, nn.Linear(16, 3).double())
    x, y = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 2])
    loss_fn, params = make_loss_fn(model, x, y, names=["0.blocks.0.attn.qkv.weight", "1.weight"])
    v = {k: torch.randn_like(t) for k, t in params.items()}
    rev, fwd = hvp(loss_fn, params, v, mode="rev"), hvp(loss_fn, params, v, mode="fwd")
    for k in params:
        torch.testing.assert_close(rev[k], fwd[k], rtol=1e-9, atol=1e-12)


def test_results_carry_no_graph_through_the_other_parameters():
    # Regression: with trainable parameters outside `params`, every Hessian-vector product used to
    # carry their autograd graph, and hessian_diagonal_exact chained one graph per chunk into its
    # output (memory grew with the number of chunks: 23 GB for 512 entries of the tiny ViT).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(10, 4), torch.randint(3, (10,))
    loss_fn, params = make_loss_fn(model, x, y, names=["0.weight"])
    v = {"0.weight": torch.randn(5, 4)}
    assert all(p.requires_grad for p in model.parameters())
    assert hvp(loss_fn, params, v)["0.weight"].grad_fn is None
    assert hvp(loss_fn, params, v, mode="fwd")["0.weight"].grad_fn is None
    assert not hessian_diagonal_exact(loss_fn, params, chunk=4)["0.weight"].requires_grad
    assert not dense_hessian(loss_fn, params).requires_grad
