"""Basin probes: endpoints equal direct evaluations, a quadratic toy loss is predicted exactly, the
second-order terms match finite differences on a ViT (float64), and the CLI checks its input first."""

import ast
import copy
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jvp
from torch.testing import assert_close

from compolab.cli import main
from compolab.errors import ConfigError
from compolab.fisher_store import DiagonalFisher
from compolab.methods import METHODS
from compolab.models import theta0_of, tuned_weight_names
from compolab.probes import (
    Interpolation,
    JensenGap,
    Plane,
    ProbeData,
    SecondOrder,
    composed_path,
    default_lambdas,
    evaluate_points,
    filter_normalized_direction,
    interpolate,
    jensen_gap,
    plane,
    second_order,
    segment,
)
from compolab.task_vector import TaskVector


def _tau(theta0, seed, scale=0.2):
    gen = torch.Generator().manual_seed(seed)
    return TaskVector(
        {n: scale * torch.randn(t.shape, generator=gen, dtype=t.dtype) for n, t in theta0.items()}
    )


@pytest.fixture(scope="module")
def vit(backbone, bench):
    """A float64 copy of the small ViT, its tuned θ0, a 9-class head and 8 probe images per task."""
    model = copy.deepcopy(backbone).double().eval()
    theta0 = theta0_of(model, tuned_weight_names(model))
    torch.manual_seed(1)
    head = nn.Linear(16, bench.num_classes).double().requires_grad_(False)
    data = ProbeData.from_benchmark(bench, list(range(bench.num_classes)), per_task=8)
    data = ProbeData({t: x.double() for t, x in data.x.items()}, data.y)
    return model, theta0, head, data


def _direct(model, theta0, delta, head, data):
    """Per-task mean cross-entropy and accuracy of θ0 + delta, by merging the weights into a copy."""
    merged = TaskVector(dict(delta)).apply_to(model, 1.0)
    losses, accs = [], []
    with torch.no_grad():
        for t in data.tasks:
            out = head(merged(data.x[t]))
            losses.append(F.cross_entropy(out, data.y[t]).item())
            accs.append(100.0 * (out.argmax(1) == data.y[t]).double().mean().item())
    return losses, accs


# --------------------------------------------------------------------------- endpoints


def test_interpolation_endpoints_equal_direct_evaluations(vit):
    model, theta0, head, data = vit
    tau = _tau(theta0, 0)
    curve = interpolate(model, theta0, tau, data, head, [-0.5, 0.0, 1.0, 2.0], own=[0], progress=False)
    for i, lam in enumerate(curve.lambdas):
        loss, acc = _direct(model, theta0, lam * tau, head, data)
        assert_close([curve.loss[t][i] for t in data.tasks], loss, rtol=1e-10, atol=1e-12)
        assert [curve.accuracy[t][i] for t in data.tasks] == pytest.approx(acc)
    assert curve.groups() == {"own task": [0], "other tasks": [1, 2]}


def test_plane_corners_and_composed_path_equal_direct_evaluations(vit):
    model, theta0, head, data = vit
    u, v = _tau(theta0, 1), _tau(theta0, 2)
    grid = plane(model, theta0, u, v, data, head, span=(-1.0, 1.0), steps=3, progress=False)
    assert grid.a == [-1.0, 0.0, 1.0] and grid.marks["composed"] == (0.5, 0.5)
    for a, b in [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 1.0)]:
        loss, acc = _direct(model, theta0, a * u + b * v, head, data)
        assert grid.value(a, b) == pytest.approx(sum(loss) / len(loss), rel=1e-10)
        assert grid.value(a, b, "accuracy") == pytest.approx(sum(acc) / len(acc))
    path = composed_path(model, theta0, [u, v], data, head, [1.0], progress=False)
    loss, _ = _direct(model, theta0, (u + v) / 2, head, data)
    assert path.mean()[0] == pytest.approx(sum(loss) / len(loss), rel=1e-10)
    seg = segment(model, theta0, u, (u + v) / 2, data, head, [0.0, 0.5, 1.0], progress=False)
    for i, delta in enumerate([u, 0.75 * u + 0.25 * v, (u + v) / 2]):
        loss, _ = _direct(model, theta0, delta, head, data)
        assert seg.mean()[i] == pytest.approx(sum(loss) / len(loss), rel=1e-10)


