"""The probes' three curvatures (exact on the span, K-FAC, diagonal) against a dense float64 reference.

The reference builds the Fisher of a two-layer tanh network as a matrix, ``F = mean_n J_nᵀ H_n J_n``
(``H_n = diag p_n − p_n p_nᵀ``), its diagonal, and K-FAC's blocks ``A = mean a aᵀ``,
``G = mean B_nᵀ H_n B_n`` (``B_n``: the logits' Jacobian with respect to the layer's outputs) by
hand, without curvlinops or the kit's Fisher code, and checks Ω and the composed-loss prediction of
:func:`compolab.probes.jensen_gap` with each.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev
from torch.testing import assert_close

pytest.importorskip("curvlinops")

from compolab.errors import ConfigError  # noqa: E402
from compolab.explore.quadratic import Quadratic  # noqa: E402
from compolab.fisher_store import DiagonalFisher  # noqa: E402
from compolab.kfac import KFAC  # noqa: E402
from compolab.probes import JensenGap, ProbeData, jensen_gap, second_order  # noqa: E402
from compolab.probes.curvatures import curvature_gram, probe_curvature  # noqa: E402

NAMES = ("0.weight", "2.weight")


def _world(per_task: int = 6, same_image: bool = False):
    """A float64 tanh network (5 → 6 → 4 features), a fixed 3-class head, 2 tasks, 3 modules."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(5, 6, bias=False), nn.Tanh(), nn.Linear(6, 4, bias=False)).double()
    head = nn.Linear(4, 3).double().requires_grad_(False)
    theta0 = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    x = {t: torch.randn(per_task, 5, generator=gen, dtype=torch.float64) for t in (0, 1)}
    if same_image:
        x = {t: x[0][:1].expand(per_task, 5).clone() for t in (0, 1)}
    y = {t: torch.randint(0, 3, (per_task,), generator=gen) for t in (0, 1)}
    taus = [{n: 0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in theta0.items()}
            for _ in range(3)]  # fmt: skip
    return backbone, head, theta0, ProbeData(x, y), taus


def _dense(backbone, head, theta0, data):
    """Dense F, diag F and the K-FAC blocks ``{name: (A, G)}`` of the mean cross-entropy at θ0."""
    xs = torch.cat([data.x[t] for t in data.tasks])
    sizes = [theta0[n].numel() for n in NAMES]

    def logits(flat, x):
        chunks = zip(flat.split(sizes), NAMES, strict=True)
        parts = {n: c.view(theta0[n].shape) for c, n in chunks}
        return head(functional_call(backbone, parts, (x[None],)))[0]

    flat0 = torch.cat([theta0[n].flatten() for n in NAMES])
    fisher = torch.zeros(len(flat0), len(flat0), dtype=torch.float64)
    w1, w2 = theta0["0.weight"], theta0["2.weight"]
    a1 = g1 = a2 = g2 = 0.0
    for x in xs:
        p = logits(flat0, x).softmax(-1)
        h = torch.diag(p) - torch.outer(p, p)
        jac = jacrev(logits)(flat0, x)  # (3, P)
        fisher += jac.T @ h @ jac / len(xs)
        hidden = torch.tanh(w1 @ x)
        b2 = head.weight  # logits = head(W2 hidden): ∂z/∂(W2 hidden)
        b1 = head.weight @ w2 @ torch.diag(1 - hidden**2)  # ∂z/∂(W1 x)
        a1, g1 = a1 + torch.outer(x, x) / len(xs), g1 + b1.T @ h @ b1 / len(xs)
        a2, g2 = a2 + torch.outer(hidden, hidden) / len(xs), g2 + b2.T @ h @ b2 / len(xs)
    return fisher, {"0.weight": (a1, g1), "2.weight": (a2, g2)}


def _flat(tau):
    return torch.cat([tau[n].flatten() for n in NAMES])


def _omega(taus, k, quad):
    bar = {n: sum(t[n] for t in taus[:k]) / k for n in NAMES}
    return sum(quad({n: t[n] - bar[n] for n in NAMES}) for t in taus[:k]) / (2 * k)


