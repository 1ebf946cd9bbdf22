"""Devices and precision: --device / --precision are checked before any work, the CPU default is
unchanged, bf16 autocast trains float32 master weights and keeps float32 Fisher sums, and a large
physical batch gives the micro-batched gradient. GPU tests are skipped without CUDA."""

import pytest
import torch
from conftest import SMALL_SPEC
from torch import nn

from compolab.cli import main
from compolab.errors import ConfigError
from compolab.finetune import FinetuneConfig, finetune_task, physical_batch
from compolab.fisher import diagonal_fisher
from compolab.heads import new_head
from compolab.models import make_backbone, theta0_of, tuned_weight_names
from compolab.runtime import Runtime, accumulation_dtype, resolve_device, resolve_precision

CPU = torch.device("cpu")


def test_device_and_precision_defaults_and_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU and resolve_device("CPU") == CPU
    assert resolve_precision(None, CPU) is None  # the CPU default: plain float32, no autocast
    assert resolve_precision("bf16", CPU) is torch.bfloat16
    for bad in ("cuda", "cuda:1", "tpu", "cuda:x"):
        with pytest.raises(ConfigError):
            resolve_device(bad)
    with pytest.raises(ConfigError, match="precision"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ConfigError, match="physical batch"):
        Runtime.resolve("cpu", physical_batch=0)
    assert Runtime.resolve("cpu").workers == 0 and Runtime.resolve("cpu").autocast is None
    assert accumulation_dtype(torch.zeros(1, dtype=torch.bfloat16)) == torch.float32
    assert accumulation_dtype(torch.zeros(1, dtype=torch.float64)) == torch.float64