def test_chunking_does_not_change_the_values(vit):
    model, theta0, head, data = vit
    directions = [_tau(theta0, 3), _tau(theta0, 4)]
    coefs = torch.randn(7, 2, dtype=torch.float64)
    one = evaluate_points(model, theta0, directions, coefs, data, head, chunk=1, batch_size=5, progress=False)
    many = evaluate_points(model, theta0, directions, coefs, data, head, chunk=7, progress=False)
    assert_close(one, many, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- second order


def _toy():
    """A linear model with a squared-error criterion: the loss is exactly quadratic in the weights."""
    torch.manual_seed(0)
    net = nn.Linear(4, 3).double()
    theta0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    gen = torch.Generator().manual_seed(5)
    data = ProbeData({0: torch.randn(10, 4, generator=gen, dtype=torch.float64),
                      1: torch.randn(6, 4, generator=gen, dtype=torch.float64)},
                     {0: torch.randn(10, 3, generator=gen, dtype=torch.float64),
                      1: torch.randn(6, 3, generator=gen, dtype=torch.float64)})  # fmt: skip
    return net, theta0, data, lambda out, y: ((out - y) ** 2).sum(-1)


@pytest.mark.parametrize("curvature", ["fisher", "hessian"])
def test_quadratic_toy_prediction_equals_measurement(curvature):
    net, theta0, data, sq = _toy()
    tau = _tau(theta0, 6, scale=1.0)
    lams = default_lambdas(-3.0, 3.0, 13)
    curve = interpolate(net, theta0, tau, data, nn.Identity(), lams, criterion=sq, progress=False)
    pred = second_order(
        net, theta0, tau, data, nn.Identity(), curvature=curvature, criterion=sq, progress=False
    )
    for t in data.tasks:
        assert_close(pred.predict(lams, [t]), curve.loss[t], rtol=1e-10, atol=1e-10)
    assert all(math.isnan(a) for a in curve.accuracy[0])  # float targets: no accuracy


def test_quadratic_toy_jensen_gap_equals_omega():
    net, theta0, data, sq = _toy()
    taus = [_tau(theta0, s, scale=1.0) for s in (7, 8, 9)]
    gap = jensen_gap(net, theta0, taus, data, nn.Identity(), criterion=sq, progress=False)
    assert gap.sizes == [1, 2, 3] and gap.measured[0] == pytest.approx(0.0, abs=1e-12)
    assert_close(gap.measured, gap.omega, rtol=1e-10, atol=1e-10)
    assert all(m > 0 for m in gap.measured[1:])  # convex: Jensen


def test_second_order_terms_match_finite_differences_on_a_vit(vit):
    """φ(λ) = ℓ(θ0 + λτ): slope = φ'(0) and the Hessian term = φ''(0) (central differences, float64).
    Guards the forward-over-reverse second derivative: forward-over-forward through layer_norm is
    wrong in torch 2.15."""
    model, theta0, head, data = vit
    tau = _tau(theta0, 10, scale=0.1)
    eps = 1e-4
    curve = interpolate(model, theta0, tau, data, head, [-eps, 0.0, eps], progress=False)
    hess = second_order(model, theta0, tau, data, head, curvature="hessian", progress=False)
    fisher = second_order(model, theta0, tau, data, head, curvature="fisher", progress=False)
    for t in data.tasks:
        lo, mid, hi = curve.loss[t]
        assert hess.loss0[t] == pytest.approx(mid, rel=1e-10) and fisher.slope[t] == pytest.approx(
            hess.slope[t]
        )
        assert hess.slope[t] == pytest.approx((hi - lo) / (2 * eps), rel=1e-6)
        assert hess.curvature[t] == pytest.approx((hi - 2 * mid + lo) / eps**2, rel=1e-3)
        assert fisher.curvature[t] > 0  # the Fisher is positive semi-definite; the Hessian need not be


def test_forward_over_forward_layer_norm_is_why_we_use_forward_over_reverse():
    """Documents the torch bug the probes avoid: if this starts failing, both modes agree again."""
    torch.manual_seed(0)
    z, v, w = (torch.randn(4, 5, dtype=torch.float64) for _ in range(3))
    f = lambda s: (F.layer_norm(z + s * v, (5,)) * w).sum()  # noqa: E731
    s, one = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
    fwd_rev = jvp(grad(f), (s,), (one,))[1]
    eps = 1e-4
    fd = (f(s + eps) - 2 * f(s) + f(s - eps)) / eps**2
    assert fwd_rev.item() == pytest.approx(fd.item(), rel=1e-4)


def test_diagonal_fisher_curvature_is_the_diagonal_quadratic(vit):
    model, theta0, head, data = vit
    tau = _tau(theta0, 11)
    fisher = DiagonalFisher({n: torch.rand_like(t) for n, t in theta0.items()}, num_samples=4)
    pred = second_order(model, theta0, tau, data, head, curvature=fisher, progress=False)
    assert pred.kind == "diagonal"
    assert list(pred.curvature.values()) == pytest.approx([float(fisher.quadratic(tau))] * 3)


# --------------------------------------------------------------------------- directions, records, errors


def test_filter_normalized_direction_matches_theta0_filter_norms(vit):
    _, theta0, _, _ = vit
    d = filter_normalized_direction(theta0, generator=torch.Generator().manual_seed(0))
    again = filter_normalized_direction(theta0, generator=torch.Generator().manual_seed(0))
    assert d == again and list(d) == list(theta0)
    for n, w in theta0.items():
        assert_close(d[n].reshape(len(w), -1).norm(dim=1), w.reshape(len(w), -1).norm(dim=1))


def test_records_round_trip_through_json_and_plot(vit):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, theta0, head, data = vit
    tau = _tau(theta0, 12)
    records = [
        interpolate(model, theta0, tau, data, head, [0.0, 1.0], own=[1], label="τ1", progress=False),
        plane(model, theta0, tau, _tau(theta0, 13), data, head, steps=2, progress=False),
        second_order(model, theta0, tau, data, head, progress=False),
        jensen_gap(model, theta0, [tau, _tau(theta0, 14)], data, head, progress=False),
    ]
    for record, cls in zip(records, [Interpolation, Plane, SecondOrder, JensenGap], strict=True):
        assert cls.from_json(json.loads(json.dumps(record.to_json()))) == record
        fig, ax = plt.subplots()
        assert record.plot(ax) is ax
        plt.close(fig)
    fig, ax = plt.subplots()
    records[0].plot(ax, by="task")
    assert [line.get_label() for line in ax.get_lines()][:3] == ["τ1: task 0", "τ1: task 1", "τ1: task 2"]
    plt.close(fig)


def test_bad_probe_input_is_refused_before_any_work(vit, bench):
    model, theta0, head, data = vit
    tau = _tau(theta0, 15)
    wrong = TaskVector({**dict(tau), "extra.weight": torch.zeros(1)})
    with pytest.raises(ConfigError, match="extra.weight"):
        evaluate_points(model, theta0, [tau, wrong], [[1.0, 1.0]], data, head, progress=False)
    with pytest.raises(ConfigError, match=r"coefs must be \(points, 1\)"):
        evaluate_points(model, theta0, [tau], [[1.0, 2.0]], data, head, progress=False)
    with pytest.raises(ConfigError, match="curvature must be"):
        second_order(model, theta0, tau, data, head, curvature="kfac", progress=False)
    with pytest.raises(ConfigError, match="sizes must lie in 1..1"):
        jensen_gap(model, theta0, [tau], data, head, sizes=[2], progress=False)
    with pytest.raises(ConfigError, match="steps >= 2"):
        plane(model, theta0, tau, tau, data, head, steps=1, progress=False)
    with pytest.raises(ConfigError, match="no column"):
        ProbeData.from_benchmark(bench, [0, 1, 2], tasks=[1])
    with pytest.raises(ConfigError, match="same non-empty task ids"):
        ProbeData({0: data.x[0]}, {1: data.y[0]})


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory, bench):
    """A 3-task naive pool trained for one epoch from the shipped θ0."""
    from compolab.finetune import FinetuneConfig
    from compolab.models import load_backbone
    from compolab.run import RunConfig, run

    out = tmp_path_factory.mktemp("probe-run")
    cfg = RunConfig(method="naive", finetune=FinetuneConfig(epochs=1, batch_size=16, rank=2))
    run(cfg, out, benchmark=bench, backbone=load_backbone()[0], progress=False)
    return out / "pool"


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_interpolate_writes_json_and_figure(capsys, pool_dir, tmp_path):
    out, fig = tmp_path / "curves.json", tmp_path / "curves.png"
    code, stdout, err = _cli(capsys, "probe", "interpolate", "--pool", str(pool_dir), "--tasks", "0,2",
                             "--composed", "--range", "-0.5", "1.5", "--steps", "5", "--per-task", "6",
                             "--out", str(out), "--plot", str(fig), "--json", "--no-progress")  # fmt: skip
    assert code == 0, err
    record = json.loads(out.read_text())
    curves = [Interpolation.from_json(c) for c in record["curves"]]
    assert [c.label for c in curves] == ["τ0", "τ2", "composed"]
    assert curves[0].lambdas == [-0.5, 0.0, 0.5, 1.0, 1.5] and sorted(curves[0].loss) == [0, 1, 2]
    assert [SecondOrder.from_json(p).label for p in record["second_order"]] == ["τ0", "τ2", "composed"]
    # at λ = 0 every curve is θ0 with the pool's heads: the same loss
    assert len({round(c.at(0.0), 10) for c in curves}) == 1
    assert fig.stat().st_size > 10_000 and json.loads(stdout)["plot"] == str(fig)


