"""The paper preset's dataset loaders, on small fake copies written in each dataset's real format."""

from __future__ import annotations

import os
import pickle
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
from PIL import Image
from torchvision import transforms as T

from compolab.data import Benchmark, task_sizes
from compolab.datasets import DATASETS, load_benchmark
from compolab.errors import ConfigError, DataNotFoundError

torch.set_num_threads(1)
SIZE = 16


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to reach the network fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the dataset loaders must not touch the network")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def write_image(path: Path, value: int) -> None:
    """An 8x8 image of constant gray ``value`` (JPEG or PNG by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, value, value)).save(path)


def write_class_tree(folder: Path, classes: list[str], per_class: int) -> None:
    for k, name in enumerate(classes):
        for j in range(per_class):
            write_image(folder / name / f"img_{j:02d}.jpg", k % 256)


def labels_of(subset) -> list[int]:
    return [subset.dataset.targets[i] for i in subset.indices]


def paths_of(subset) -> set[str]:
    return {subset.dataset.samples[i][0] for i in subset.indices}


def check_benchmark(bench: Benchmark, name: str, class_names: list[str]) -> None:
    """Tasks and class split as in the registry, labels within each task, natural class order."""
    info = DATASETS[name]
    assert bench.name == name
    assert bench.num_tasks == info.num_tasks
    assert [t.num_classes for t in bench.tasks] == info.sizes
    assert bench.class_names == class_names
    for task, lo in zip(bench.tasks, bench.offsets, strict=False):
        assert task.classes == tuple(range(lo, lo + task.num_classes))
        for split in (task.train, task.test):
            assert set(labels_of(split)) == set(task.classes)
    x, y = bench.tasks[0].train[0]
    assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
    x, y = bench.tasks[-1].test[0]
    assert x.shape == (3, SIZE, SIZE) and y in bench.tasks[-1].classes


def check_files_match_labels(bench: Benchmark) -> None:
    """Every sample's file lies in the folder of its class; train and test share no file."""
    for task in bench.tasks:
        for split in (task.train, task.test):
            for i in split.indices:
                path, label = split.dataset.samples[i]
                assert bench.class_names[label] in Path(path).parts
        assert not paths_of(task.train) & paths_of(task.test)


# ---------------------------------------------------------------- registry and transforms


def test_registry_matches_the_spec_splits():
    expected = {
        "cifar100": [10] * 10,
        "imagenet-r": [20] * 10,
        "cub200": [20] * 10,
        "caltech256": task_sizes(256, 10),
        "mit67": [7] * 7 + [6] * 3,
        "resisc45": [5] * 9,
        "cropdisease": [5] * 7,
    }
    assert {name: info.sizes for name, info in DATASETS.items()} == expected
    assert DATASETS["cifar100"].mean == DATASETS["cifar100"].std == (0.5, 0.5, 0.5)
    assert DATASETS["cropdisease"].mean == (0.485, 0.456, 0.406)
    assert DATASETS["cropdisease"].std == (0.229, 0.224, 0.225)


def test_transforms_follow_the_released_configs():
    bicubic = T.InterpolationMode.BICUBIC
    train = DATASETS["cifar100"].train_transform().transforms
    assert [type(t) for t in train] == [
        T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize
    ]
    assert train[0].size == (224, 224) and train[0].interpolation == bicubic
    test = DATASETS["cifar100"].test_transform().transforms
    assert [type(t) for t in test] == [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]
    assert test[0].size == 256 and test[0].interpolation == bicubic
    assert test[1].size == (224, 224)
    crop_test = DATASETS["cropdisease"].test_transform().transforms
    assert [type(t) for t in crop_test] == [T.Resize, T.ToTensor, T.Normalize]
    assert crop_test[0].size == (224, 224) and crop_test[0].interpolation == bicubic
    assert list(crop_test[2].mean) == [0.485, 0.456, 0.406]


# ---------------------------------------------------------------- CIFAR-100


def write_fake_cifar100(root: Path, train_per_class: int = 2, test_per_class: int = 1) -> None:
    """The real python format: pickled dicts; image ``i`` is constant gray ``2 * label``."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        fine = np.repeat(np.arange(100), per_class)[::-1].copy()  # not sorted by label
        data = np.repeat((2 * fine).astype(np.uint8)[:, None], 3072, axis=1)
        entry = {
            "data": data,
            "fine_labels": fine.tolist(),
            "coarse_labels": (fine // 5).tolist(),
            "filenames": [f"img_{i}.png" for i in range(len(fine))],
        }
        (folder / split).write_bytes(pickle.dumps(entry))
    meta = {
        "fine_label_names": [f"class_{k:03d}" for k in range(100)],
        "coarse_label_names": [f"super_{k:02d}" for k in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta))


@pytest.fixture
def fake_md5(monkeypatch):
    """torchvision checks the real files' MD5 sums; the fake files only need to exist."""
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def test_cifar100(tmp_path, fake_md5):
    write_fake_cifar100(tmp_path)
    bench = load_benchmark("cifar100", tmp_path, img_size=SIZE)
    check_benchmark(bench, "cifar100", [f"class_{k:03d}" for k in range(100)])
    assert [len(t.train) for t in bench.tasks] == [20] * 10
    assert [len(t.test) for t in bench.tasks] == [10] * 10
    for split in (bench.tasks[3].train, bench.tasks[7].test):  # pixels are paired with labels
        for x, y in (split[0], split[len(split) - 1]):
            assert torch.allclose(x, torch.full_like(x, (2 * y / 255 - 0.5) / 0.5), atol=1e-5)


