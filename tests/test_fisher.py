"""The diagonal Fisher: exact against a brute-force reference (float64), approximations, values, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from reference import fisher_reference
from reference_fisher import official_loop_fisher
from torch import nn

from compolab.errors import CompolabError, ConfigError
from compolab.fisher import PAPER_FISHER_FLOOR, DiagonalFisher, FisherAccumulator, diagonal_fisher
from compolab.heads import IncrementalHead, new_head
from compolab.models import BackboneSpec, make_backbone, tuned_weight_names

TIGHT = {"rtol": 1e-10, "atol": 1e-14}
# Not the conv stem: float64 convolutions are slow on CPU, and the reference would backprop through them.
VIT_EXTRA = ["norm.weight", "blocks.0.norm1.bias", "cls_token", "pos_embed"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny float64 models: with 2 threads on a shared 2-core machine, ops ran ~40x slower (contention).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _head(widths: list[int], in_features: int, classes=None) -> IncrementalHead:
    heads = [new_head(in_features, w) for w in widths]
    with torch.no_grad():  # a peaked softmax, so that the classes do not all weigh the same
        for h in heads:
            h.weight.normal_()
            h.bias.normal_()
    return IncrementalHead(heads, classes=classes).double()


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(1)
    backbone = make_backbone(BackboneSpec(embed_dim=16, depth=2, num_heads=2)).double()
    head = _head([3, 4], 16, classes=[[10, 11, 12], [20, 21, 22, 23]])
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([10, 23, 21, 12, 20])
    own = dict(backbone.named_parameters())
    params = {n: own[n] for n in tuned_weight_names(backbone) + VIT_EXTRA + ["blocks.1.mlp.fc1.bias"]}
    params |= {f"head.{n}": p for n, p in head.named_parameters()}
    reference = fisher_reference(lambda z: head(backbone(z)), params, x)
    return backbone, head, [(x[:3], y[:3]), (x[3:], y[3:])], reference


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(2)
    backbone = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 8), nn.GELU()).double()
    head = _head([3, 2], 8)
    x = torch.randn(7, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    params = {**dict(backbone.named_parameters()), **{f"head.{n}": p for n, p in head.named_parameters()}}
    reference = fisher_reference(lambda z: head(backbone(z)), params, x)
    return backbone, head, [(x[:4], y[:4]), (x[4:], y[4:])], reference


def _assert_matches(fisher: DiagonalFisher, reference: dict[str, torch.Tensor], **tol) -> None:
    for name, value in fisher.values.items():
        torch.testing.assert_close(value, reference[name], **(tol or TIGHT), msg=name)


@pytest.mark.parametrize(
    ("include_head", "contraction", "class_chunk"),
    [(False, "auto", None), (True, "gram", 2), (True, "direct", None), (False, "gram", 1)],
)
def test_exact_fisher_of_vit_equals_reference(vit, include_head, contraction, class_chunk):
    backbone, head, loader, reference = vit
    fisher = diagonal_fisher(
        backbone, head, loader, include_head=include_head, contraction=contraction, class_chunk=class_chunk
    )
    head_names = ["head." + n for n, _ in head.named_parameters()]
    expected = tuned_weight_names(backbone) + head_names * include_head
    assert list(fisher.values) == expected and fisher.num_samples == 5
    _assert_matches(fisher, reference)


def test_exact_fisher_of_non_linear_parameters_equals_reference(vit):
    backbone, head, loader, reference = vit
    fisher = diagonal_fisher(backbone, head, loader, names=VIT_EXTRA + ["blocks.1.mlp.fc1.bias"])
    _assert_matches(fisher, reference)


@pytest.mark.parametrize("class_chunk", [None, 2])
def test_exact_fisher_of_mlp_equals_reference(mlp, class_chunk):
    backbone, head, loader, reference = mlp
    names = ["0.weight", "0.bias", "2.weight"]
    fisher = diagonal_fisher(backbone, head, loader, names=names, include_head=True, class_chunk=class_chunk)
    _assert_matches(fisher, reference)
    assert list(diagonal_fisher(backbone, head, loader).values) == ["0.weight", "2.weight"]


@pytest.mark.parametrize("model", ["vit", "mlp"])
def test_exact_fisher_equals_the_official_per_class_loop(model, request):
    """On tokens (ViT) and on flat inputs (MLP): the kit's batched Fisher is the official hooked loop's,
    and that loop computes the brute-force reference's quantity."""
    backbone, head, loader, reference = request.getfixturevalue(model)
    x = torch.cat([batch[0] for batch in loader])
    names = tuned_weight_names(backbone) if model == "vit" else ["0.weight", "2.weight"]  # the MLP's Linears
    official = official_loop_fisher(backbone, head, x, names)
    assert list(official) == names
    _assert_matches(diagonal_fisher(backbone, head, loader, names=names), official)
    for name in names:
        torch.testing.assert_close(official[name], reference[name], **TIGHT, msg=name)