@pytest.mark.parametrize("flags", [["--device", "cuda:0"], ["--device", "gpu"], ["--precision", "fp8"]])
def test_cli_rejects_a_bad_device_before_any_work(tmp_path, capsys, monkeypatch, flags):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    assert main(["train", "--method", "ita", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compolab: error:")
    assert not out.exists()


def test_physical_batch_must_fit_the_step():
    cfg = FinetuneConfig(batch_size=8, accumulate=4)
    assert physical_batch(cfg, None) == 8 and physical_batch(cfg, Runtime(physical_batch=32)) == 32
    for bad in (12, 24, 64):  # not a multiple of 8, or does not divide the step of 32
        with pytest.raises(ConfigError, match="physical batch"):
            physical_batch(cfg, Runtime(physical_batch=bad))


def _task(bench):
    return bench.tasks[0]


def _train(bench, runtime, cfg, dtype=torch.float64):
    """τ of one task trained from a fresh seeded 2-block ViT, images and model in ``dtype``."""
    from dataclasses import replace

    torch.manual_seed(0)
    model = make_backbone(SMALL_SPEC).requires_grad_(False).to(dtype)
    theta0 = theta0_of(model)
    source = _task(bench).train

    class Cast(torch.utils.data.Dataset):  # the task's images in the model's dtype
        def __len__(self):
            return len(source)

        def __getitem__(self, i):
            x, y = source[i]
            return x.to(dtype), y

    task = replace(_task(bench), train=Cast())
    head = new_head(SMALL_SPEC.embed_dim, task.num_classes).to(dtype)
    result = finetune_task(model, theta0, task, bench.offsets[0], cfg, names=tuned_weight_names(model),
                           head=head, penalty=lambda m, h: 1e-2 * _sq(m.delta(theta0)),
                           runtime=runtime)  # fmt: skip
    return result.module.delta(theta0)


def _sq(tau) -> torch.Tensor:
    return sum(d.square().sum() for d in tau.values())


def test_a_large_physical_batch_gives_the_micro_batched_training(bench):
    """36 images, micro-batch 4 × 3 = steps of 12: physical batches of 12 see the same images with
    the same weights (float64, so only summation order differs: ~1e-15 relative)."""
    cfg = FinetuneConfig(style="lora", rank=2, epochs=2, batch_size=4, accumulate=3, lr=1e-2)
    micro = _train(bench, Runtime(), cfg)
    merged = _train(bench, Runtime(physical_batch=12), cfg)
    assert len(_task(bench).train) % 12 == 0  # every step is whole: the result must not change
    for n in micro:
        assert micro[n].abs().sum() > 0
        torch.testing.assert_close(merged[n], micro[n], rtol=1e-9, atol=1e-12)


def test_bf16_autocast_trains_float32_weights_close_to_fp32(bench):
    """bf16 autocast on the CPU (the path CUDA takes by default): master weights and the task vector
    stay float32, and a 1-epoch τ stays close to the fp32 one (bf16 keeps 8 mantissa bits:
    a few % relative)."""
    cfg = FinetuneConfig(style="lora", rank=2, epochs=1, batch_size=12, lr=1e-2)
    taus = {}
    for precision in ("fp32", "bf16"):
        taus[precision] = _train(bench, Runtime.resolve("cpu", precision), cfg, torch.float32)
    taus = {k: {n: v.detach() for n, v in tau.items()} for k, tau in taus.items()}
    num = sum(float((taus["bf16"][n] - taus["fp32"][n]).square().sum()) for n in taus["fp32"]) ** 0.5
    den = sum(float(taus["fp32"][n].square().sum()) for n in taus["fp32"]) ** 0.5
    assert all(v.dtype == torch.float32 for v in taus["bf16"].values())
    assert den > 0 and num / den < 0.1


def test_bf16_fisher_is_summed_in_float32_and_close_to_fp32(bench):
    torch.manual_seed(0)
    backbone = make_backbone(SMALL_SPEC).requires_grad_(False)
    head = new_head(SMALL_SPEC.embed_dim, 3)
    x = torch.stack([_task(bench).train[i][0] for i in range(16)])
    exact = diagonal_fisher(backbone, head, [x])
    with Runtime.resolve("cpu", "bf16").autocast_context():
        low = diagonal_fisher(backbone, head, [x])
    for n in exact.values:
        assert low[n].dtype == torch.float32
        rel = float((low[n] - exact[n]).norm() / exact[n].norm())
        assert rel < 0.1, n  # bf16 forward / backward, float32 sums of squares


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_cuda_auto_device_and_bf16_default():
    runtime = Runtime.resolve("auto")
    assert runtime.device.type == "cuda" and runtime.precision == "bf16" and runtime.workers >= 0


@pytest.mark.gpu
def test_cuda_training_step_bf16_matches_fp32_closely(bench):
    cfg = FinetuneConfig(style="lora", rank=2, epochs=1, batch_size=12, lr=1e-2)
    taus = {}
    for precision in ("fp32", "bf16"):
        runtime = Runtime.resolve("cuda", precision, workers=0)
        taus[precision] = {n: v.cpu() for n, v in _train(bench, runtime, cfg, torch.float32).items()}
    for n, v in taus["fp32"].items():
        assert taus["bf16"][n].dtype == torch.float32
        assert float((taus["bf16"][n] - v).norm() / v.norm()) < 0.1


@pytest.mark.gpu
def test_cuda_bench_step_reports_mfu_on_a_known_gpu():
    from compolab.bench import bench_step
    from compolab.runtime import peak_flops

    result = bench_step(runtime=Runtime.resolve("cuda"), repeats=2, steps=2)
    assert result["images_per_s"]["plain"] > 0 and result["precision"] == "bf16"
    if peak_flops(torch.device("cuda"), "bf16") is not None:
        assert 0 < result["mfu"]["plain"] < 1


def test_the_training_wrapper_is_head_of_model():  # what DDP / compile wrap in training
    from compolab.finetune import _Network

    lin = nn.Linear(2, 2)
    net = _Network(nn.Identity(), lin)
    x = torch.randn(3, 2)
    assert torch.equal(net(x), lin(x))