def test_cifar100_val_fraction_is_seeded(tmp_path, fake_md5):
    write_fake_cifar100(tmp_path, train_per_class=4)
    a = load_benchmark("cifar100", tmp_path, img_size=SIZE, val_fraction=0.25, seed=3)
    b = load_benchmark("cifar100", tmp_path, img_size=SIZE, val_fraction=0.25, seed=3)
    assert [len(t.val) for t in a.tasks] == [10] * 10
    assert [len(t.train) for t in a.tasks] == [30] * 10
    assert a.tasks[0].val.indices == b.tasks[0].val.indices
    assert not set(a.tasks[0].val.indices) & set(a.tasks[0].train.indices)


def test_cifar100_missing_says_where_and_how_to_download(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_benchmark("cifar100", tmp_path)
    message = str(err.value)
    assert "cifar-100-python" in message and str(tmp_path) in message
    assert "`download`" in message and "\n" not in message


def test_cifar100_download_goes_through_torchvision(tmp_path, fake_md5, monkeypatch):
    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kwargs):
        calls.append(url)
        write_fake_cifar100(Path(download_root))

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", fake_download)
    with pytest.raises(DataNotFoundError):
        load_benchmark("cifar100", tmp_path, img_size=SIZE)
    assert calls == []
    bench = load_benchmark("cifar100", tmp_path, img_size=SIZE, download=True)
    assert calls == ["https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"]
    assert bench.num_classes == 100


# ---------------------------------------------------------------- folder-per-class datasets


def test_imagenet_r_seeded_80_20_split(tmp_path):
    wnids = [f"n{k * 7919 % 100003:08d}" for k in range(200)]  # written unsorted
    write_class_tree(tmp_path / "imagenet-r", wnids, per_class=5)
    bench = load_benchmark("imagenet-r", tmp_path, img_size=SIZE)
    check_benchmark(bench, "imagenet-r", sorted(wnids))
    check_files_match_labels(bench)
    assert [len(t.train) for t in bench.tasks] == [80] * 10
    assert [len(t.test) for t in bench.tasks] == [20] * 10
    again = load_benchmark("imagenet-r", tmp_path, img_size=SIZE, seed=5)
    assert paths_of(again.tasks[4].test) == paths_of(bench.tasks[4].test)


def test_caltech256_drops_clutter(tmp_path):
    names = [f"{k:03d}.object{k}" for k in range(1, 258)]
    assert names[-1] == "257.object257"
    names[-1] = "257.clutter"
    write_class_tree(tmp_path / "256_ObjectCategories", names, per_class=2)
    (tmp_path / "256_ObjectCategories" / "001.object1" / "notes.txt").write_text("not an image")
    bench = load_benchmark("caltech256", tmp_path, img_size=SIZE)
    check_benchmark(bench, "caltech256", names[:256])
    check_files_match_labels(bench)
    assert "257.clutter" not in bench.class_names
    assert sum(len(t.train) for t in bench.tasks) == sum(len(t.test) for t in bench.tasks) == 256


def test_resisc45(tmp_path):
    names = sorted(["airplane", "airport", "baseball_diamond"] + [f"class_{k:02d}" for k in range(42)])
    write_class_tree(tmp_path / "NWPU-RESISC45", names, per_class=10)
    bench = load_benchmark("resisc45", tmp_path, img_size=SIZE)
    check_benchmark(bench, "resisc45", names)
    check_files_match_labels(bench)
    assert [len(t.train) for t in bench.tasks] == [40] * 9
    assert [len(t.test) for t in bench.tasks] == [10] * 9


def test_wrong_number_of_class_folders(tmp_path):
    write_class_tree(tmp_path / "NWPU-RESISC45", [f"c{k:02d}" for k in range(44)], per_class=2)
    with pytest.raises(DataNotFoundError, match="expected 45 class folders"):
        load_benchmark("resisc45", tmp_path, img_size=SIZE)


def test_class_with_one_image_cannot_be_split(tmp_path):
    write_class_tree(tmp_path / "NWPU-RESISC45", [f"c{k:02d}" for k in range(45)], per_class=2)
    (tmp_path / "NWPU-RESISC45" / "c07" / "img_01.jpg").unlink()
    with pytest.raises(DataNotFoundError, match="c07"):
        load_benchmark("resisc45", tmp_path, img_size=SIZE)


# ---------------------------------------------------------------- official split lists


