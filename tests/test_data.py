"""The experiments' data: CIFAR-100 hierarchy, pickle loaders, digits and the tensor dataset."""

from __future__ import annotations

import itertools
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from auxgen.experiments import datasets, hierarchies
from auxgen.experiments.augment import TensorImageDataset, random_crop_flip
from auxgen.experiments.cifar import (
    ChecksumWarning,
    CIFAR100Dataset,
    load_cifar10,
    load_cifar100,
)
from auxgen.experiments.datasets import load_digits_hierarchy
from auxgen.experiments.hierarchies import (
    CIFAR100_10_TO_3,
    CIFAR100_COARSE_TO_10,
    CIFAR100_FINE_TO_COARSE,
    CIFAR100_LEVEL_NAMES,
    CIFAR100_LEVELS,
    cifar100_hierarchy,
    cifar100_labels,
    hierarchy_aux_names,
    hierarchy_psi,
)
from auxgen.hierarchy import owner_index, psi_offsets

LEVEL_PAIRS = [(p, a) for p, a in itertools.combinations(CIFAR100_LEVELS, 2)]

# --------------------------------------------------------------------------------------------
# hierarchy
# --------------------------------------------------------------------------------------------


def test_fine_to_coarse_table_is_the_standard_one():
    table = CIFAR100_FINE_TO_COARSE
    assert len(table) == 100
    assert sorted(set(table)) == list(range(20))
    assert np.bincount(table).tolist() == [5] * 20
    # spot checks from the official class list
    names = hierarchies.CIFAR100_FINE_NAMES
    coarse = hierarchies.CIFAR100_COARSE_NAMES
    assert coarse[table[names.index("beaver")]] == "aquatic_mammals"
    assert coarse[table[names.index("mushroom")]] == "fruit_and_vegetables"
    assert coarse[table[names.index("bear")]] == "large_carnivores"
    assert coarse[table[names.index("worm")]] == "non-insect_invertebrates"
    assert coarse[table[names.index("tractor")]] == "vehicles_2"


def test_maxl_groupings_match_the_original_repository():
    # class_10 and class_3 of lorenmt/maxl create_dataset.py
    class_10 = {0: 1, 1: 2, 2: 5, 3: 6, 4: 5, 5: 6, 6: 6, 7: 3, 8: 0, 9: 7,
                10: 8, 11: 0, 12: 1, 13: 3, 14: 4, 15: 0, 16: 2, 17: 5, 18: 9, 19: 9}  # fmt: skip
    class_3 = {0: 0, 1: 0, 2: 0, 3: 0, 4: 0, 5: 1, 6: 2, 7: 2, 8: 2, 9: 2}
    assert tuple(class_10[c] for c in range(20)) == CIFAR100_COARSE_TO_10
    assert tuple(class_3[g] for g in range(10)) == CIFAR100_10_TO_3


def test_hierarchy_is_a_proper_tree():
    h = cifar100_hierarchy()
    assert sorted(h) == [3, 10, 20, 100]
    assert h[100] == tuple(range(100))
    for level, labels in h.items():
        assert len(labels) == 100
        # every node at every level is non-empty
        assert sorted(set(labels)) == list(range(level))
        assert len(CIFAR100_LEVEL_NAMES[level]) == level
    # the maps compose 100 -> 20 -> 10 -> 3
    for f in range(100):
        assert h[20][f] == CIFAR100_FINE_TO_COARSE[f]
        assert h[10][f] == CIFAR100_COARSE_TO_10[h[20][f]]
        assert h[3][f] == CIFAR100_10_TO_3[h[10][f]]
    # each node at a finer level has exactly one parent at every coarser level
    for coarse_level, fine_level in LEVEL_PAIRS:
        parents: dict[int, set[int]] = {}
        for f in range(100):
            parents.setdefault(h[fine_level][f], set()).add(h[coarse_level][f])
        assert len(parents) == fine_level
        assert all(len(p) == 1 for p in parents.values())


def test_hierarchy_returns_fresh_dicts():
    h = cifar100_hierarchy()
    h[3] = ()
    assert len(cifar100_hierarchy()[3]) == 100


def test_hierarchy_psi_20_100():
    psi, fine_to_aux = hierarchy_psi(20, 100)
    assert psi == (5,) * 20
    assert sorted(fine_to_aux) == list(range(100))  # a bijection
    owner = owner_index(psi)
    for f in range(100):
        assert int(owner[fine_to_aux[f]]) == CIFAR100_FINE_TO_COARSE[f]
    # children keep the order of the fine labels: aquatic mammals are 4, 30, 55, 72, 95
    assert [fine_to_aux[f] for f in (4, 30, 55, 72, 95)] == [0, 1, 2, 3, 4]
    names = hierarchy_aux_names(20, 100)
    assert names[:5] == ("beaver", "dolphin", "otter", "seal", "whale")