def test_jensen_omega_and_prediction_match_the_dense_reference_for_each_curvature():
    backbone, head, theta0, data, taus = _world()
    fisher, blocks = _dense(backbone, head, theta0, data)
    diagonal = probe_curvature("diagonal", backbone, theta0, head, data)
    kfac = probe_curvature("kfac", backbone, theta0, head, data)
    for n in NAMES:  # the curvatures themselves
        a, g = blocks[n]
        assert_close(kfac.factors[n][0], a, rtol=1e-10, atol=1e-12)
        assert_close(kfac.factors[n][1], g, rtol=1e-10, atol=1e-12)
    assert_close(torch.cat([diagonal.mean()[n].flatten() for n in NAMES]), fisher.diagonal(), rtol=1e-10,
                 atol=1e-12)  # fmt: skip
    quads = {
        "fisher": lambda d: float(_flat(d) @ fisher @ _flat(d)),
        "diagonal": lambda d: float((fisher.diagonal() * _flat(d) ** 2).sum()),
        "kfac": lambda d: sum(float((d[n] * (blocks[n][1] @ d[n] @ blocks[n][0])).sum()) for n in NAMES),
    }
    gap = jensen_gap(backbone, theta0, taus, data, head, fisher=diagonal, kfac=kfac, progress=False)
    for name, omega in gap.omegas().items():
        assert_close(omega, [_omega(taus, k, quads[name]) for k in gap.sizes], rtol=1e-9, atol=1e-12)
    xs, ys = torch.cat([data.x[t] for t in data.tasks]), torch.cat([data.y[t] for t in data.tasks])
    backbone.requires_grad_(False)
    loss0 = float(F.cross_entropy(head(backbone(xs)), ys))
    assert gap.loss0 == pytest.approx(loss0, rel=1e-12)
    for q, k in enumerate(gap.sizes):  # ℓ0 + gᵀτ̄ + ½ τ̄ᵀCτ̄, gᵀτ̄ by a finite difference of ℓ
        bar = {n: sum(t[n] for t in taus[:k]) / k for n in NAMES}
        eps = 1e-6
        plus, minus = ({n: theta0[n] + s * bar[n] for n in NAMES} for s in (eps, -eps))
        slope = (float(F.cross_entropy(head(functional_call(backbone, plus, (xs,))), ys))
                 - float(F.cross_entropy(head(functional_call(backbone, minus, (xs,))), ys))) / (2 * eps)
        for name in ("fisher", "kfac", "diagonal"):
            expected = loss0 + slope + 0.5 * quads[name](bar)
            assert gap.predicted[name][q] == pytest.approx(expected, rel=1e-7)
    # the three differ on this network: K-FAC drops the cross-layer blocks, the diagonal even more
    assert len({round(v, 6) for v in (gap.omega[-1], gap.omega_kfac[-1], gap.omega_diagonal[-1])}) == 3
    errors = {name: gap.omega_error(name) for name in gap.omegas()}
    by_hand = [abs(o - m) / abs(m) for o, m in zip(gap.omega[1:], gap.measured[1:], strict=True)]
    assert errors["fisher"] == pytest.approx(by_hand) and len(errors) == 3
    again = JensenGap.from_json(gap.to_json())
    assert again.omega_kfac == gap.omega_kfac and again.predicted == gap.predicted


def test_with_one_repeated_image_kfac_is_the_exact_fisher():
    """K-FAC of N equal samples is exact per layer; with one layer tuned it is the exact Fisher."""
    backbone, head, theta0, data, taus = _world(per_task=2, same_image=True)
    one = [{"2.weight": t["2.weight"]} for t in taus]
    theta = {"2.weight": theta0["2.weight"]}
    kfac = probe_curvature("kfac", backbone, theta, head, data)
    gap = jensen_gap(backbone, theta, one, data, head, kfac=kfac, progress=False)
    assert_close(gap.omega_kfac, gap.omega, rtol=1e-10, atol=1e-14)


def test_second_order_and_the_explorer_quadratic_take_a_kfac():
    backbone, head, theta0, data, taus = _world()
    kfac = probe_curvature("kfac", backbone, theta0, head, data)
    pred = second_order(backbone, theta0, taus[0], data, head, curvature=kfac, progress=False)
    assert pred.kind == "kfac"
    assert list(pred.curvature.values()) == pytest.approx([float(kfac.quadratic(taus[0]))] * 2)
    gram = curvature_gram(kfac, taus)
    assert_close(gram, gram.T) and gram[0, 0] == pytest.approx(float(kfac.quadratic(taus[0])))
    model = Quadratic.from_model(backbone, theta0, dict(enumerate(taus)), data, head, curvature=kfac)
    assert model.kind == "kfac"
    assert_close(model.gram, gram.expand(2, 3, 3))
    exact = Quadratic.from_model(backbone, theta0, dict(enumerate(taus)), data, head)
    assert_close(model.loss0, exact.loss0) and assert_close(model.slope, exact.slope)


def test_curvature_gram_of_a_diagonal_and_bad_curvatures():
    fisher = DiagonalFisher({"w": torch.tensor([2.0, 4.0])}, num_samples=2)
    taus = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([1.0, 1.0])}]
    assert curvature_gram(fisher, taus).tolist() == [[1.0, 1.0], [1.0, 3.0]]
    with pytest.raises(ConfigError, match=r"does not cover the module weights \['v'\]"):
        curvature_gram(fisher, [{"v": torch.zeros(2)}])
    kfac = KFAC({"w": (torch.eye(3), torch.eye(2))}, num_samples=1)
    with pytest.raises(ConfigError, match="needs a DiagonalFisher or a KFAC"):
        curvature_gram("fisher", taus)
    assert curvature_gram(kfac, [{"w": torch.ones(2, 3)}]).item() == 6.0
    backbone, head, theta0, data, _ = _world()
    with pytest.raises(ConfigError, match="'diagonal' or 'kfac'"):
        probe_curvature("hessian", backbone, theta0, head, data)
    gap = jensen_gap(backbone, theta0, _world()[4], data, head, progress=False)
    with pytest.raises(ConfigError, match="no Ω with the 'kfac' curvature"):
        gap.omega_error("kfac")
