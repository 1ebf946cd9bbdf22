"""K-FAC through curvlinops: against its dense operator and the exact Fisher (float64), scale, values,
errors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SMALL_SPEC
from torch import nn

from compolab.errors import CompolabError, ConfigError
from compolab.fisher import DiagonalFisher, FisherAccumulator, diagonal_fisher
from compolab.heads import IncrementalHead, new_head
from compolab.kfac import KFAC, kfac_at, kfac_penalty
from compolab.methods.penalties import ita_penalty
from compolab.models import make_backbone, tuned_weight_names

curvlinops = pytest.importorskip("curvlinops")

TIGHT = {"rtol": 1e-9, "atol": 1e-12}
#: One attention and one MLP weight of the 2-block ViT: their dense K-FAC is 1792 × 1792.
NAMES = ["blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight"]
CLASSES = [7, 4, 9]  # global labels of the head's columns 0, 1, 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vit():
    """A float64 2-block ViT fed stem tokens (16 tokens + CLS: every linear sees 17 tokens), its head and
    two batches labelled with global classes."""
    torch.manual_seed(1)
    backbone = make_backbone(SMALL_SPEC).double().requires_grad_(False)
    head = IncrementalHead([new_head(16, 3)], classes=[CLASSES]).double().requires_grad_(False)
    with torch.no_grad():
        head.heads[0].weight.normal_()  # a peaked softmax
    x = torch.randn(6, 16, 16, dtype=torch.float64)
    y = torch.tensor([7, 4, 9, 9, 4, 7])
    return backbone, head, [(x[:3], y[:3]), (x[3:], y[3:])]


def _dense_reference(backbone, head, batches, fisher_type, kfac_approx, seed=0) -> torch.Tensor:
    """curvlinops' own K-FAC of ``head(backbone(x))`` on NAMES as a dense matrix (labels as columns)."""
    net = copy.deepcopy(nn.Sequential(backbone, head))
    params = [net.get_parameter(f"0.{n}").requires_grad_(True) for n in NAMES]
    data = [(x, torch.tensor([CLASSES.index(int(c)) for c in y])) for x, y in batches]
    op = curvlinops.KFACLinearOperator(
        net, nn.CrossEntropyLoss(), params, data, fisher_type=fisher_type, kfac_approx=kfac_approx,
        seed=seed, check_deterministic=False,
    )  # fmt: skip
    n = sum(p.numel() for p in params)
    return op @ torch.eye(n, dtype=torch.float64)


def _random_tau(kfac: KFAC, names=NAMES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {k: torch.randn(kfac.factors[k][1].shape[0], kfac.factors[k][0].shape[0], generator=g,
                           dtype=torch.float64) for k in names}  # fmt: skip


def _vec(tau: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tau[k].flatten() for k in NAMES])


@pytest.mark.parametrize(
    ("fisher_type", "kfac_approx"), [("type-2", "expand"), ("mc", "expand"), ("empirical", "reduce")]
)
def test_quadratic_and_matvec_equal_curvlinops_dense_kfac(vit, fisher_type, kfac_approx):
    backbone, head, batches = vit
    kfac = kfac_at(backbone, head, batches, NAMES, fisher_type=fisher_type, kfac_approx=kfac_approx)
    K = _dense_reference(backbone, head, batches, fisher_type, kfac_approx)
    tau = _random_tau(kfac)
    v = _vec(tau)
    assert kfac.num_samples == 6 and (kfac.fisher_type, kfac.kfac_approx) == (fisher_type, kfac_approx)
    torch.testing.assert_close(kfac.quadratic(tau), v @ K @ v, rtol=1e-6, atol=0)
    Kv = (K @ v).split([tau[k].numel() for k in NAMES])
    for k, part in zip(NAMES, Kv, strict=True):
        torch.testing.assert_close(kfac.matvec(k, tau[k]), part.view_as(tau[k]), **TIGHT, msg=k)


def test_gradient_of_the_penalty_is_alpha_k_tau(vit):
    backbone, head, batches = vit
    kfac = kfac_at(backbone, head, batches, NAMES, fisher_type="type-2")
    K = _dense_reference(backbone, head, batches, "type-2", "expand")
    tau = {k: v.requires_grad_(True) for k, v in _random_tau(kfac).items()}
    alpha = 0.7
    (0.5 * alpha * kfac.quadratic(tau)).backward()
    expected = (alpha * K @ _vec(tau).detach()).split([tau[k].numel() for k in NAMES])
    for k, part in zip(NAMES, expected, strict=True):
        torch.testing.assert_close(tau[k].grad, part.view_as(tau[k]), **TIGHT, msg=k)
    # one task: kfac_penalty is the same function (weight n_k / N = 1)
    grads = torch.autograd.grad(kfac_penalty(tau, [kfac], alpha), [tau[k] for k in NAMES])
    for k, grad in zip(NAMES, grads, strict=True):
        torch.testing.assert_close(grad, tau[k].grad, **TIGHT, msg=k)


