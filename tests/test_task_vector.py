"""TaskVector algebra (hypothesis properties, float64), constructors, apply_to and compose."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from compolab.errors import ConfigError
from compolab.task_vector import TaskVector, compose

NAMES = ("blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.bias", "head.weight")
shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)
layouts = st.dictionaries(st.sampled_from(NAMES), shapes, min_size=1)
values = st.floats(-100, 100, allow_nan=False, allow_infinity=False)


@st.composite
def task_vectors(draw: st.DrawFn, layout: dict[str, tuple[int, ...]]) -> TaskVector:
    tensors = {}
    for name, shape in layout.items():
        n = int(torch.Size(shape).numel())
        flat = draw(st.lists(values, min_size=n, max_size=n))
        tensors[name] = torch.tensor(flat, dtype=torch.float64).reshape(shape)
    return TaskVector(tensors)


@st.composite
def same_layout(draw: st.DrawFn, count: int) -> list[TaskVector]:
    layout = draw(layouts)
    return [draw(task_vectors(layout)) for _ in range(count)]


def close(a: TaskVector, b: TaskVector) -> bool:
    return a.allclose(b, rtol=1e-10, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(same_layout(2))
def test_addition_commutes_and_subtraction_undoes_it(pair):
    t1, t2 = pair
    assert t1 + t2 == t2 + t1
    assert close((t1 + t2) - t2, t1)


@settings(max_examples=60, deadline=None)
@given(same_layout(1))
def test_scalar_laws(single):
    (t,) = single
    minus_t = -t
    assert -minus_t == t
    assert 2 * t == t * 2 == t + t
    assert sum([t]) == t
    assert t / 2 == 0.5 * t
    assert close(t - t, TaskVector.zeros_like(t))


@settings(max_examples=60, deadline=None)
@given(same_layout(2))
def test_dot_is_symmetric_and_squares_the_norm(pair):
    t1, t2 = pair
    torch.testing.assert_close(t1.dot(t2), t2.dot(t1))
    torch.testing.assert_close(t1.dot(t1), t1.norm() ** 2, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(t1.dot(t2), t1.flatten() @ t2.flatten())


@settings(max_examples=40, deadline=None)
@given(same_layout(3))
def test_fisher_weighted_norm_matches_the_closed_form(triple):
    t, other, f = triple
    fisher = f.map(torch.abs)
    expected = sum(float((fisher[k] * t[k] ** 2).sum()) for k in t)
    torch.testing.assert_close(float(t.weighted_norm(fisher)) ** 2, expected, rtol=1e-9, atol=1e-8)
    torch.testing.assert_close(t.fisher_dot(other, fisher), other.fisher_dot(t, fisher))
    ones = t.map(torch.ones_like)
    torch.testing.assert_close(t.weighted_norm(ones), t.norm())


def test_no_hadamard_and_no_scalar_addition():
    t = TaskVector({"w": torch.ones(2)})
    with pytest.raises(TypeError):
        t * t  # noqa: B018
    with pytest.raises(TypeError):
        t + 1.0  # noqa: B018
    assert (torch.tensor(3.0) * t) == t * 3


def test_norm_has_zero_gradient_at_zero():
    w = torch.zeros(3, requires_grad=True)
    TaskVector({"w": w}).norm().backward()
    assert torch.equal(w.grad, torch.zeros(3))


def test_mismatched_keys_raise_listing_missing_and_extra():
    t1 = TaskVector({"a": torch.ones(2), "b": torch.ones(2)})
    t2 = TaskVector({"a": torch.ones(2), "c": torch.ones(2)})
    with pytest.raises(ConfigError, match=r"missing keys \['b'\].*extra keys \['c'\]"):
        t1 + t2  # noqa: B018
    with pytest.raises(ConfigError, match="missing keys"):
        t1.dot(t2)
    t3 = TaskVector({"a": torch.ones(3), "b": torch.ones(2)})
    with pytest.raises(ConfigError, match=r"mismatched shapes \['a \(2,\) vs \(3,\)'\]"):
        t1 - t3  # noqa: B018
    assert not t1.allclose(t2)


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()


def perturbed(model: nn.Module) -> nn.Module:
    ft = tiny_model()
    ft.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(torch.randn_like(p))
    return ft


def test_apply_with_zero_coef_is_the_identity():
    pre = tiny_model()
    tau = TaskVector.from_models(pre, perturbed(pre))
    same = tau.apply_to(pre, 0.0)
    assert same is not pre
    for (name, p), q in zip(pre.state_dict().items(), same.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_task_vector_apply_roundtrip_recovers_finetuned():
    pre = tiny_model()
    ft = perturbed(pre)
    tau = TaskVector.from_models(pre, ft)
    assert "1.num_batches_tracked" not in tau  # integer buffers are skipped
    assert "1.running_mean" in tau
    back = tau.apply_to(pre)
    for name, p in ft.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], p, rtol=0, atol=1e-12)
    unlearned = (-tau).apply_to(back)
    assert TaskVector.from_models(pre, unlearned).allclose(TaskVector.zeros_like(pre), atol=1e-12)


def test_from_models_with_names_and_errors():
    pre = tiny_model()
    tau = TaskVector.from_models(pre, perturbed(pre), names=["0.weight"])
    assert list(tau) == ["0.weight"] and tau.numel() == 12
    with pytest.raises(ConfigError, match="nope"):
        TaskVector.from_models(pre, pre, names=["nope"])
    bigger = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)).double()
    with pytest.raises(ConfigError, match="mismatched shapes"):
        TaskVector.from_models(pre, bigger)
    with pytest.raises(ConfigError, match=r"missing keys \['ghost'\]"):
        TaskVector({"ghost": torch.ones(1)}).apply_to(pre)


def test_compose_matches_an_explicit_loop():
    theta0 = {"w": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)}
    taus = [TaskVector({"w": torch.randn(3, 2, dtype=torch.float64)}) for _ in range(3)]
    coefs = [0.5, -0.25, 2.0]
    params = compose(theta0, taus, coefs)
    expected = theta0["w"].clone()
    for tau, w in zip(taus, coefs, strict=True):
        expected += w * tau["w"]
    torch.testing.assert_close(params["w"], expected)
    assert params["b"] is theta0["b"]
    default = compose(theta0, taus)  # 1/T each
    torch.testing.assert_close(default["w"], theta0["w"] + sum(taus)["w"] / 3)
    assert all(compose(theta0, [])[k] is t for k, t in theta0.items())


def test_compose_rejects_wrong_coefs_and_unknown_names():
    theta0 = {"w": torch.zeros(2)}
    taus = [TaskVector({"w": torch.ones(2)})] * 2
    with pytest.raises(ConfigError, match="expected 2 coefs .* got 3"):
        compose(theta0, taus, [0.1, 0.2, 0.3])
    with pytest.raises(ConfigError, match=r"taus\[0\] does not fit theta0: missing keys \['v'\]"):
        compose(theta0, [TaskVector({"v": torch.ones(2)})])


def test_values_must_be_tensors_and_mapping_is_read_only():
    with pytest.raises(ConfigError, match="not tensors: \\['a'\\]"):
        TaskVector({"a": 1.0})  # type: ignore[dict-item]
    t = TaskVector({"a": torch.ones(1)})
    with pytest.raises(TypeError):
        t["a"] = torch.zeros(1)  # type: ignore[index]
    assert t.to(torch.float64)["a"].dtype == torch.float64 and len(t) == 1
    assert "1 tensors" in repr(t)
