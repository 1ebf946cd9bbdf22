"""Model merges against plain float64 re-implementations of each paper's equation (numpy, loops),
their defining properties, and one-line errors that name the bad argument or key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from compolab.errors import CompolabError, ConfigError
from compolab.kfac import KFAC
from compolab.merging import MERGES, merge
from compolab.merging.dare import dare, dare_ties
from compolab.merging.fisher_merging import fisher_merging
from compolab.merging.iso import iso_c
from compolab.merging.kfac_merging import kfac_merging
from compolab.merging.magmax import magmax
from compolab.merging.regmean import regmean
from compolab.merging.task_arithmetic import task_arithmetic
from compolab.merging.ties import ties
from compolab.merging.tsv import tsv_m
from compolab.task_vector import TaskVector, compose, uniform_coefs

SHAPES = {"blocks.0.attn.qkv.weight": (12, 8), "blocks.0.mlp.fc1.bias": (16,), "head.weight": (5, 8)}
MATRICES = [k for k, s in SHAPES.items() if len(s) == 2]
TOL = {"atol": 1e-9, "rtol": 1e-9}


def random_state(seed: int, positive: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}
    return {k: v.abs() for k, v in state.items()} if positive else state


def random_taus(num: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    return [random_state(seed + 100 * t) for t in range(num)]


def random_grams(num: int, seed: int = 7) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    grams = []
    for _ in range(num):
        xs = {k: torch.randn(20, SHAPES[k][1], generator=g, dtype=torch.float64) for k in MATRICES}
        grams.append({k: x.T @ x for k, x in xs.items()})  # G_t = X_t^T X_t
    return grams


def random_spd(n: int, g: torch.Generator, rank: int | None = None) -> torch.Tensor:
    x = torch.randn(n, rank or n + 3, generator=g, dtype=torch.float64)
    return x @ x.T / x.shape[1]


def random_kfacs(num: int, seed: int = 11, rank: int | None = None) -> list[KFAC]:
    """One K-FAC per task over the 2-D keys: A (in, in) and G (out, out) random SPD (PSD with ``rank``)."""
    g = torch.Generator().manual_seed(seed)
    pairs = [{k: (random_spd(SHAPES[k][1], g, rank), random_spd(SHAPES[k][0], g, rank)) for k in MATRICES}
             for _ in range(num)]  # fmt: skip
    return [KFAC(p, num_samples=10) for p in pairs]


def numpy(states: list[dict[str, torch.Tensor]]) -> list[dict[str, np.ndarray]]:
    return [{k: v.numpy().copy() for k, v in s.items()} for s in states]


def assert_matches(merged: dict[str, torch.Tensor], reference: dict[str, np.ndarray]) -> None:
    assert list(merged) == list(SHAPES)
    for k, ref in reference.items():
        assert merged[k].dtype == torch.float64 and merged[k].shape == SHAPES[k]
        assert_close(merged[k], torch.from_numpy(np.asarray(ref, dtype=np.float64)), **TOL)


def flat_keep_mask(tau: dict[str, np.ndarray], density: float) -> dict[str, np.ndarray]:
    """TIES's trimming, written out: the k largest magnitudes of the whole vector survive."""
    values = np.concatenate([tau[k].ravel() for k in SHAPES])
    keep = max(1, int(np.floor(density * values.size + 0.5)))
    threshold = np.sort(np.abs(values))[::-1][keep - 1]
    return {k: np.abs(tau[k]) >= threshold for k in SHAPES}


def disjoint_mean_ref(vals: list[float]) -> float:
    """TIES's merge of one coordinate: elect the sign of the sum, average the tasks that agree."""
    elected = np.sign(sum(vals))
    agree = [v for v in vals if v != 0 and np.sign(v) == elected]
    return sum(agree) / len(agree) if agree else 0.0


def merge_coordinates(taus: list[dict[str, np.ndarray]], fn) -> dict[str, np.ndarray]:
    """Apply ``fn(list of T floats) -> float`` coordinate by coordinate."""
    out = {}
    for k, shape in SHAPES.items():
        columns = list(zip(*[tau[k].ravel().tolist() for tau in taus], strict=True))
        out[k] = np.array([fn(list(c)) for c in columns]).reshape(shape)
    return out


