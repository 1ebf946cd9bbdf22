"""The paper preset's class-incremental benchmarks, read from their usual on-disk formats.

:data:`DATASETS` describes the seven benchmarks of the paper's tables: task split,
expected layout under a data root, normalisation and transforms.
:func:`load_benchmark` turns one of them into a :class:`~compolab.data.Benchmark`, with classes in
their natural order (sorted folder names, or the official class list) and global labels
``0 .. C - 1``. Nothing is downloaded unless ``download=True``, and only CIFAR-100 can be (through
torchvision); every other dataset must already be on disk.

Where a dataset has no official train/test split (ImageNet-R, Caltech-256, RESISC45 and a
single-folder CropDisease), each class's images, sorted by file name, are split 80/20 by a
permutation seeded with ``(SPLIT_SEED, class index)``. The split is a property of the benchmark:
it does not depend on the run seed, so runs with different seeds share one test set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import torchvision
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

from compolab.data import Benchmark, split_by_class, task_sizes
from compolab.errors import ConfigError, DataNotFoundError

__all__ = ["DATASETS", "DatasetInfo", "ImageFileDataset", "load_benchmark", "SPLIT_SEED"]

#: Seed of the per-class 80/20 train/test split of the datasets without an official split.
SPLIT_SEED = 0
_TEST_FRACTION = 0.2
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

#: ``(image path, global label)`` pairs.
Samples = list[tuple[str, int]]


class ImageFileDataset(Dataset):
    """Images read lazily from files (PIL, converted to RGB), yielding ``(tensor, label)``.

    Attributes:
        samples: ``(path, label)`` pairs, in order.
        targets: The labels alone.
        transform: Applied to each PIL image.
    """

    def __init__(self, samples: Samples, transform: Callable) -> None:
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self.transform(default_loader(path)), label


def _images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    if not folder.is_dir():
        raise DataNotFoundError(f"missing folder {folder}")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


def _class_folders(
    folder: Path, count: int, *, at_least: bool = False, skip: str = ""
) -> list[Path]:
    """The sorted class sub-folders of ``folder`` (but ``skip``); ``count`` (or more) of them."""
    if not folder.is_dir():
        raise DataNotFoundError(f"missing folder {folder}")
    found = sorted(p for p in folder.iterdir() if p.is_dir() and p.name != skip)
    if len(found) < count or (len(found) > count and not at_least):
        need = f"at least {count}" if at_least else str(count)
        raise DataNotFoundError(f"expected {need} class folders in {folder}, found {len(found)}")
    return found


def _split_80_20(folders: Sequence[Path]) -> tuple[Samples, Samples]:
    """Per-class seeded 80/20 train/test split; class ``k`` of ``folders`` gets label ``k``."""
    train: Samples = []
    test: Samples = []
    for label, folder in enumerate(folders):
        files = _images(folder)
        if len(files) < 2:
            raise DataNotFoundError(f"{folder} holds {len(files)} image(s), need >= 2 to split")
        order = np.random.default_rng([SPLIT_SEED, label]).permutation(len(files))
        n_test = max(1, round(_TEST_FRACTION * len(files)))
        test += [(str(files[i]), label) for i in sorted(order[:n_test])]
        train += [(str(files[i]), label) for i in sorted(order[n_test:])]
    return train, test


def _lines(path: Path) -> list[str]:
    """The stripped non-empty lines of a text file."""
    if not path.is_file():
        raise DataNotFoundError(f"missing file {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _listed(folder: Path, pairs: Sequence[tuple[str, int]]) -> Samples:
    """``(folder / rel, label)`` for the ``(rel, label)`` pairs; every listed file must exist."""
    samples = [(str(folder / rel), label) for rel, label in pairs]
    missing = [path for path, _ in samples if not Path(path).is_file()]
    if missing:
        raise DataNotFoundError(f"{len(missing)} listed image(s) missing, e.g. {missing[0]}")
    return samples


def _scan_folders(info: DatasetInfo, folder: Path) -> tuple[Samples, Samples, list[str]]:
    """ImageNet-R, Caltech-256 (without ``257.clutter``), RESISC45: one folder per class."""
    classes = _class_folders(folder, info.num_classes, skip="257.clutter")
    return (*_split_80_20(classes), [p.name for p in classes])


def _scan_cub(info: DatasetInfo, folder: Path) -> tuple[Samples, Samples, list[str]]:
    """CUB-200-2011 with its official class list and train/test split."""
    classes = [line.split()[1] for line in _lines(folder / "classes.txt")]
    if len(classes) != info.num_classes:
        raise DataNotFoundError(f"{folder / 'classes.txt'} lists {len(classes)} classes, not 200")
    label = dict(line.split() for line in _lines(folder / "image_class_labels.txt"))
    flag = dict(line.split() for line in _lines(folder / "train_test_split.txt"))
    images = [line.split() for line in _lines(folder / "images.txt")]
    splits = []
    for keep in ("1", "0"):  # is_training_image
        chosen = [(rel, int(label[i]) - 1) for i, rel in images if flag[i] == keep]
        splits.append(_listed(folder / "images", chosen))
    return splits[0], splits[1], classes


def _scan_mit67(info: DatasetInfo, folder: Path) -> tuple[Samples, Samples, list[str]]:
    """MIT-67 with the official ``TrainImages.txt`` / ``TestImages.txt`` lists."""
    classes = [p.name for p in _class_folders(folder / "Images", info.num_classes)]
    index = {name: k for k, name in enumerate(classes)}
    splits = []
    for listing in ("TrainImages.txt", "TestImages.txt"):
        rels = _lines(folder / listing)
        unknown = {r.split("/")[0] for r in rels} - index.keys()
        if unknown:
            raise DataNotFoundError(f"{folder / listing} names unknown classes {sorted(unknown)}")
        splits.append(_listed(folder / "Images", [(r, index[r.split("/")[0]]) for r in rels]))
    return splits[0], splits[1], classes


def _scan_cropdisease(info: DatasetInfo, folder: Path) -> tuple[Samples, Samples, list[str]]:
    """CropDisease: ``train/`` and ``test/`` trees, or one tree split 80/20; first 35 classes."""
    n = info.num_classes
    if not (folder / "train").is_dir():
        classes = _class_folders(folder, n, at_least=True)[:n]
        return (*_split_80_20(classes), [p.name for p in classes])
    classes = [p.name for p in _class_folders(folder / "train", n, at_least=True)[:n]]
    _class_folders(folder / "test", n, at_least=True)
    splits = []
    for split in ("train", "test"):
        splits.append(
            [(str(f), k) for k, c in enumerate(classes) for f in _images(folder / split / c)]
        )
    return splits[0], splits[1], classes


@dataclass(frozen=True)
class DatasetInfo:
    """One benchmark of the paper preset.

    Attributes:
        name: Registry name (``cifar100``, ``imagenet-r``, ...).
        num_tasks: Number of tasks.
        num_classes: Classes used, split over the tasks by :func:`~compolab.data.task_sizes`.
        folder: The dataset's folder directly under the data root.
        layout: One line: the expected files under the data root and where to get them.
        mean, std: Per-channel normalisation.
        center_crop: Test transform resizes to ``256/224 * img_size`` then center-crops
            (True), or resizes straight to ``img_size`` without a crop (CropDisease).
        scan: Lists ``(train samples, test samples, class names)`` from the dataset folder
            (None for CIFAR-100, read by torchvision).
    """

    name: str
    num_tasks: int
    num_classes: int
    folder: str
    layout: str
    mean: tuple[float, float, float] = HALF
    std: tuple[float, float, float] = HALF
    center_crop: bool = True
    scan: Callable[[DatasetInfo, Path], tuple[Samples, Samples, list[str]]] | None = field(
        default=None, repr=False
    )

    @property
    def sizes(self) -> list[int]:
        """Classes per task (MIT-67: ``[7] * 7 + [6] * 3``)."""
        return task_sizes(self.num_classes, self.num_tasks)

    def train_transform(self, img_size: int = 224) -> T.Compose:
        """RandomResizedCrop (bicubic) -> RandomHorizontalFlip -> ToTensor -> Normalize."""
        return T.Compose([
            T.RandomResizedCrop(img_size, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(self.mean, self.std),
        ])

    def test_transform(self, img_size: int = 224) -> T.Compose:
        """Resize(256, bicubic) -> CenterCrop(224) -> ToTensor -> Normalize, sizes scaled to
        ``img_size``.

        Without ``center_crop`` (CropDisease): Resize((224, 224), bicubic) -> ToTensor ->
        Normalize. That is the released config's Resize(224) on PlantVillage's square images, and the
        fixed shape keeps any other image batchable.
        """
        bicubic = T.InterpolationMode.BICUBIC
        if self.center_crop:
            resize = [T.Resize(round(img_size * 256 / 224), bicubic), T.CenterCrop(img_size)]
        else:
            resize = [T.Resize((img_size, img_size), bicubic)]
        return T.Compose([*resize, T.ToTensor(), T.Normalize(self.mean, self.std)])


#: The paper's seven benchmarks, by registry name.
DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "cifar100", num_tasks=10, num_classes=100, folder="cifar-100-python",
            layout="cifar-100-python/{train,test,meta} (torchvision's python format, "
            "https://www.cs.toronto.edu/~kriz/cifar.html)",
        ),
        DatasetInfo(
            "imagenet-r", num_tasks=10, num_classes=200, folder="imagenet-r",
            layout="imagenet-r/<wnid>/*.jpg, 200 folders "
            "(https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar)",
            scan=_scan_folders,
        ),
        DatasetInfo(
            "cub200", num_tasks=10, num_classes=200, folder="CUB_200_2011",
            layout="CUB_200_2011/{images.txt,image_class_labels.txt,train_test_split.txt,"
            "classes.txt,images/} (https://www.vision.caltech.edu/datasets/cub_200_2011/)",
            scan=_scan_cub,
        ),
        DatasetInfo(
            "caltech256", num_tasks=10, num_classes=256, folder="256_ObjectCategories",
            layout="256_ObjectCategories/<NNN.name>/*.jpg, 257 folders with 257.clutter "
            "(https://data.caltech.edu/records/nyy15-4j048)",
            scan=_scan_folders,
        ),
        DatasetInfo(
            "mit67", num_tasks=10, num_classes=67, folder="mit67",
            layout="mit67/Images/<class>/*.jpg and mit67/{TrainImages,TestImages}.txt "
            "(https://web.mit.edu/torralba/www/indoor.html)",
            scan=_scan_mit67,
        ),
        DatasetInfo(
            "resisc45", num_tasks=9, num_classes=45, folder="NWPU-RESISC45",
            layout="NWPU-RESISC45/<class>/*.jpg, 45 folders "
            "(https://www.tensorflow.org/datasets/catalog/resisc45)",
            scan=_scan_folders,
        ),
        DatasetInfo(
            "cropdisease", num_tasks=7, num_classes=35, folder="cropdisease",
            layout="cropdisease/{train,test}/<class>/* or cropdisease/<class>/* (PlantVillage, "
            "38 classes, https://github.com/IBM/cdfsl-benchmark)",
            mean=IMAGENET_MEAN, std=IMAGENET_STD, center_crop=False, scan=_scan_cropdisease,
        ),
    )
}


def _load_cifar100(
    info: DatasetInfo, root: Path, img_size: int, download: bool
) -> tuple[Dataset, list[int], Dataset, list[int], list[str]]:
    """CIFAR-100 through torchvision (which checks the files' MD5 sums)."""
    files = [root / info.folder / f for f in ("train", "test", "meta")]
    if not download and not all(f.is_file() for f in files):
        raise DataNotFoundError(
            f"cifar100: expected {info.layout} under {root}; pass `download` to fetch it"
        )
    parts = []
    for train in (True, False):
        tf = info.train_transform(img_size) if train else info.test_transform(img_size)
        try:
            ds = torchvision.datasets.CIFAR100(root, train=train, transform=tf, download=download)
        except (RuntimeError, OSError) as err:
            raise DataNotFoundError(
                f"cifar100 under {root} is unusable ({err}); delete {root / info.folder} "
                "and pass `download` to fetch it again"
            ) from err
        parts += [ds, ds.targets]
    return (*parts, list(parts[0].classes))


def _is_int(x: object) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def load_benchmark(
    name: str,
    root: str | Path,
    *,
    download: bool = False,
    img_size: int = 224,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> Benchmark:
    """Load one of the paper's benchmarks as a class-incremental :class:`Benchmark`.

    Args:
        name: A key of :data:`DATASETS`.
        root: The data root; the dataset lives in ``root / DATASETS[name].folder``.
        download: Let torchvision download CIFAR-100 if it is missing (other datasets: no effect).
        img_size: Side of the transformed square images.
        val_fraction: Share of each task's training images (seeded choice) held out for
            validation; validation images use the training transform.
        seed: Seed of that validation choice (the train/test split does not depend on it).

    Returns:
        The benchmark: tasks of ``DATASETS[name].sizes`` classes, labels in natural class order.

    Raises:
        ConfigError: Unknown name, or a bad ``img_size`` / ``val_fraction`` / ``seed``.
        DataNotFoundError: The dataset's files are not under ``root`` (the message says which).
    """
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if not _is_int(img_size) or img_size <= 0:
        raise ConfigError(f"img_size must be a positive integer, got {img_size!r}")
    if not isinstance(val_fraction, Real) or not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if not _is_int(seed) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    info, root = DATASETS[name], Path(root)
    if info.scan is None:
        train, train_y, test, test_y, classes = _load_cifar100(info, root, img_size, download)
    else:
        if not (root / info.folder).is_dir():
            raise DataNotFoundError(f"{name}: expected {info.layout} under {root}")
        train_s, test_s, classes = info.scan(info, root / info.folder)
        train = ImageFileDataset(train_s, info.train_transform(img_size))
        test = ImageFileDataset(test_s, info.test_transform(img_size))
        train_y, test_y = train.targets, test.targets
    provenance = {"root": str(root / info.folder), "img_size": img_size, "split_seed": SPLIT_SEED}
    return split_by_class(
        name, train, train_y, test, test_y, classes, info.sizes,
        val_fraction=val_fraction, seed=seed, info=provenance,
    )