def test_cli_plane_and_jensen(capsys, pool_dir, tmp_path):
    code, _, err = _cli(capsys, "probe", "plane", "--pool", str(pool_dir), "--tasks", "1", "--random", "1",
                        "--steps", "3", "--per-task", "4", "--out", str(tmp_path / "p.json"),
                        "--no-progress")  # fmt: skip
    assert code == 0, err
    grid = Plane.from_json(json.loads((tmp_path / "p.json").read_text())["plane"])
    assert grid.labels == ("τ1", "random 0") and set(grid.marks) == {"θ0", "τ1"}
    code, stdout, err = _cli(capsys, "probe", "jensen", "--pool", str(pool_dir), "--per-task", "4",
                             "--out", str(tmp_path / "j.json"), "--json", "--no-progress")  # fmt: skip
    assert code == 0, err
    gap = JensenGap.from_json(json.loads((tmp_path / "j.json").read_text())["jensen"])
    assert gap.sizes == [1, 2, 3] and gap.omega_diagonal is None  # a naive run keeps no Fisher
    assert json.loads(stdout)["measured"] == [round(v, 4) for v in gap.measured]


def test_cli_jensen_with_all_three_curvatures_and_interpolate_with_kfac(capsys, pool_dir, tmp_path):
    pytest.importorskip("curvlinops")
    code, stdout, err = _cli(capsys, "probe", "jensen", "--pool", str(pool_dir), "--per-task", "4",
                             "--curvature", "all", "--out", str(tmp_path / "j.json"), "--json",
                             "--no-progress")  # fmt: skip
    assert code == 0, err
    record = json.loads((tmp_path / "j.json").read_text())
    gap, summary = JensenGap.from_json(record["jensen"]), json.loads(stdout)
    assert record["curvature"] == "all" and set(gap.omegas()) == {"fisher", "kfac", "diagonal"}
    assert set(gap.predicted) == {"fisher", "kfac", "diagonal"} and len(gap.predicted["kfac"]) == 3
    assert summary["omega_kfac"] == [round(v, 4) for v in gap.omega_kfac]
    assert summary["omega_error"]["diagonal"] == [round(e, 4) for e in gap.omega_error("diagonal")]
    assert all(v > 0 for v in gap.omega_kfac[1:] + gap.omega_diagonal[1:])
    code, _, err = _cli(capsys, "probe", "interpolate", "--pool", str(pool_dir), "--tasks", "1",
                        "--steps", "3", "--per-task", "4", "--second-order", "kfac",
                        "--out", str(tmp_path / "i.json"), "--no-progress")  # fmt: skip
    assert code == 0, err
    pred = SecondOrder.from_json(json.loads((tmp_path / "i.json").read_text())["second_order"][0])
    assert pred.kind == "kfac" and len(set(pred.curvature.values())) == 1  # one K-FAC for every task


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--out", "x.txt"], "--out must name a .json file"),
        (["--out", "{tmp}/r.json", "--plot", "{tmp}/r.jpg"], "--plot must end in"),
        (["--out", "{tmp}/missing/r.json"], "does not exist"),
        (["--out", "{tmp}/r.json", "--tasks", "7"], "the pool holds tasks [0, 1, 2]"),
        (["--out", "{tmp}/r.json", "--second-order", "diagonal"], "no diagonal Fisher"),
        (["--out", "{tmp}/r.json", "--range", "1", "0"], "hi > lo"),
    ],
)
def test_cli_probe_bad_input_writes_nothing(capsys, pool_dir, tmp_path, extra, needle):
    argv = ["probe", "interpolate", "--pool", str(pool_dir), "--no-progress"]
    argv += [a.format(tmp=tmp_path) for a in extra]
    code, _, err = _cli(capsys, *argv)
    assert code == 2 and needle in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_plane_needs_two_directions_and_tmc_pools_are_refused(capsys, pool_dir, tmp_path):
    code, _, err = _cli(capsys, "probe", "plane", "--pool", str(pool_dir), "--tasks", "0,1,2",
                        "--out", str(tmp_path / "p.json"))  # fmt: skip
    assert code == 2 and "needs 2 directions" in err
    tmc = tmp_path / "tmc_pool"
    shutil.copytree(pool_dir, tmc)
    manifest = json.loads((tmc / "pool.json").read_text())
    linearised = next(name for name, method in METHODS.items() if method.linearised)  # TMC
    (tmc / "pool.json").write_text(json.dumps({**manifest, "method": linearised}))
    code, _, err = _cli(capsys, "probe", "jensen", "--pool", str(tmc), "--out", str(tmp_path / "j.json"))
    assert code == 2 and "TMC pool" in err and not (tmp_path / "j.json").exists()