class _SharedLinear(nn.Module):
    """Calls one Linear twice (weight sharing) with an in-place ReLU in between."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu_(self.fc(x)) + x)


def test_shared_linear_and_in_place_activations_are_handled():
    torch.manual_seed(4)
    backbone, head = _SharedLinear().double(), _head([3], 4)
    x = torch.randn(6, 4, dtype=torch.float64)
    params = {**dict(backbone.named_parameters()), **{f"head.{n}": p for n, p in head.named_parameters()}}
    reference = fisher_reference(lambda z: head(backbone(z)), params, x)
    _assert_matches(diagonal_fisher(backbone, head, [x], names=["fc.weight", "fc.bias"]), reference)


def test_empirical_fisher_equals_reference_at_true_labels(vit):
    backbone, head, loader, _ = vit
    x, y = torch.cat([b[0] for b in loader]), torch.cat([b[1] for b in loader])
    columns = torch.tensor([head.global_labels.tolist().index(int(label)) for label in y])
    params = {**dict(backbone.named_parameters()), **{f"head.{n}": p for n, p in head.named_parameters()}}
    reference = fisher_reference(lambda z: head(backbone(z)), params, x, labels=columns)
    fisher = diagonal_fisher(backbone, head, loader, kind="empirical", include_head=True)
    _assert_matches(fisher, reference)


def test_top_k_keeps_the_most_frequent_top_classes_and_all_classes_is_exact(vit):
    backbone, head, loader, reference = vit
    x = loader[0][0]
    exact = diagonal_fisher(backbone, head, [x])
    _assert_matches(diagonal_fisher(backbone, head, [x], top_k=7), exact.values)
    # the official rule, written out: count how often each class is among a sample's top-2, keep 2
    with torch.no_grad():
        top = head(backbone(x)).topk(2, dim=1).indices.flatten().tolist()
    counts = [top.count(c) for c in range(7)]
    kept = sorted(range(7), key=lambda c: (-counts[c], c))[:2]
    params = dict(backbone.named_parameters())
    names = tuned_weight_names(backbone)
    expected = fisher_reference(lambda z: head(backbone(z)), {n: params[n] for n in names}, x, classes=kept)
    _assert_matches(diagonal_fisher(backbone, head, [x], top_k=2), expected)


def test_monte_carlo_fisher_converges_to_the_exact_one(mlp):
    backbone, head, loader, _ = mlp
    exact = diagonal_fisher(backbone, head, loader).values

    def rel_err(k: int) -> float:
        gen = torch.Generator().manual_seed(0)
        mc = diagonal_fisher(backbone, head, loader, kind="mc", mc_samples=k, generator=gen).values
        return float(sum((mc[n] - exact[n]).norm() ** 2 for n in exact) ** 0.5 / sum(
            exact[n].norm() ** 2 for n in exact) ** 0.5)

    errors = [rel_err(k) for k in (4, 64, 4096)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05


def test_fisher_at_given_params_equals_fisher_of_model_with_those_weights(vit):
    backbone, head, loader, _ = vit
    gen = torch.Generator().manual_seed(3)
    shifted = {n: p.detach() + 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
               for n, p in backbone.named_parameters()}
    shifted |= {f"head.{n}": p.detach() + 0.1 for n, p in head.named_parameters()}
    moved_backbone, moved_head = copy.deepcopy(backbone), copy.deepcopy(head)
    moved_backbone.load_state_dict({n: shifted[n] for n, _ in backbone.named_parameters()}, strict=False)
    moved_head.load_state_dict({n: shifted[f"head.{n}"] for n, _ in head.named_parameters()}, strict=False)
    names = tuned_weight_names(backbone) + ["norm.weight"]
    at_params = diagonal_fisher(backbone, head, loader, names=names, include_head=True, params=shifted)
    moved = diagonal_fisher(moved_backbone, moved_head, loader, names=names, include_head=True)
    _assert_matches(at_params, moved.values)
    assert not torch.allclose(at_params["norm.weight"], diagonal_fisher(backbone, head, loader, names=names)[
        "norm.weight"])


def test_diagonal_fisher_adds_means_and_measures_quadratic_forms():
    f = DiagonalFisher({"w": torch.tensor([2.0, 4.0]), "b": torch.tensor([1.0])}, num_samples=2)
    g = DiagonalFisher({"w": torch.tensor([4.0, 0.0]), "b": torch.tensor([3.0])}, num_samples=2)
    total = sum([f, g])
    assert total.num_samples == 4
    torch.testing.assert_close(total.mean()["w"], torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(f.mean(floor=PAPER_FISHER_FLOOR)["b"], torch.tensor([0.5 + 1e-5]))
    delta = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([2.0])}
    assert float(f.quadratic(delta)) == pytest.approx(1 * 1 + 2 * 4 + 0.5 * 4)
    with pytest.raises(ConfigError, match="missing keys \\['b'\\]"):
        f.quadratic({"w": delta["w"]})
    assert float(f.quadratic({**delta, "extra": torch.ones(1)}, strict=False)) == pytest.approx(11.0)


def test_adding_fishers_with_different_keys_lists_them():
    f = DiagonalFisher({"w": torch.ones(2), "b": torch.ones(1)}, 1)
    g = DiagonalFisher({"w": torch.ones(2), "c": torch.ones(1)}, 1)
    with pytest.raises(ConfigError, match="missing keys \\['b'\\]; extra keys \\['c'\\]"):
        f + g


def test_diagonal_fisher_save_load_roundtrip(tmp_path):
    f = DiagonalFisher({"blocks.0.attn.qkv.weight": torch.rand(3, 2, dtype=torch.float64)}, 17)
    path = tmp_path / "fisher.safetensors"
    f.save(path)
    g = DiagonalFisher.load(path)
    assert g.num_samples == 17 and list(tmp_path.iterdir()) == [path]
    assert torch.equal(g["blocks.0.attn.qkv.weight"], f["blocks.0.attn.qkv.weight"])
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(CompolabError, match="cannot read a Fisher"):
        DiagonalFisher.load(path)


@pytest.mark.parametrize("official", [False, True])
def test_accumulator_normalises_as_ita_and_iel(official):
    prior = 1e-5
    acc = FisherAccumulator(prior=prior, official_bookkeeping=official)
    tasks = [(2.0, 2), (6.0, 3), (10.0, 5)]  # (summed Fisher f_t, samples n_t)
    for t, (f, n) in enumerate(tasks):
        acc.add_task(DiagonalFisher({"w": torch.tensor([f], dtype=torch.float64)}, n))
        ita, iel = float(acc.ita(t)["w"]), float(acc.iel(t)["w"])
        f_prev = sum(f for f, _ in tasks[:t])
        n_prev = {0: 0, 1: 2, 2: (2 + 2) if official else (2 + 3)}[t]  # official: n_0 counted twice
        assert acc.num_previous() == n_prev
        assert ita == pytest.approx(prior if t == 0 else (prior + f_prev) / n_prev, rel=1e-12)
        f_all, n_all = f_prev + tasks[t][0], sum(n for _, n in tasks[: t + 1])
        assert iel == pytest.approx(prior + f_all / n_all, rel=1e-12)
    with pytest.raises(ConfigError, match="at task 2"):
        acc.ita(1)
    with pytest.raises(ConfigError, match="extra keys"):
        acc.add_task(DiagonalFisher({"w": torch.ones(1), "v": torch.ones(1)}, 1))
    with pytest.raises(ConfigError, match="add_task"):
        FisherAccumulator().iel()


class _NaNModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * float("nan")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loader": []}, "no samples"),
        ({"names": ["blocks.9.attn.qkv.weight"]}, "not among the backbone's parameters"),
        ({"kind": "hessian"}, "kind must be one of"),
        ({"kind": "mc", "top_k": 2}, "top_k only applies"),
        ({"mc_samples": 0, "kind": "mc"}, ">= 1"),
        ({"loader": [torch.randn(2, 6, dtype=torch.float64)], "kind": "empirical"}, "needs labels"),
        ({"params": {"nope": torch.zeros(1)}}, "not a parameter"),
        ({"contraction": "fast"}, "contraction must be one of"),
    ],
)
def test_bad_arguments_raise_config_errors(mlp, kwargs, message):
    backbone, head, loader, _ = mlp
    kwargs = {"loader": loader, **kwargs}
    with pytest.raises(ConfigError, match=message):
        diagonal_fisher(backbone, head, **kwargs)


def test_non_finite_logits_raise_instead_of_returning_nan():
    with pytest.raises(ConfigError, match="non-finite logits"):
        diagonal_fisher(_NaNModel(), None, [torch.randn(4, 3)], names=["fc.weight"])