@pytest.mark.parametrize(("primary", "aux"), LEVEL_PAIRS)
def test_hierarchy_psi_all_pairs(primary, aux):
    h = cifar100_hierarchy()
    psi, fine_to_aux = hierarchy_psi(primary, aux)
    assert len(psi) == primary and sum(psi) == aux
    assert all(p >= 1 for p in psi)
    assert len(fine_to_aux) == 100
    assert sorted(set(fine_to_aux)) == list(range(aux))
    owner = owner_index(psi)
    offsets = psi_offsets(psi)
    for f in range(100):
        i = h[primary][f]
        assert int(owner[fine_to_aux[f]]) == i
        assert offsets[i] <= fine_to_aux[f] < offsets[i] + psi[i]
    # two fine classes share an auxiliary class iff they share the aux-level label
    for f, g in itertools.combinations(range(100), 2):
        assert (fine_to_aux[f] == fine_to_aux[g]) == (h[aux][f] == h[aux][g])
    names = hierarchy_aux_names(primary, aux)
    assert sorted(names) == sorted(CIFAR100_LEVEL_NAMES[aux])
    for f in range(100):
        assert names[fine_to_aux[f]] == CIFAR100_LEVEL_NAMES[aux][h[aux][f]]


def test_hierarchy_psi_known_values():
    assert hierarchy_psi(3, 10)[0] == (5, 1, 4)
    assert hierarchy_psi(3, 20)[0] == (10, 3, 7)
    assert hierarchy_psi(3, 100)[0] == (50, 15, 35)
    assert hierarchy_psi(10, 20)[0] == (3, 2, 2, 2, 1, 3, 3, 1, 1, 2)
    assert sum(hierarchy_psi(10, 100)[0]) == 100


def test_hierarchy_psi_errors():
    with pytest.raises(ValueError, match="aux_level must be a finer level"):
        hierarchy_psi(20, 20)
    with pytest.raises(ValueError, match="aux_level must be a finer level"):
        hierarchy_psi(100, 20)
    with pytest.raises(ValueError, match=r"primary_level must be one of .*got 7"):
        hierarchy_psi(7, 100)
    with pytest.raises(TypeError, match="aux_level must be an int"):
        hierarchy_psi(3, "10")


def test_cifar100_labels():
    fine = torch.tensor([[0, 3], [99, 55]])
    assert cifar100_labels(fine, 20).tolist() == [[4, 8], [13, 0]]
    assert cifar100_labels(fine, 3).tolist() == [[1, 0], [0, 0]]
    assert cifar100_labels(fine, 100).tolist() == fine.tolist()
    with pytest.raises(ValueError, match=r"fine labels must lie in \[0, 100\)"):
        cifar100_labels(torch.tensor([100]), 20)
    with pytest.raises(TypeError, match="fine must be an integer torch.Tensor"):
        cifar100_labels(torch.tensor([1.0]), 20)
    with pytest.raises(ValueError, match="level must be one of"):
        cifar100_labels(fine, 5)


# --------------------------------------------------------------------------------------------
# fake CIFAR files in torchvision's pickle format
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def test_digits_hierarchy():
    d = load_digits_hierarchy(test_fraction=0.3, seed=0)
    n_train, n_test = d.x_train.shape[0], d.x_test.shape[0]
    assert n_train + n_test == 1797
    assert abs(n_test - 0.3 * 1797) <= 1
    assert d.x_train.shape[1:] == (1, 8, 8) and d.x_train.dtype == torch.float32
    assert d.x_test.shape[1:] == (1, 8, 8) and d.x_test.dtype == torch.float32
    for t in (d.y_train, d.y_test, d.aux_train, d.aux_test, d.fine_train, d.fine_test):
        assert t.dtype == torch.int64
    assert d.psi == (5, 5) and d.num_classes == 2 and d.num_aux_classes == 10
    assert d.class_names == ("0-4", "5-9")
    assert d.aux_class_names == tuple("0123456789")
    # standardised with the training statistics
    assert abs(float(d.x_train.mean())) < 1e-4
    assert abs(float(d.x_train.std()) - 1.0) < 1e-3
    # aux is the digit, and a child of its primary class
    assert torch.equal(d.aux_train, d.fine_train) and torch.equal(d.aux_test, d.fine_test)
    assert torch.equal(d.y_train, (d.fine_train >= 5).long())
    owner = owner_index(d.psi)
    assert torch.equal(owner[d.aux_train], d.y_train)
    assert torch.equal(owner[d.aux_test], d.y_test)
    # balanced primary classes, every digit present, stratified split
    for y in (d.y_train, d.y_test):
        assert 0.45 < float(y.float().mean()) < 0.55
    train_frac = torch.bincount(d.fine_train, minlength=10) / n_train
    test_frac = torch.bincount(d.fine_test, minlength=10) / n_test
    assert (train_frac > 0.08).all()
    assert torch.allclose(train_frac, test_frac, atol=0.01)


def test_digits_hierarchy_is_deterministic():
    a = load_digits_hierarchy(test_fraction=0.25, seed=3)
    b = load_digits_hierarchy(test_fraction=0.25, seed=3)
    c = load_digits_hierarchy(test_fraction=0.25, seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.fine_test, c.fine_test)


