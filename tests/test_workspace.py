"""The read side (``compolab.workspace``): a pool opened from its manifest alone, composed and evaluated
exactly as ``compolab compose`` does, and refused with one line when it is not what it claims."""

from __future__ import annotations

import json

import pytest
import torch

from compolab.cli import main
from compolab.data import TinyWorldConfig, tiny_benchmark
from compolab.editing import compose_pool, plan_composition
from compolab.errors import CompolabError, ConfigError
from compolab.evaluate import evaluate_tasks
from compolab.finetune import FinetuneConfig
from compolab.methods import get_method
from compolab.models import BackboneSpec, fingerprint, load_backbone, make_backbone
from compolab.pool import Pool
from compolab.run import RunConfig, run
from compolab.workspace import compose_and_evaluate, open_pool, pool_benchmark

WORLD = TinyWorldConfig(num_tasks=3, classes_per_task=2, train_per_class=8, val_per_class=2, test_per_class=6)


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    """A 3-task ITA pool (LoRA) of the shipped θ0 on a small tiny world."""
    out = tmp_path_factory.mktemp("workspace") / "run"
    cfg = RunConfig(method="ita", finetune=FinetuneConfig(epochs=1, batch_size=8, rank=2))
    run(cfg, out, benchmark=tiny_benchmark(WORLD), backbone=load_backbone()[0], progress=False)
    return out / "pool"


def test_open_pool_rebuilds_theta0_benchmark_and_modules_from_the_manifest(pool_dir):
    opened = open_pool(pool_dir)
    assert opened.method is get_method("ita")
    assert opened.tasks == [0, 1, 2] and sorted(opened.entries) == [0, 1, 2]
    assert fingerprint(opened.backbone) == Pool.open(pool_dir).manifest["theta0_sha256"]
    expected = tiny_benchmark(WORLD)
    assert opened.bench.offsets == expected.offsets
    assert torch.equal(opened.bench.tasks[1].test.images, expected.tasks[1].test.images)
    assert pool_benchmark(opened.pool).offsets == expected.offsets
    assert sorted(open_pool(pool_dir, tasks=[2, 0], load_data=False).entries) == [0, 2]


def test_compose_and_evaluate_prints_what_the_command_prints(pool_dir, capsys):
    opened = open_pool(pool_dir)
    plan = plan_composition(opened.tasks, drop=[1], coefs=[0.7, 0.3])
    result = compose_and_evaluate(opened, plan)
    code = main(["compose", "--pool", str(pool_dir), "--drop", "1", "--weights", "0.7,0.3", "--eval",
                 "--json", "--no-progress", "--device", "cpu"])  # fmt: skip
    assert code == 0
    assert json.loads(capsys.readouterr().out) == result  # JSON-ready, and the same numbers
    assert result["composition"]["dropped"] == [1] and list(result["per_task_accuracy"]) == ["0", "2"]


def test_compose_and_evaluate_is_the_kits_editing(pool_dir):
    """The same accuracy as composing the loaded entries by hand (ITA merges: compose_pool)."""
    opened = open_pool(pool_dir)
    plan = plan_composition(opened.tasks, negate=[2], tasks=[0, 1], negate_coef=0.5)
    model, head = compose_pool(opened.backbone, opened.theta0, opened.entries, plan)
    expected = evaluate_tasks(model, head, opened.bench, plan.tasks)
    measured = compose_and_evaluate(opened, plan)["per_task_accuracy"]
    assert measured == {str(t): round(a, 2) for t, a in expected.items()}


def test_without_its_benchmark_a_pool_composes_but_does_not_evaluate(pool_dir):
    opened = open_pool(pool_dir, load_data=False)
    plan = plan_composition(opened.tasks)
    assert opened.bench is None
    assert compose_and_evaluate(opened, plan, evaluate=False)["num_classes"] == 6
    with pytest.raises(ConfigError, match="load_data=False"):
        compose_and_evaluate(opened, plan)


def test_a_pool_of_another_theta0_is_refused(pool_dir):
    torch.manual_seed(0)
    stranger = make_backbone(BackboneSpec(**load_backbone()[1]["backbone"]))
    with pytest.raises(CompolabError, match="another backbone"):
        open_pool(pool_dir, backbone=stranger, load_data=False)


def test_an_empty_pool_is_refused_before_any_weight_loads(tmp_path):
    pool = Pool.create(tmp_path / "pool", theta0_sha256="0" * 64, preset="tiny",
                       benchmark={"name": "tiny", **tiny_benchmark(WORLD).info})  # fmt: skip
    with pytest.raises(ConfigError, match="holds no module yet"):
        open_pool(pool)