def test_bench_probe_curve_equals_the_plain_loop():
    from compolab.bench import bench_probe

    result = bench_probe(points=3, images=8, num_classes=5, chunk=2, threads=1)
    assert result["max_abs_diff"] < 1e-4 and result["points"] == 3 and result["curve_seconds"] > 0


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"kind": "landscape"}, "unknown probe 'landscape'"),
        ({"curvature": "exact"}, "`curvature` of the plane probe must be one of none, fisher"),
        ({"kind": "jensen", "curvature": "hessian"}, "of the jensen probe must be one of fisher, all"),
        ({"random": 3}, "0, 1 or 2 random directions"),
    ],
)
def test_probe_pool_refuses_bad_options_before_opening_the_pool(tmp_path, options, needle):
    from compolab.probes.command import probe_pool

    kind = options.pop("kind", "plane")
    with pytest.raises(ConfigError, match=needle):
        probe_pool(kind, tmp_path / "no-such-pool", tmp_path / "r.json", **options)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- package structure

_TRAINING_STACK = ("compolab.run", "compolab.methods", "compolab.incremental", "compolab.finetune")


def _in_stack(module: str) -> bool:
    """``module`` is in :data:`_TRAINING_STACK` or inside one (``compolab.runtime`` is not in it)."""
    return any(module == m or module.startswith(m + ".") for m in _TRAINING_STACK)


