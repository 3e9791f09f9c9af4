"""The CIFAR pickle loaders (``auxgen/experiments/cifar.py``) on fake files in torchvision's
format, and a local copy of CIFAR-100 where there is one.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from auxgen.experiments import hierarchies
from auxgen.experiments.cifar import (
    ChecksumWarning,
    CIFAR100Dataset,
    load_cifar10,
    load_cifar100,
)
from auxgen.experiments.hierarchies import CIFAR100_FINE_TO_COARSE


def _dump(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _fake_cifar100(root: Path, n_train: int = 12, n_test: int = 7, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, 100, size=n).tolist()
        batch = {
            "filenames": [f"img_{i}.png" for i in range(n)],
            "batch_label": f"{split} batch",
            "fine_labels": fine,
            "coarse_labels": [CIFAR100_FINE_TO_COARSE[f] for f in fine],
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        }
        _dump(root / "cifar-100-python" / split, batch)
        out[split] = batch
    _dump(
        root / "cifar-100-python" / "meta",
        {
            "fine_label_names": list(hierarchies.CIFAR100_FINE_NAMES),
            "coarse_label_names": list(hierarchies.CIFAR100_COARSE_NAMES),
        },
    )
    return out


def _fake_cifar10(root: Path, n: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "batch_label": name,
            "labels": rng.integers(0, 10, size=n).tolist(),
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        }
        _dump(root / "cifar-10-batches-py" / name, batch)
        out[name] = batch
    return out


@pytest.mark.filterwarnings("ignore::auxgen.experiments.cifar.ChecksumWarning")
@pytest.mark.parametrize("train", [True, False])
def test_load_cifar100_round_trip(tmp_path, train):
    fake = _fake_cifar100(tmp_path)
    batch = fake["train" if train else "test"]
    images, fine, coarse = load_cifar100(tmp_path, train=train)
    n = len(batch["fine_labels"])
    assert images.shape == (n, 3, 32, 32) and images.dtype == torch.uint8
    assert fine.dtype == torch.int64 and coarse.dtype == torch.int64
    assert fine.tolist() == batch["fine_labels"]
    assert coarse.tolist() == batch["coarse_labels"]
    # rows are CHW: the first 1024 bytes are the red channel
    assert np.array_equal(images.numpy(), batch["data"].reshape(n, 3, 32, 32))
    assert np.array_equal(images[0, 0].flatten().numpy(), batch["data"][0, :1024])
    # a str path works too
    images2, _, _ = load_cifar100(str(tmp_path), train=train)
    assert torch.equal(images, images2)


def test_load_cifar100_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python.*--download.*--data-dir"):
        load_cifar100(tmp_path / "nowhere", train=True)
    message = ""
    try:
        load_cifar100(tmp_path, train=False)
    except FileNotFoundError as e:
        message = str(e)
    assert "\n" not in message
    assert str(tmp_path / "cifar-100-python" / "test") in message


def test_load_cifar100_download_uses_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets.cifar

    calls = []

    def fake_download(url, root, filename, md5):
        calls.append((root, filename))
        _fake_cifar100(Path(root))

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", fake_download)
    with pytest.warns(ChecksumWarning):  # the fake files are not the official ones
        images, fine, _ = load_cifar100(tmp_path, train=True, download=True)
    assert calls == [(str(tmp_path), "cifar-100-python.tar.gz")]
    assert images.shape[0] == fine.shape[0] == 12
    # already present: no second download
    with pytest.warns(ChecksumWarning):
        load_cifar100(tmp_path, train=False, download=True)
    assert len(calls) == 1


def test_cifar100_files_that_differ_from_the_release_are_read_with_a_warning(tmp_path):
    fake = _fake_cifar100(tmp_path)
    with pytest.warns(ChecksumWarning, match=r"cifar-100-python.test: md5 differs"):
        ds = CIFAR100Dataset(tmp_path, train=False)
    n = len(fake["test"]["fine_labels"])
    assert len(ds) == n and ds.images.shape == (n, 3, 32, 32) and ds.data.shape == (n, 32, 32, 3)
    assert ds.targets == fake["test"]["fine_labels"]
    assert ds.coarse_labels.tolist() == fake["test"]["coarse_labels"]
    image, label = ds[0]  # torchvision's item: a PIL image and the fine label
    assert image.size == (32, 32) and label == fake["test"]["fine_labels"][0]
    assert ds.classes[label] == hierarchies.CIFAR100_FINE_NAMES[label]


DATA_DIR = Path(os.environ.get("AUXGEN_DATA_DIR", "~/data")).expanduser()


@pytest.mark.skipif(
    not (DATA_DIR / "cifar-100-python" / "test").is_file(),
    reason="no CIFAR-100 copy in AUXGEN_DATA_DIR (default ~/data)",
)
def test_local_cifar100_copy_loads():
    from torchvision.datasets.utils import check_integrity

    path = DATA_DIR / "cifar-100-python" / "test"
    official = check_integrity(str(path), CIFAR100Dataset.test_list[0][1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images, fine, coarse = load_cifar100(DATA_DIR, train=False)
    md5 = [w for w in caught if issubclass(w.category, ChecksumWarning)]
    assert len(md5) == (0 if official else 1), [str(w.message) for w in caught]
    assert images.shape == (10000, 3, 32, 32) and images.dtype == torch.uint8
    assert fine.shape == coarse.shape == (10000,)
    assert torch.bincount(fine, minlength=100).tolist() == [100] * 100


def test_load_cifar100_malformed(tmp_path):
    fake = _fake_cifar100(tmp_path)
    path = tmp_path / "cifar-100-python" / "train"

    path.write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match="not a valid CIFAR pickle"):
        load_cifar100(tmp_path, train=True)

    _dump(path, [1, 2, 3])
    with pytest.raises(ValueError, match="expected a dict, got list"):
        load_cifar100(tmp_path, train=True)

    good = fake["train"]
    _dump(path, {k: v for k, v in good.items() if k != "fine_labels"})
    with pytest.raises(ValueError, match="missing key 'fine_labels'"):
        load_cifar100(tmp_path, train=True)

    _dump(path, {**good, "data": good["data"][:, :100]})
    with pytest.raises(ValueError, match=r"shape \(N, 3072\)"):
        load_cifar100(tmp_path, train=True)

    _dump(path, {**good, "fine_labels": good["fine_labels"][:-1]})
    with pytest.raises(ValueError, match="one label per image"):
        load_cifar100(tmp_path, train=True)

    _dump(path, {**good, "fine_labels": [100] + good["fine_labels"][1:]})
    with pytest.raises(ValueError, match=r"'fine_labels' must lie in \[0, 100\)"):
        load_cifar100(tmp_path, train=True)

    wrong = list(good["coarse_labels"])
    wrong[3] = (wrong[3] + 1) % 20
    _dump(path, {**good, "coarse_labels": wrong})
    with pytest.raises(ValueError, match="disagree with CIFAR100_FINE_TO_COARSE.*sample 3"):
        load_cifar100(tmp_path, train=True)


def test_load_cifar100_bad_data_dir_type():
    with pytest.raises(TypeError, match="data_dir must be a str or os.PathLike"):
        load_cifar100(123, train=True)


@pytest.mark.filterwarnings("ignore::auxgen.experiments.cifar.ChecksumWarning")
def test_load_cifar10_round_trip(tmp_path):
    fake = _fake_cifar10(tmp_path)
    images, labels = load_cifar10(tmp_path, train=True)
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    expected = sum((fake[f"data_batch_{i}"]["labels"] for i in range(1, 6)), [])
    assert labels.tolist() == expected
    first = fake["data_batch_1"]["data"].reshape(-1, 3, 32, 32)
    assert np.array_equal(images[:4].numpy(), first)
    test_images, test_labels = load_cifar10(tmp_path, train=False)
    assert test_images.shape == (4, 3, 32, 32)
    assert test_labels.tolist() == fake["test_batch"]["labels"]


def test_load_cifar10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*--download"):
        load_cifar10(tmp_path, train=True)
    fake = _fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar10(tmp_path, train=True)
    _dump(
        tmp_path / "cifar-10-batches-py" / "test_batch",
        {**fake["test_batch"], "labels": [10, 0, 0, 0]},
    )
    with pytest.raises(ValueError, match=r"'labels' must lie in \[0, 10\)"):
        load_cifar10(tmp_path, train=False)