def test_cub200_official_split(tmp_path):
    folder = tmp_path / "CUB_200_2011"
    classes = [f"{k:03d}.Bird_{k}" for k in range(1, 201)]
    images, labels, split = [], [], []
    test_files = set()
    for k, name in enumerate(classes):
        for j, is_train in enumerate((1, 0, 1)):
            rel = f"{name}/{name}_{j}.jpg"
            write_image(folder / "images" / rel, k)
            image_id = len(images) + 1
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {k + 1}")
            split.append(f"{image_id} {is_train}")
            if not is_train:
                test_files.add(str(folder / "images" / rel))
    for file, lines in (
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split),
        ("classes.txt", [f"{k} {name}" for k, name in enumerate(classes, 1)]),
    ):
        (folder / file).write_text("\n".join(lines) + "\n")
    bench = load_benchmark("cub200", tmp_path, img_size=SIZE)
    check_benchmark(bench, "cub200", classes)
    check_files_match_labels(bench)
    assert set().union(*(paths_of(t.test) for t in bench.tasks)) == test_files
    assert [len(t.train) for t in bench.tasks] == [40] * 10


def test_mit67_official_lists(tmp_path):
    folder = tmp_path / "mit67"
    classes = sorted(["kitchen", "bathroom", "bar"] + [f"room_{k:02d}" for k in range(64)])
    write_class_tree(folder / "Images", classes, per_class=3)  # img_02 is in neither list
    train = [f"{c}/img_00.jpg" for c in classes]
    test = [f"{c}/img_01.jpg" for c in classes]
    (folder / "TrainImages.txt").write_text("\r\n".join(train) + "\r\n")
    (folder / "TestImages.txt").write_text("\n".join(test))
    bench = load_benchmark("mit67", tmp_path, img_size=SIZE)
    check_benchmark(bench, "mit67", classes)
    check_files_match_labels(bench)
    assert [len(t.train) for t in bench.tasks] == [7] * 7 + [6] * 3
    assert all(Path(p).name == "img_01.jpg" for t in bench.tasks for p in paths_of(t.test))
    (folder / "Images" / "bar" / "img_01.jpg").unlink()
    with pytest.raises(DataNotFoundError, match="bar"):
        load_benchmark("mit67", tmp_path, img_size=SIZE)


# ---------------------------------------------------------------- CropDisease


CROP_CLASSES = sorted(f"Plant{k % 7}___disease_{k:02d}" for k in range(38))


def test_cropdisease_train_test_trees(tmp_path):
    write_class_tree(tmp_path / "cropdisease" / "train", CROP_CLASSES, per_class=3)
    write_class_tree(tmp_path / "cropdisease" / "test", CROP_CLASSES, per_class=1)
    bench = load_benchmark("cropdisease", tmp_path, img_size=SIZE)
    check_benchmark(bench, "cropdisease", CROP_CLASSES[:35])
    check_files_match_labels(bench)
    assert [len(t.train) for t in bench.tasks] == [15] * 7
    assert [len(t.test) for t in bench.tasks] == [5] * 7
    x, y = bench.tasks[2].test[0]  # ImageNet normalisation of a constant gray image
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    assert torch.allclose(x, ((y / 255 - mean) / std).expand_as(x), atol=1e-5)


def test_cropdisease_single_tree_is_split(tmp_path):
    write_class_tree(tmp_path / "cropdisease", CROP_CLASSES, per_class=5)
    bench = load_benchmark("cropdisease", tmp_path, img_size=SIZE)
    check_benchmark(bench, "cropdisease", CROP_CLASSES[:35])
    check_files_match_labels(bench)
    assert [len(t.train) for t in bench.tasks] == [20] * 7
    assert [len(t.test) for t in bench.tasks] == [5] * 7


# ---------------------------------------------------------------- errors


def test_unknown_name_lists_the_known_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_benchmark("cifar10", tmp_path)
    for name in DATASETS:
        assert name in str(err.value)


@pytest.mark.parametrize("name", [n for n in DATASETS if n != "cifar100"])
def test_missing_dataset_says_which_folder(tmp_path, name):
    with pytest.raises(DataNotFoundError) as err:
        load_benchmark(name, tmp_path, download=True)
    message = str(err.value)
    assert DATASETS[name].folder in message and str(tmp_path) in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"img_size": 0}, "img_size"),
        ({"img_size": -3}, "img_size"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"seed": -1}, "seed"),
        ({"img_size": "16"}, "img_size"),
        ({"val_fraction": "0.1"}, "val_fraction"),
    ],
)
def test_bad_arguments_name_the_argument(tmp_path, kwargs, argument):
    with pytest.raises(ConfigError, match=argument):
        load_benchmark("resisc45", tmp_path, **kwargs)


def test_cifar100_corrupted_files_say_how_to_fix(tmp_path):
    write_fake_cifar100(tmp_path)  # real torchvision MD5 check: the fake files fail it
    with pytest.raises(DataNotFoundError, match="`download`"):
        load_benchmark("cifar100", tmp_path, img_size=SIZE)