def test_importing_probes_does_not_load_the_training_stack():
    """``compolab/__init__.py`` imports the run driver eagerly, so the child process registers a bare
    ``compolab`` package first: what is loaded then is exactly what ``compolab.probes`` imports."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import compolab.probes

    root = str(Path(compolab.probes.__file__).parents[1])
    code = (
        "import json, sys, types\n"
        f"pkg = types.ModuleType('compolab'); pkg.__path__ = [{root!r}]; sys.modules['compolab'] = pkg\n"
        "import compolab.probes\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('compolab'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    loaded = json.loads(done.stdout.splitlines()[-1])
    assert "compolab.probes.pool" in loaded and "compolab.probes.engine" in loaded  # the check is not vacuous
    assert [m for m in loaded if _in_stack(m)] == []
    assert "compolab.probes.command" not in loaded  # the CLI logic loads only with the CLI


def _module_imports(tree: ast.AST, *, top_level: bool) -> set[str]:
    """The ``compolab`` modules a module imports: at its top level, or anywhere (function bodies too)."""
    nodes = tree.body if top_level else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("compolab"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("compolab"))
    return names


def test_probes_package_has_no_cycle_no_upward_import_and_one_door_to_the_read_side():
    from pathlib import Path

    import compolab.probes

    folder = Path(compolab.probes.__file__).parent
    trees = {f"compolab.probes.{p.stem}": ast.parse(p.read_text()) for p in folder.glob("*.py")}
    trees["compolab.probes"] = trees.pop("compolab.probes.__init__")
    upward = ("compolab", "compolab.cli", "compolab.bench")
    for name, tree in trees.items():
        anywhere = _module_imports(tree, top_level=False)
        assert not anywhere & set(upward), name
        stack = {m for m in anywhere if _in_stack(m)}
        assert stack == set(), name  # no probe module imports the training stack, not even the pool loader
        door = {"compolab.workspace"} if name == "compolab.probes.pool" else set()
        assert anywhere & {"compolab.workspace"} == door, name  # ... and it goes through the read side
        assert not _module_imports(tree, top_level=True) & set(_TRAINING_STACK), name
    # the package's own import graph is acyclic: peel off modules whose sibling imports are all peeled
    graph = {n: {m for m in _module_imports(t, top_level=True) if m in trees} for n, t in trees.items()}
    done: set[str] = set()
    while len(done) < len(graph):
        ready = {n for n, deps in graph.items() if n not in done and deps <= done}
        assert ready, f"import cycle among {sorted(set(graph) - done)}"
        done |= ready