def test_digits_hierarchy_errors():
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\), got 1.5"):
        load_digits_hierarchy(test_fraction=1.5)
    with pytest.raises(TypeError, match="test_fraction must be a float"):
        load_digits_hierarchy(test_fraction="0.3")
    with pytest.raises(TypeError, match="seed must be an int"):
        load_digits_hierarchy(seed=1.5)


# --------------------------------------------------------------------------------------------
# augmentation and TensorImageDataset
# --------------------------------------------------------------------------------------------


def _windows(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """Every crop (and its flip) of the zero-padded image."""
    _, h, w = image.shape
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    out = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            out += [crop, crop.flip(-1)]
    return out


def test_random_crop_flip_single_and_batch():
    g = torch.Generator().manual_seed(0)
    batch = torch.rand(6, 3, 8, 8, generator=g)
    out = random_crop_flip(batch, padding=2, generator=torch.Generator().manual_seed(1))
    assert out.shape == batch.shape and out.dtype == batch.dtype
    for b in range(6):
        assert any(torch.equal(out[b], w) for w in _windows(batch[b], 2))
    single = random_crop_flip(batch[0], padding=2, generator=torch.Generator().manual_seed(1))
    assert single.shape == (3, 8, 8)
    assert any(torch.equal(single, w) for w in _windows(batch[0], 2))
    # crops differ across the batch (independent draws), and the result is reproducible
    out2 = random_crop_flip(batch, padding=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, out2)
    # flip only
    flipped = random_crop_flip(batch, padding=0, generator=torch.Generator().manual_seed(2))
    for b in range(6):
        assert torch.equal(flipped[b], batch[b]) or torch.equal(flipped[b], batch[b].flip(-1))
    # uint8 works and pads with zeros
    ones = torch.ones(3, 32, 32, dtype=torch.uint8)
    crop = random_crop_flip(ones, padding=4, generator=torch.Generator().manual_seed(0))
    assert crop.dtype == torch.uint8 and int(crop.sum()) >= 3 * 28 * 28
    with pytest.raises(ValueError, match="x must be an image tensor"):
        random_crop_flip(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="padding must be a non-negative int"):
        random_crop_flip(batch, padding=-1)


def test_tensor_image_dataset_items_and_normalisation():
    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 1, 0])
    aux = torch.tensor([1, 3, 5, 4, 0])
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ds = TensorImageDataset(images, y, aux, mean=mean, std=std)
    assert len(ds) == 5
    x, yi, ai, idx = ds[2]
    assert x.dtype == torch.float32 and x.shape == (3, 4, 4)
    expected = (images[2].float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(
        std
    ).view(3, 1, 1)
    assert torch.allclose(x, expected)
    assert int(yi) == 2 and int(ai) == 5 and idx == 2
    # float images are used as they are; no aux -> -1
    ds = TensorImageDataset(images.float(), y)
    x, _, ai, _ = ds[0]
    assert torch.equal(x, images[0].float()) and int(ai) == -1
    loader = DataLoader(ds, batch_size=4, shuffle=False)
    xb, yb, ab, ib = next(iter(loader))
    assert xb.shape == (4, 3, 4, 4) and yb.dtype == torch.int64
    assert ab.tolist() == [-1] * 4 and ib.tolist() == [0, 1, 2, 3]


def test_tensor_image_dataset_augmentation_is_reproducible():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    y = torch.zeros(4, dtype=torch.long)

    def run(seed: int) -> torch.Tensor:
        ds = TensorImageDataset(
            images,
            y,
            mean=datasets.CIFAR100_MEAN,
            std=datasets.CIFAR100_STD,
            augment=True,
            generator=torch.Generator().manual_seed(seed),
        )
        return torch.stack([ds[i][0] for i in range(4) for _ in range(3)])

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (12, 3, 32, 32)
    # global-seed path
    ds = TensorImageDataset(images, y, augment=True)
    torch.manual_seed(5)
    first = ds[0][0]
    torch.manual_seed(5)
    assert torch.equal(first, ds[0][0])
    assert any(torch.equal(first, w) for w in _windows(images[0].float() / 255, 4))


def test_tensor_image_dataset_errors():
    images = torch.zeros(3, 1, 4, 4)
    y = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"images must have shape \(N, C, H, W\)"):
        TensorImageDataset(images[0], y)
    with pytest.raises(TypeError, match="images must be uint8 or floating"):
        TensorImageDataset(images.long(), y)
    with pytest.raises(ValueError, match=r"y must have one label per image \(3\), got 2"):
        TensorImageDataset(images, y[:2])
    with pytest.raises(TypeError, match="aux must be an integer tensor"):
        TensorImageDataset(images, y, aux=torch.zeros(3))
    with pytest.raises(ValueError, match="mean and std must be given together"):
        TensorImageDataset(images, y, mean=(0.5,))
    with pytest.raises(ValueError, match=r"one entry per channel \(1\)"):
        TensorImageDataset(images, y, mean=(0.5, 0.5), std=(1.0, 1.0))
    with pytest.raises(ValueError, match="std entries must be positive"):
        TensorImageDataset(images, y, mean=(0.5,), std=(0.0,))