def _linear():
    torch.manual_seed(4)
    layer = nn.Linear(5, 4).double().requires_grad_(False)
    with torch.no_grad():
        layer.weight.mul_(3.0)
    return layer


def _exact_fisher(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Dense Fisher of the mean loss, by hand: (1/N) Σ_n Σ_c p_c vec(∇_W log p_c) vec(∇_W log p_c)ᵀ."""
    weight = layer.weight.detach().clone().requires_grad_(True)
    total = torch.zeros(weight.numel(), weight.numel(), dtype=torch.float64)
    for xn in x:
        log_p = torch.log_softmax(xn @ weight.T + layer.bias, -1)
        for c in range(log_p.numel()):
            (g,) = torch.autograd.grad(log_p[c], weight, retain_graph=True)
            total += log_p[c].exp().detach() * torch.outer(g.flatten(), g.flatten())
    return total / len(x)


def _dense_kfac(kfac: KFAC, name: str) -> torch.Tensor:
    """K-FAC's matrix in row-major vec(ΔW), column by column through matvec."""
    a, g = kfac.factors[name]
    basis = torch.eye(a.shape[0] * g.shape[0], dtype=a.dtype)
    return torch.stack([kfac.matvec(name, e.view(g.shape[0], a.shape[0])).flatten() for e in basis], 1)


@pytest.mark.parametrize("copies", [1, 3])
def test_kfac_of_a_linear_layer_on_one_sample_is_the_exact_mean_fisher(copies):
    # K-FAC is exact per sample; N copies of one sample pin the scale: the mean Fisher, not the sum.
    layer = _linear()
    x = torch.randn(1, 5, dtype=torch.float64).repeat(copies, 1)
    kfac = kfac_at(layer, None, [x], ["weight"], fisher_type="exact")
    exact = _exact_fisher(layer, x)
    torch.testing.assert_close(_dense_kfac(kfac, "weight"), exact, rtol=1e-6, atol=1e-12)
    diag = diagonal_fisher(layer, None, [x], names=["weight"], kind="exact")
    assert diag.num_samples == kfac.num_samples == copies
    torch.testing.assert_close(kfac.diagonal()["weight"], diag.mean()["weight"], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(kfac.diagonal()["weight"] * copies, diag["weight"], rtol=1e-6, atol=1e-12)
    tau = {"weight": torch.randn(4, 5, dtype=torch.float64)}
    torch.testing.assert_close(kfac.quadratic(tau), tau["weight"].flatten() @ exact @ tau["weight"].flatten(),
                               rtol=1e-6, atol=0)  # fmt: skip


def test_kfac_over_distinct_samples_is_an_approximation():
    layer = _linear()
    x = torch.randn(4, 5, dtype=torch.float64)
    kfac = kfac_at(layer, None, [x], ["weight"], fisher_type="type-2")
    gap = (_dense_kfac(kfac, "weight") - _exact_fisher(layer, x)).norm() / _exact_fisher(layer, x).norm()
    assert gap > 1e-3


def test_params_sets_the_evaluation_point_and_leaves_the_modules_alone():
    layer = _linear()
    moved = copy.deepcopy(layer)
    with torch.no_grad():
        moved.weight.add_(0.5)
    x = torch.randn(3, 5, dtype=torch.float64)
    at = kfac_at(layer, None, [x], ["weight"], fisher_type="type-2", params={"weight": moved.weight})
    direct = kfac_at(moved, None, [x], ["weight"], fisher_type="type-2")
    for f, g in zip(at.factors["weight"], direct.factors["weight"], strict=True):
        torch.testing.assert_close(f, g, **TIGHT)
    assert not layer.weight.requires_grad and not torch.equal(layer.weight, moved.weight)


def test_kfac_penalty_matches_ita_scaling_with_diagonal_factors():
    # Diagonal A and G make A ⊗ G diagonal: the penalty must equal ita_penalty with the accumulator's
    # mean over the previous tasks' samples (task weights n_k / N, here 2/8 and 6/8).
    g = torch.Generator().manual_seed(5)
    diag = lambda n: torch.diag(torch.rand(n, generator=g, dtype=torch.float64))  # noqa: E731
    kfacs = [KFAC({"w": (diag(3), diag(2))}, n) for n in (2, 6)]
    acc = FisherAccumulator(prior=0.0)
    for k in kfacs:
        acc.add_task(DiagonalFisher({"w": k.diagonal()["w"] * k.num_samples}, k.num_samples))
    acc.add_task(DiagonalFisher({"w": torch.ones(2, 3, dtype=torch.float64)}, 4))  # the current task
    tau = {"w": torch.randn(2, 3, generator=g, dtype=torch.float64)}
    torch.testing.assert_close(kfac_penalty(tau, kfacs, 3.0), ita_penalty(tau, acc.ita(2), 3.0), **TIGHT)
    assert float(kfac_penalty(tau, [], 3.0)) == 0.0


def test_default_names_and_memory_of_float32_factors(backbone):
    x = torch.randn(4, 16, 16)
    kfac = kfac_at(backbone, None, [x], fisher_type="mc")
    assert list(kfac.factors) == tuned_weight_names(backbone)
    for name, size in kfac.memory_bytes().items():
        out, inp = backbone.get_parameter(name).shape
        assert size == 4 * (inp**2 + out**2), name
    assert kfac.memory_bytes()["blocks.0.mlp.fc1.weight"] == 4 * (16**2 + 64**2)
    assert not any(p.requires_grad for p in backbone.parameters())


def test_save_load_round_trip_is_bit_exact(vit, tmp_path):
    backbone, head, batches = vit
    names = NAMES[::-1]  # not sorted: the saved order comes back
    kfac = kfac_at(backbone, head, batches, names, fisher_type="mc", mc_samples=2, seed=3).to(torch.float32)
    kfac.save(tmp_path / "k.safetensors")
    back = KFAC.load(tmp_path / "k.safetensors")
    assert (back.num_samples, back.fisher_type, back.kfac_approx) == (6, "mc", "expand")
    assert list(back.factors) == list(kfac.factors) == names
    for name, pair in kfac.factors.items():
        for f, g in zip(pair, back.factors[name], strict=True):
            assert torch.equal(f, g) and f.dtype == g.dtype == torch.float32, name
    DiagonalFisher({"w": torch.ones(2)}, 1).save(tmp_path / "d.safetensors")
    with pytest.raises(CompolabError, match="not a saved KFAC"):
        KFAC.load(tmp_path / "d.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CompolabError, match="cannot read a K-FAC"):
        KFAC.load(tmp_path / "bad.safetensors")


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_inputs_raise_one_line_config_errors():
    layer = _linear()
    x = torch.randn(2, 5, dtype=torch.float64)
    kfac = kfac_at(layer, None, [x], ["weight"], fisher_type="type-2")
    tau = {"weight": torch.zeros(4, 5, dtype=torch.float64), "other.weight": torch.zeros(2, 2)}
    with pytest.raises(ConfigError) as e:
        kfac.quadratic(tau)
    assert "other.weight" in _one_line(e)
    assert float(kfac.quadratic(tau, strict=False)) == 0.0
    with pytest.raises(ConfigError) as e:
        kfac.quadratic({"weight": torch.zeros(5, 4, dtype=torch.float64)})
    assert "(5, 4)" in _one_line(e) and "(4, 5)" in _one_line(e)
    with pytest.raises(ConfigError, match="'nope'"):
        kfac.matvec("nope", torch.zeros(4, 5))
    cases = [
        ({"fisher_type": "fancy"}, "fisher_type"),
        ({"kfac_approx": "squash"}, "kfac_approx"),
        ({"fisher_type": "type-2", "mc_samples": 2}, "mc_samples"),
        ({"names": ["bias"]}, "no biases"),
        ({"names": ["missing.weight"]}, "missing.weight"),
        ({"fisher_type": "empirical"}, "needs labels"),
    ]
    for kwargs, needle in cases:
        kwargs = {"names": ["weight"], **kwargs}
        with pytest.raises(ConfigError) as e:
            kfac_at(layer, None, [x], **kwargs)
        assert needle in _one_line(e), kwargs
    with pytest.raises(ConfigError, match="no samples"):
        kfac_at(layer, None, [], ["weight"])
    with pytest.raises(ConfigError, match="fisher_type"):
        KFAC({}, 1, fisher_type="exact")
    with pytest.raises(ConfigError, match="square"):
        KFAC({"w": (torch.zeros(2, 3), torch.zeros(2, 2))}, 1)
