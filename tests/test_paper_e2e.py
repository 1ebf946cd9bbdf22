"""The paper preset end to end on the CPU: ViT-B/16 (random init, no download), a fake Split
CIFAR-100 in torchvision's on-disk format, 2 tasks, ITA and IEL with LoRA, through ``compolab train``.

It runs every stage the paper preset runs: the CIFAR-100 loader and its 224-px transforms, head
pre-tuning with classifier alignment, the exact Fisher at θ0 (on a 2-image subset per task), the
decoupled LoRA penalty step with the paper's 8 × 16 accumulation, the pool, and the composed
evaluation after each task. ViT-B on 2 CPU cores is slow: a handful of images per task.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_datasets import fake_md5, write_fake_cifar100  # noqa: F401 - fake_md5 is a fixture

from compolab.cli import main
from compolab.models import PAPER_VIT, make_backbone, save_backbone, spec_dict


@pytest.fixture(scope="module")
def random_vit_b(tmp_path_factory):
    """A ViT-B/16 θ0 with random weights, saved as a checkpoint (safetensors + card)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("theta0") / "vit_b16_random.safetensors"
    save_backbone(make_backbone(PAPER_VIT, pretrained=False), path, {"backbone": spec_dict(PAPER_VIT)})
    return path


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ita", "iel"])
def test_paper_preset_trains_two_cifar_tasks_through_the_cli(tmp_path, fake_md5, random_vit_b, method,  # noqa: F811
                                                             capsys):  # fmt: skip
    write_fake_cifar100(tmp_path / "data", train_per_class=1, test_per_class=1)
    out = tmp_path / method
    status = main(["train", "--preset", "paper", "--dataset", "cifar100", "--method", method,
                   "--tuning", "lora", "--tasks", "2", "--epochs", "1", "--fisher-samples", "2",
                   "--checkpoint", str(random_vit_b), "--root", str(tmp_path / "data"), "--device", "cpu",
                   "--out", str(out), "--no-progress", "--json"])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["runtime"]["precision"] == "fp32" and summary["runtime"]["device"] == "cpu"
    results = json.loads((out / "results.json").read_text())
    cfg = results["config"]
    # the paper's values, with only the size overrides
    assert (cfg["preset"], cfg["dataset"], cfg["num_tasks"]) == ("paper", "cifar100", 2)
    ft = cfg["finetune"]
    assert (ft["rank"], ft["batch_size"], ft["accumulate"]) == (16, 8, 16)
    assert cfg["method_cfg"]["fisher_kind"] == "exact" and cfg["method_cfg"]["fisher_samples"] == 2
    matrix = results["accuracy_matrix"]
    assert [len(row) for row in matrix] == [1, 2]  # composed evaluation after each task
    assert all(0.0 <= a <= 100.0 for row in matrix for a in row)
    assert results["final_accuracy"] == pytest.approx(sum(matrix[-1]) / 2, abs=0.01)
    for t in (0, 1):
        card = json.loads((out / "pool" / f"task_{t:03d}.json").read_text())
        assert card["hparams"]["decoupled"] is True  # LoRA: the paper's separate penalty step
        history = card["metrics"]["history"]
        assert len(history) == 1 and all(map(lambda v: v == v, history[0].values()))  # finite, not NaN
        tensors = load_file(out / "pool" / f"task_{t:03d}.safetensors")
        qkv_a = [v for k, v in tensors.items() if k.endswith("attn.qkv.weight::lora_A")]
        assert len(qkv_a) == 12 and qkv_a[0].shape == (48, 768)  # 12 blocks, r' = 3r = 48 on qkv
        b = [v for k, v in tensors.items() if k.endswith("::lora_B")]
        assert any(bool(v.abs().sum() > 0) for v in b)  # one optimiser step moved B away from 0
    state = sorted(p.name for p in (out / "state").iterdir())
    assert state == ["after_001.json", "after_001.safetensors"]  # the Fisher / C_pre state was kept