def svd(a: np.ndarray):
    return np.linalg.svd(a, full_matrices=False)


# --------------------------------------------------------------------------- the references


def test_task_arithmetic_matches_the_scaled_sum_and_the_kits_uniform_composition():
    taus = random_taus()
    assert_matches(
        task_arithmetic(taus, scale=0.3), {k: 0.3 * sum(t[k] for t in numpy(taus)) for k in SHAPES}
    )
    theta0 = random_state(99)
    composed = compose(theta0, [TaskVector(t) for t in taus], uniform_coefs(len(taus)))
    assert_matches(task_arithmetic(taus), {k: (composed[k] - theta0[k]).numpy() for k in SHAPES})


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_trim_elect_disjoint_mean(density):
    taus = numpy(random_taus())
    masks = [flat_keep_mask(tau, density) for tau in taus]
    trimmed = [{k: tau[k] * mask[k] for k in SHAPES} for tau, mask in zip(taus, masks, strict=True)]
    reference = merge_coordinates(trimmed, lambda vals: 0.7 * disjoint_mean_ref(vals))
    assert_matches(ties(random_taus(), density=density, scale=0.7), reference)


def dare_reference(taus: list[dict[str, np.ndarray]], p: float, seed: int) -> list[dict[str, np.ndarray]]:
    """The documented mask protocol (one CPU generator, task by task, key by key), rescaled."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for tau in taus:
        masks = {k: (torch.rand(SHAPES[k], generator=g, dtype=torch.float64) >= p).numpy() for k in SHAPES}
        out.append({k: np.where(masks[k], tau[k] / (1 - p), 0.0) for k in SHAPES})
    return out


def test_dare_matches_drop_rescale_then_sum_or_ties():
    dropped = dare_reference(numpy(random_taus()), 0.6, seed=5)
    assert_matches(
        dare(random_taus(), p=0.6, seed=5, scale=0.5), {k: 0.5 * sum(t[k] for t in dropped) for k in SHAPES}
    )
    assert_matches(dare_ties(random_taus(), p=0.6, seed=5), merge_coordinates(dropped, disjoint_mean_ref))


def test_fisher_merging_matches_the_fisher_weighted_average_of_the_weights():
    taus, theta0 = random_taus(), numpy([random_state(99)])[0]
    fishers = [random_state(50 + t, positive=True) for t in range(3)]
    fishers[0]["head.weight"][0, :] = 0.0  # floored
    coefs = [0.5, 1.0, 2.0]
    reference = {}
    for k in SHAPES:
        thetas = [theta0[k] + tau[k] for tau in numpy(taus)]  # theta_t = theta0 + tau_t
        weights = [w * np.maximum(f[k], 1e-6) for w, f in zip(coefs, numpy(fishers), strict=True)]
        reference[k] = sum(f * th for f, th in zip(weights, thetas, strict=True)) / sum(weights) - theta0[k]
    assert_matches(fisher_merging(taus, fishers=fishers, coefs=coefs), reference)


def kfac_reference(taus, kfacs, coefs, damping) -> dict[str, np.ndarray]:
    """The dense minimiser of Σ_t w_t (x - x_t)ᵀ (A_t ⊗ G_t + δ I)(x - x_t), x = vec(W) column-major
    (so that (A ⊗ G) vec(W) = vec(G W A)), δ = damping · tr(Σ_t w_t A_t ⊗ G_t) / n, w summing to 1."""
    w = np.asarray(coefs, dtype=np.float64) / sum(coefs)
    out = {}
    for k in MATRICES:
        n = int(np.prod(SHAPES[k]))
        kron = [np.kron(kf.factors[k][0].numpy(), kf.factors[k][1].numpy()) for kf in kfacs]
        delta = damping * np.trace(sum(wt * m for wt, m in zip(w, kron, strict=True))) / n
        curv = [m + delta * np.eye(n) for m in kron]
        x = [tau[k].numpy().reshape(-1, order="F") for tau in taus]
        lhs = sum(wt * c for wt, c in zip(w, curv, strict=True))
        rhs = sum(wt * c @ xt for wt, c, xt in zip(w, curv, x, strict=True))
        out[k] = np.linalg.solve(lhs, rhs).reshape(SHAPES[k], order="F")
    return out


# rank 2: PSD factors whose null space only the damping fills (at 1e-6 too ill-conditioned for 1e-9)
@pytest.mark.parametrize(("rank", "damping"), [(None, 1e-6), (None, 1e-2), (None, 10.0), (2, 1e-2), (2, 10)])
def test_kfac_merging_matches_the_dense_solve_of_the_kronecker_system(damping, rank):
    taus = [{k: t[k] for k in MATRICES} for t in random_taus()]
    kfacs, coefs = random_kfacs(3, rank=rank), [0.5, 1.0, 2.0]
    merged = kfac_merging(taus, kfacs=kfacs, coefs=coefs, damping=damping, tol=1e-14, max_iter=1000)
    reference = kfac_reference(taus, kfacs, coefs, damping)
    assert list(merged) == MATRICES
    for k in MATRICES:
        assert merged[k].dtype == torch.float64
        assert_close(merged[k], torch.from_numpy(reference[k]), **TOL)
    # float32 in, float32 out, the same solution (computed in float64)
    single = kfac_merging([{k: v.float() for k, v in t.items()} for t in taus], kfacs=kfacs, coefs=coefs,
                          damping=damping, tol=1e-14, max_iter=1000)  # fmt: skip
    for k in MATRICES:
        assert single[k].dtype == torch.float32
        assert_close(single[k].double(), torch.from_numpy(reference[k]), rtol=1e-5, atol=1e-5)


def test_kfac_merging_with_diagonal_factors_is_fisher_merging_of_their_diagonal_plus_the_damping():
    taus = [{k: t[k] for k in MATRICES} for t in random_taus()]
    g = torch.Generator().manual_seed(4)
    kfacs = [KFAC({k: (torch.diag(torch.rand(SHAPES[k][1], generator=g, dtype=torch.float64) + 0.1),
                       torch.diag(torch.rand(SHAPES[k][0], generator=g, dtype=torch.float64) + 0.1))
                   for k in MATRICES}, num_samples=1) for _ in range(3)]  # fmt: skip
    coefs, damping = [1.0, 3.0, 0.5], 0.05
    merged = kfac_merging(taus, kfacs=kfacs, coefs=coefs, damping=damping, tol=1e-14)
    fishers = [{k: torch.outer(kf.factors[k][1].diagonal(), kf.factors[k][0].diagonal()) for k in MATRICES}
               for kf in kfacs]  # fmt: skip
    w = [c / sum(coefs) for c in coefs]
    delta = {k: damping * float(sum(wt * f[k] for wt, f in zip(w, fishers, strict=True)).mean())
             for k in MATRICES}  # δ = damping × the mean entry of Σ_t w_t F_t  # fmt: skip
    expected = fisher_merging(taus, fishers=[{k: f[k] + delta[k] for k in MATRICES} for f in fishers],
                              coefs=coefs)  # fmt: skip
    for k in MATRICES:
        assert_close(merged[k], expected[k], **TOL)
    tiny = kfac_merging(taus, kfacs=kfacs, coefs=coefs, damping=1e-12, tol=1e-14)
    plain = fisher_merging(taus, fishers=fishers, coefs=coefs)  # up to the damping
    for k in MATRICES:
        assert_close(tiny[k], plain[k], atol=1e-9, rtol=1e-9)
        assert float((merged[k] - plain[k]).abs().max()) > 1e-4  # the damping does something


def test_kfac_merging_of_one_task_is_its_vector_and_of_one_curvature_the_weighted_mean():
    taus = [{k: t[k] for k in MATRICES} for t in random_taus()]
    for damping in (1e-8, 1.0):
        (alone,) = [kfac_merging(taus[:1], kfacs=random_kfacs(1, rank=2), damping=damping, tol=1e-14)]
        for k in MATRICES:
            assert_close(alone[k], taus[0][k], **TOL)
    common = random_kfacs(1)[0]
    merged = kfac_merging(taus, kfacs=[common] * 3, coefs=[1.0, 2.0, 1.0], damping=1e-3, tol=1e-14)
    for k in MATRICES:
        assert_close(merged[k], (taus[0][k] + 2 * taus[1][k] + taus[2][k]) / 4, **TOL)
    zero = KFAC({k: (torch.zeros(SHAPES[k][1], SHAPES[k][1]), torch.zeros(SHAPES[k][0], SHAPES[k][0]))
                 for k in MATRICES}, num_samples=1)  # fmt: skip
    flat = kfac_merging(taus, kfacs=[zero] * 3)  # no curvature anywhere: the mean, as Fisher's floor
    for k in MATRICES:
        assert_close(flat[k], sum(t[k] for t in taus) / 3, **TOL)


@pytest.mark.parametrize("alpha", [0.9, 1.0, 0.0])
def test_regmean_matches_the_least_squares_merge_of_the_weights(alpha):
    taus, grams, theta0 = random_taus(), random_grams(3), numpy([random_state(99)])[0]
    grams[0].pop("head.weight")  # no Gram: averaged ...
    grams = [{k: g[k] for k in grams[0]} for g in grams]  # ... for every task
    reference = {}
    for k in SHAPES:
        weights = [theta0[k] + tau[k] for tau in numpy(taus)]  # W_t = theta0 + tau_t
        if k not in grams[0]:
            reference[k] = sum(weights) / len(weights) - theta0[k]
            continue
        shrunk = [alpha * g[k].numpy() + (1 - alpha) * np.diag(np.diag(g[k].numpy())) for g in grams]
        total = sum(w @ g for w, g in zip(weights, shrunk, strict=True))
        reference[k] = total @ np.linalg.inv(sum(shrunk)) - theta0[k]
    assert_matches(regmean(taus, grams=grams, alpha=alpha), reference)


def tsv_reference(taus: list[dict[str, np.ndarray]], k_per_task: dict[str, int], scale: float):
    out = {}
    for key in SHAPES:
        if key not in k_per_task:
            out[key] = scale * sum(t[key] for t in taus) / len(taus)
            continue
        k = k_per_task[key]
        us, sigmas, vs = [], [], []
        for tau in taus:
            u, s, vt = svd(tau[key])
            us.append(u[:, :k]), sigmas.append(s[:k]), vs.append(vt[:k].T)
        p, _, qt = svd(np.hstack(us))
        u_perp = p @ qt  # orthogonal Procrustes
        p, _, qt = svd(np.hstack(vs))
        v_perp = p @ qt
        out[key] = scale * u_perp @ np.diag(np.concatenate(sigmas)) @ v_perp.T
    return out


#: Triplets kept per task: r // T by default (r = 8 and 5, T = 3), else floor(fraction * r).
TSV_K = {
    None: {"blocks.0.attn.qkv.weight": 2, "head.weight": 1},
    0.5: {"blocks.0.attn.qkv.weight": 4, "head.weight": 2},
}


@pytest.mark.parametrize("fraction", [None, 0.5])
def test_tsv_matches_concatenated_orthogonalised_singular_vectors(fraction):
    taus = random_taus()  # r = 8 and 5, T = 3
    assert_matches(
        tsv_m(taus, fraction=fraction, scale=0.8), tsv_reference(numpy(taus), TSV_K[fraction], 0.8)
    )


def test_iso_c_matches_the_flattened_spectrum_of_the_sum():
    taus = numpy(random_taus())
    reference = {}
    for k in SHAPES:
        total = sum(t[k] for t in taus)
        if total.ndim == 2:
            u, s, vt = svd(total)
            reference[k] = 1.5 * s.mean() * u @ vt
        else:
            reference[k] = 1.5 * total / len(taus)
    assert_matches(iso_c(random_taus(), scale=1.5), reference)


def test_magmax_matches_the_max_magnitude_entry():
    reference = merge_coordinates(numpy(random_taus()), lambda vals: 0.5 * max(vals, key=abs))
    assert_matches(magmax(random_taus(), scale=0.5), reference)


# --------------------------------------------------------------------------- properties


def test_ties_with_density_one_and_agreeing_signs_is_the_scaled_mean():
    taus = [random_state(t, positive=True) for t in range(3)]
    merged = ties(taus, density=1.0, scale=2.0)
    for k in SHAPES:
        assert_close(merged[k], 2.0 * sum(t[k] for t in taus) / 3, **TOL)


def test_ties_keeps_round_density_times_d_entries_per_task():
    (tau,) = random_taus(1)
    kept = sum(int((v != 0).sum()) for v in ties([tau], density=0.25).values())
    assert kept == round(0.25 * sum(v.numel() for v in tau.values()))  # 38 of 152


def test_dare_with_p_zero_is_the_sum_and_a_seed_fixes_the_result():
    taus = random_taus()
    for k, v in dare(taus, p=0.0).items():
        assert torch.equal(v, sum(t[k] for t in taus))
    first, again, other = (dare(taus, p=0.5, seed=s) for s in (1, 1, 2))
    assert all(torch.equal(first[k], again[k]) for k in SHAPES)
    assert not all(torch.equal(first[k], other[k]) for k in SHAPES)


def test_dare_is_unbiased_over_seeds():
    taus = random_taus()
    seeds = range(300)
    flat = torch.stack([TaskVector(dare(taus, p=0.5, seed=s)).flatten() for s in seeds]).mean(0)
    total = TaskVector(task_arithmetic(taus, scale=1.0)).flatten()
    assert float((flat - total).norm() / total.norm()) < 0.15  # about 0.06 expected


def test_fisher_merging_with_equal_fishers_is_the_mean():
    taus, fisher = random_taus(), random_state(3, positive=True)
    merged = fisher_merging(taus, fishers=[fisher] * 3)
    for k in SHAPES:
        assert_close(merged[k], sum(t[k] for t in taus) / 3, **TOL)


def test_regmean_with_identical_grams_is_the_mean():
    taus = random_taus()
    merged = regmean(taus, grams=random_grams(1) * 3)
    for k in SHAPES:
        assert_close(merged[k], sum(t[k] for t in taus) / 3, **TOL)


def test_iso_c_has_a_flat_spectrum():
    merged = iso_c(random_taus())
    for k in MATRICES:
        s = torch.linalg.svdvals(merged[k])
        assert_close(s, s.mean().expand_as(s), **TOL)


def test_tsv_of_one_task_at_full_rank_is_the_task_vector():
    (tau,) = random_taus(1)
    merged = tsv_m([tau], fraction=1.0)
    for k in SHAPES:
        assert_close(merged[k], tau[k], **TOL)


def test_magmax_picks_the_largest_magnitude_and_the_later_task_on_a_tie():
    taus = [{"w": torch.tensor([1.0, -5.0, 2.0, 0.0])}, {"w": torch.tensor([-3.0, 4.0, -2.0, 0.0])}]
    assert torch.equal(magmax(taus)["w"], torch.tensor([-3.0, -5.0, -2.0, 0.0]))


def needed(name: str, taus) -> dict:
    stats = {"fishers": [random_state(50 + t, positive=True) for t in range(len(taus))],
             "grams": random_grams(len(taus)), "kfacs": random_kfacs(len(taus))}  # fmt: skip
    return {n: stats[n] for n in MERGES[name].needs}


@pytest.mark.parametrize("name", list(MERGES))
def test_every_merge_keeps_keys_shapes_dtype_and_leaves_its_inputs_alone(name):
    keys = MATRICES if name == "kfac" else list(SHAPES)  # K-FAC covers 2-D weights only
    taus = [{k: t[k].float() for k in keys} for t in random_taus()]
    copies = [{k: v.clone() for k, v in t.items()} for t in taus]
    merged = merge(name, taus, **needed(name, taus))
    assert list(merged) == keys
    assert all(v.shape == SHAPES[k] and v.dtype == torch.float32 for k, v in merged.items())
    assert all(torch.equal(t[k], c[k]) for t, c in zip(taus, copies, strict=True) for k in keys)
    assert all(torch.isfinite(v).all() for v in merged.values())


def test_registry_names_and_needs():
    assert list(MERGES) == ["task-arithmetic", "ties", "dare", "dare-ties", "fisher", "regmean", "kfac",
                            "tsv", "iso-c", "magmax"]  # fmt: skip
    assert {n: m.needs for n, m in MERGES.items() if m.needs} == {"fisher": {"fishers"}, "regmean": {"grams"},
                                                                  "kfac": {"kfacs"}}  # fmt: skip
    taus = random_taus()
    assert_close(
        merge("ties", taus, density=0.5)["head.weight"], ties(taus, density=0.5)["head.weight"], **TOL
    )


# --------------------------------------------------------------------------- errors


def test_unknown_merge_lists_the_known_ones():
    with pytest.raises(
        ConfigError, match=r"`name` 'tie' is not a merge; known merges: task-arithmetic, ties"
    ):
        merge("tie", random_taus())


def test_a_merge_without_its_statistics_names_them():
    with pytest.raises(ConfigError, match="merge 'fisher' needs per-task statistics `fishers`"):
        merge("fisher", random_taus())


@pytest.mark.parametrize("name", list(MERGES))
def test_every_merge_rejects_empty_and_mismatched_task_vectors(name):
    with pytest.raises(ConfigError, match="`taus` is empty"):
        merge(name, [], **needed(name, random_taus()))
    taus = random_taus(2)
    del taus[1]["head.weight"]
    with pytest.raises(
        ConfigError, match=r"`taus`: task 1 does not match task 0: missing keys \['head.weight'\]"
    ):
        merge(name, taus, **needed(name, random_taus(2)))
    taus = random_taus(2)
    taus[1]["head.weight"] = torch.zeros(5, 7, dtype=torch.float64)
    with pytest.raises(ConfigError, match=r"mismatched shapes \['head.weight \(5, 8\) vs \(5, 7\)'\]"):
        merge(name, taus, **needed(name, random_taus(2)))
    taus = random_taus(2)
    taus[1]["head.weight"] = taus[1]["head.weight"].float()
    with pytest.raises(ConfigError, match="mismatched dtypes"):
        merge(name, taus, **needed(name, random_taus(2)))


@pytest.mark.parametrize(("fn", "kwargs", "message"), [
    (ties, {"density": 0.0}, r"`density` must be in \(0, 1\], got 0.0"),
    (ties, {"density": 1.5}, r"`density` must be in \(0, 1\], got 1.5"),
    (dare, {"p": 1.0}, r"`p` must be in \[0, 1\), got 1.0"),
    (dare, {"p": -0.1}, r"`p` must be in \[0, 1\), got -0.1"),
    (dare_ties, {"density": float("nan")}, r"`density` must be in \(0, 1\], got nan"),
    (tsv_m, {"fraction": 0.0}, r"`fraction` must be in \(0, 1\]"),
])  # fmt: skip
def test_hyper_parameters_out_of_range_are_named(fn, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        fn(random_taus(), **kwargs)


def test_fisher_errors_name_the_task_and_the_key():
    taus = random_taus(2)
    fishers = [random_state(1, positive=True), random_state(2, positive=True)]
    del fishers[1]["blocks.0.mlp.fc1.bias"]
    with pytest.raises(
        ConfigError, match=r"`fishers`: the Fisher of task 1 lacks \['blocks.0.mlp.fc1.bias'\]"
    ):
        fisher_merging(taus, fishers=fishers)
    with pytest.raises(ConfigError, match="`fishers` has 1 entries, expected one per task vector"):
        fisher_merging(taus, fishers=fishers[:1])
    fishers = [random_state(1, positive=True), {k: -v for k, v in random_state(2, positive=True).items()}]
    with pytest.raises(ConfigError, match="task 1 has negative entries"):
        fisher_merging(taus, fishers=fishers)
    fishers = [random_state(1, positive=True)] * 2
    with pytest.raises(ConfigError, match="`coefs` must be in"):
        fisher_merging(taus, fishers=fishers, coefs=[1.0, 0.0])
    with pytest.raises(ConfigError, match="`floor` must be in"):
        fisher_merging(taus, fishers=fishers, floor=0.0)


def test_gram_errors_name_the_key():
    taus = random_taus(2)
    grams = random_grams(2)
    grams[1]["head.weight"] = torch.eye(5, dtype=torch.float64)
    grams[0]["head.weight"] = torch.eye(5, dtype=torch.float64)
    with pytest.raises(ConfigError, match=r"the Gram of 'head.weight' has shape \(5, 5\), expected \(8, 8\)"):
        regmean(taus, grams=grams)
    grams = random_grams(2)
    del grams[1]["head.weight"]
    with pytest.raises(
        ConfigError, match=r"`grams`: task 1 does not match task 0: missing keys \['head.weight'\]"
    ):
        regmean(taus, grams=grams)
    grams = [{"blocks.0.mlp.fc1.bias": torch.eye(16, dtype=torch.float64)}] * 2
    with pytest.raises(ConfigError, match="Gram for 'blocks.0.mlp.fc1.bias', which is not a 2-D weight"):
        regmean(taus, grams=grams)
    with pytest.raises(ConfigError, match=r"`alpha` must be in \[0, 1\]"):
        regmean(taus, grams=random_grams(2), alpha=1.1)
    zeros = [{k: torch.zeros_like(g) for k, g in random_grams(1)[0].items()}] * 2
    with pytest.raises(ConfigError, match="summed Grams of 'blocks.0.attn.qkv.weight' are singular"):
        regmean(taus, grams=zeros)


def test_kfac_errors_name_the_task_and_the_key():
    taus = [{k: t[k] for k in MATRICES} for t in random_taus(2)]
    kfacs = random_kfacs(2)
    with pytest.raises(ConfigError, match=r"task 0 has no factors for \['blocks.0.mlp.fc1.bias'\] \(K-FAC"):
        kfac_merging(random_taus(2), kfacs=kfacs)  # a bias: no factors
    fewer = KFAC({"head.weight": kfacs[1].factors["head.weight"]}, num_samples=1)
    with pytest.raises(ConfigError, match=r"of task 1 has no factors for \['blocks.0.attn.qkv.weight'\]"):
        kfac_merging(taus, kfacs=[kfacs[0], fewer])
    swapped = KFAC({k: kfacs[1].factors[k][::-1] for k in MATRICES}, num_samples=1)  # (G, A): wrong sides
    fit = r"factors of task 1 do not fit .*blocks.0.attn.qkv.weight \(12, 8\) vs \(G, A\) \(8, 12\)"
    with pytest.raises(ConfigError, match=fit):
        kfac_merging(taus, kfacs=[kfacs[0], swapped])
    with pytest.raises(ConfigError, match="`kfacs` has 1 entries, expected one per task vector"):
        kfac_merging(taus, kfacs=kfacs[:1])
    with pytest.raises(ConfigError, match="`kfacs`: entry 1 is a dict, not a KFAC"):
        kfac_merging(taus, kfacs=[kfacs[0], {k: (torch.eye(1), torch.eye(1)) for k in MATRICES}])
    skew = {k: (a + torch.triu(torch.ones_like(a), 1), g) for k, (a, g) in kfacs[1].factors.items()}
    bad = r"task 1 are not finite, symmetric .* \['blocks.0.attn.qkv.weight', 'head.weight'\]"
    with pytest.raises(ConfigError, match=bad):
        kfac_merging(taus, kfacs=[kfacs[0], KFAC(skew, num_samples=1)])
    nan = {k: (a, g * float("nan")) for k, (a, g) in kfacs[1].factors.items()}
    with pytest.raises(ConfigError, match="task 1 are not finite"):
        kfac_merging(taus, kfacs=[kfacs[0], KFAC(nan, num_samples=1)])
    for kwargs, message in [({"coefs": [1.0, 0.0]}, "`coefs` must be in"),
                            ({"damping": 0.0}, "`damping` must be"), ({"tol": -1.0}, "`tol` must be"),
                            ({"max_iter": 0}, "`max_iter` must be an integer"),
                            ({"max_iter": 2.5}, "`max_iter` must be an integer")]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            kfac_merging(taus, kfacs=kfacs, **kwargs)


def test_kfac_merging_says_when_conjugate_gradients_stop_short():
    taus = [{k: t[k] for k in MATRICES} for t in random_taus(3)]
    with pytest.raises(CompolabError) as e:
        kfac_merging(taus, kfacs=random_kfacs(3), damping=1e-6, tol=1e-15, max_iter=1)
    message = str(e.value)
    assert "\n" not in message and "'blocks.0.attn.qkv.weight' in 1 iterations" in message
    assert "raise `max_iter` or `damping`" in message
