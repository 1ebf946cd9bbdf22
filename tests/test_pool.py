import json
import pickle

import pytest
import torch

from compolab.editing import compose_pool, plan_composition
from compolab.errors import CompolabError, ConfigError
from compolab.heads import new_head
from compolab.models import BackboneSpec, fingerprint, make_backbone, theta0_of, tuned_weight_names
from compolab.pool import Pool, PoolEntry
from compolab.tuning import TaskModule

SPEC = BackboneSpec(embed_dim=16, depth=2, num_heads=2)


@pytest.fixture
def backbone():
    torch.manual_seed(0)
    return make_backbone(SPEC)


def _entry(backbone, task, style="lora", n_cls=3):
    theta0 = theta0_of(backbone)
    gen = torch.Generator().manual_seed(task)
    module = TaskModule.create(style, theta0, tuned_weight_names(backbone), rank=2, generator=gen)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    head = new_head(16, n_cls, generator=gen)
    classes = list(range(task * n_cls, (task + 1) * n_cls))
    return PoolEntry(task, module, head, {"classes": classes, "method": "naive"})


@pytest.fixture
def pool(tmp_path, backbone):
    pool = Pool.create(tmp_path / "pool", theta0_sha256=fingerprint(backbone), benchmark={"name": "toy"})
    for t in range(3):
        pool.save(_entry(backbone, t, style=("full", "lora", "ia3")[t]))
    return pool


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_roundtrip_preserves_every_tensor(pool, backbone):
    sha = fingerprint(backbone)
    assert pool.tasks() == [0, 1, 2]
    theta0 = theta0_of(backbone)
    for t in range(3):
        original = _entry(backbone, t, style=("full", "lora", "ia3")[t])
        loaded = pool.load(t, theta0_sha256=sha)
        assert loaded.card["style"] == original.module.style and loaded.classes == original.classes
        assert loaded.module.delta(theta0).allclose(original.module.delta(theta0).detach())
        torch.testing.assert_close(loaded.head.weight, original.head.weight)
    card = json.loads((pool.root / "task_001.json").read_text())
    assert card["theta0_sha256"] == sha and len(card["sha256"]) == 64


def test_files_are_safetensors_and_json_only(pool):
    suffixes = {p.suffix for p in pool.root.iterdir()}
    assert suffixes == {".safetensors", ".json"}


def test_fingerprint_mismatch_is_refused(pool, backbone):
    before = _snapshot(pool.root)
    with pytest.raises(CompolabError, match="another backbone"):
        pool.load(0, theta0_sha256="f" * 64)
    other = make_backbone(SPEC)
    with pytest.raises(CompolabError, match="another backbone"):
        Pool.create(pool.root, theta0_sha256=fingerprint(other))
    assert _snapshot(pool.root) == before


def test_truncated_file_is_refused(pool, backbone):
    path = pool.root / "task_001.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    before = _snapshot(pool.root)
    with pytest.raises(CompolabError, match="truncated"):
        pool.load(1, theta0_sha256=fingerprint(backbone))
    assert _snapshot(pool.root) == before


def test_pickle_payload_is_never_unpickled(pool, backbone, monkeypatch):
    path = pool.root / "task_002.safetensors"
    payload = pickle.dumps({"weight": torch.zeros(2)})
    path.write_bytes(payload)
    card_path = pool.root / "task_002.json"
    card = json.loads(card_path.read_text())
    from compolab.pool import card_sha256

    card["sha256"] = card_sha256(path, card)  # even with a matching card, it is not a safetensors file
    card_path.write_text(json.dumps(card))

    def boom(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    with pytest.raises(CompolabError, match="not a readable safetensors"):
        pool.load(2, theta0_sha256=fingerprint(backbone))


def test_half_written_module_is_not_listed(pool, backbone):
    # a tensor file without its card (the card is written last) is not a task of the pool
    (pool.root / "task_003.safetensors").write_bytes(b"partial")
    assert pool.tasks() == [0, 1, 2]
    with pytest.raises(ConfigError, match="not in the pool"):
        pool.load(3, theta0_sha256=fingerprint(backbone))


def test_atomic_save_leaves_no_temporary_file(pool, backbone, monkeypatch):
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # half a file, then the disk is full
            f.write(b"\0" * 10)
        raise OSError("disk full")

    before = _snapshot(pool.root)
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError):
        pool.save(_entry(backbone, 1))
    assert _snapshot(pool.root) == before


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"tasks": [0, 7]}, "unknown task id(s) [7] in `tasks`"),
        ({"drop": [5]}, "unknown task id(s) [5] in `drop`"),
        ({"coefs": [0.5]}, "got 1 weights for 3 composed tasks"),
        ({"drop": [0, 1, 2]}, "nothing left"),
        ({"negate": [1]}, "both composed and negated"),
        ({"tasks": [0, 0]}, "repeated"),
    ],
)
def test_bad_plans_fail_before_any_work(kwargs, needle):
    with pytest.raises(ConfigError) as err:
        plan_composition([0, 1, 2], **kwargs)
    assert needle in str(err.value)


def test_plan_semantics():
    plan = plan_composition([0, 1, 2, 3], tasks=[0, 2, 3], drop=[2])
    assert plan.tasks == (0, 3) and plan.coefs == (0.5, 0.5) and plan.dropped == (1, 2)
    plan = plan_composition([0, 1, 2], tasks=[0, 2], negate=[1], negate_coef=0.3)
    assert plan.negated == (1,) and plan.negated_coefs == (0.3,) and plan.dropped == ()


def test_compose_pool_merges_and_heads_follow(pool, backbone):
    sha, theta0 = fingerprint(backbone), theta0_of(backbone)
    entries = pool.load_all(theta0_sha256=sha)
    plan = plan_composition(pool.tasks(), drop=[1], negate=[1], negate_coef=0.5)
    model, head = compose_pool(backbone, theta0, entries, plan)
    assert head.tasks == (0, 2) and head.global_labels.tolist() == [0, 1, 2, 6, 7, 8]
    expected = {
        n: theta0[n]
        + 0.5 * entries[0].module.delta(theta0)[n].detach()
        + 0.5 * entries[2].module.delta(theta0)[n].detach()
        - 0.5 * entries[1].module.delta(theta0)[n].detach()
        for n in tuned_weight_names(backbone)
    }
    state = dict(model.named_parameters())
    for n, w in expected.items():
        torch.testing.assert_close(state[n], w)
    assert fingerprint(backbone) == sha  # θ0 itself is untouched
