"""Tests for nodes.data: readers on generated fixtures, the real Fashion-MNIST, partitions."""

from __future__ import annotations

import csv
import gzip
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nodes.data import (
    DATASETS,
    HAM_CLASSES,
    ArrayDataset,
    dataset_info,
    load_dataset,
    partition,
)

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")

# ----------------------------------------------------------------------------- fixtures


def write_idx(path: Path, array: np.ndarray, magic: bytes | None = None) -> None:
    """Write a uint8 array in IDX format (gzip if the name ends in .gz)."""
    header = magic or bytes([0, 0, 0x08, array.ndim])
    header += np.asarray(array.shape, ">u4").tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_idx_root(root: Path, gz: bool = True, n_train: int = 6, n_test: int = 3) -> dict:
    """MNIST/Fashion-MNIST layout; image k is filled with value 10*label + k."""
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    made = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) * 3 + 1) % 10
        images = np.broadcast_to((10 * labels + np.arange(n))[:, None, None], (n, 28, 28))
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels)
        made[prefix] = (images, labels)
    return made


def make_cifar_root(root: Path, per_file: int = 2) -> None:
    """cifar-10-batches-bin layout: record = label byte + R, G, B planes; pixels = 20*label."""
    root.mkdir(parents=True)
    names = [f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]
    for f, name in enumerate(names):
        labels = (np.arange(per_file) + f) % 10
        recs = np.concatenate(
            [labels[:, None], np.repeat(20 * labels[:, None], 3072, axis=1)], axis=1
        )
        recs.astype(np.uint8).tofile(root / name)


def make_ham_root(root: Path, per_class: int = 3) -> list[dict]:
    """HAM10000 layout; each JPEG is a solid colour whose red value encodes its dx class."""
    rows = []
    for c, dx in enumerate(HAM_CLASSES):
        for k in range(per_class):
            rows.append({"lesion_id": f"HAM_{c}{k // 2}", "image_id": f"ISIC_{c:03d}{k:02d}",
                         "dx": dx, "dx_type": "histo", "age": "50.0", "sex": "male",
                         "localization": "back"})
    for i, r in enumerate(rows):
        sub = root / f"HAM10000_images_part_{1 + i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        colour = (30 * HAM_CLASSES.index(r["dx"]) + 20, 128, 60)
        Image.new("RGB", (40, 30), colour).save(sub / f"{r['image_id']}.jpg", quality=95)
    with open(root / "HAM10000_metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


def pixels(d: ArrayDataset) -> torch.Tensor:
    """Undo the standardisation: back to [0, 255]."""
    s = DATASETS[d.name]
    mean = torch.tensor(s.mean).view(1, -1, 1, 1)
    std = torch.tensor(s.std).view(1, -1, 1, 1)
    return (d.x * std + mean) * 255


# ----------------------------------------------------------------------------- readers


@pytest.mark.parametrize("name,gz", [("fashion-mnist", True), ("mnist", True), ("mnist", False)])
def test_idx_fixture_loads_with_shapes_labels_and_pixels(tmp_path: Path, name: str, gz: bool):
    made = make_idx_root(tmp_path, gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        d = load_dataset(name, split, root=str(tmp_path))
        images, labels = made[prefix]
        assert d.x.shape == (len(labels), 1, 28, 28) and d.x.dtype == torch.float32
        assert d.y.dtype == torch.int64 and d.y.tolist() == labels.tolist()
        assert torch.allclose(pixels(d)[:, 0], torch.from_numpy(images.copy()).float(), atol=1e-3)
        assert d.num_classes == 10 and d.name == name


@pytest.mark.parametrize(
    "corrupt,match",
    [("magic", "magic"), ("truncate", "size mismatch"), ("ndim", "dimensions")],
)
def test_corrupted_idx_file_raises_naming_the_file(tmp_path: Path, corrupt: str, match: str):
    make_idx_root(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    images = np.zeros((6, 28, 28), np.uint8)
    if corrupt == "magic":
        write_idx(bad, images, magic=b"\x08\x03\x00\x00")
    elif corrupt == "truncate":
        write_idx(bad, images[:, :27])
        with gzip.open(bad, "rb") as f:
            raw = f.read()
        with gzip.open(bad, "wb") as f:  # header still claims 27 rows; drop some bytes
            f.write(raw[:-5])
    else:
        write_idx(bad, images.reshape(6, -1))
    with pytest.raises(ValueError, match=match) as e:
        load_dataset("fashion-mnist", root=str(tmp_path))
    assert str(bad) in str(e.value)


def test_missing_files_raise_file_not_found_with_path_and_how_to_get(tmp_path: Path):
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("fashion-mnist", root=str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-bin"):
        load_dataset("cifar10", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="HAM10000_metadata.csv"):
        load_dataset("ham10000", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no root given"):
        load_dataset("mnist")


def test_bad_name_split_or_limit_raise_value_error_listing_choices():
    with pytest.raises(ValueError, match=r"name: .*'nope'.*cifar10.*digits"):
        load_dataset("nope")
    with pytest.raises(ValueError, match=r"split: .*'val'.*\['train', 'test'\]"):
        load_dataset("digits", "val")
    with pytest.raises(ValueError, match="limit"):
        load_dataset("digits", limit=0)
    with pytest.raises(ValueError, match="name: "):
        dataset_info("imagenet")


def test_dataset_info_matches_loaded_shapes_without_loading(tmp_path: Path):
    assert set(DATASETS) == {"fashion-mnist", "mnist", "digits", "cifar10", "ham10000",
                             "synthetic32"}
    assert dataset_info("cifar10") == {"in_channels": 3, "image_size": 32, "num_classes": 10}
    assert dataset_info("ham10000") == {"in_channels": 3, "image_size": 64, "num_classes": 7}
    for name in ("digits", "synthetic32"):
        d = load_dataset(name, limit=4)
        info = dataset_info(name)
        assert d.x.shape[1:] == (info["in_channels"], info["image_size"], info["image_size"])


def test_cifar10_binary_fixture_loads_train_batches_and_test(tmp_path: Path):
    root = tmp_path / "cifar-10-batches-bin"
    make_cifar_root(root)
    train = load_dataset("cifar10", root=str(root))
    test = load_dataset("cifar10", "test", root=str(root))
    assert train.x.shape == (10, 3, 32, 32) and test.x.shape == (2, 3, 32, 32)
    assert train.y.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5] and test.y.tolist() == [5, 6]
    for d in (train, test):
        expect = (20 * d.y).float().view(-1, 1, 1, 1).expand(-1, 3, 32, 32)
        assert torch.allclose(pixels(d), expect, atol=1e-3)
    (root / "test_batch.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="test_batch.bin"):
        load_dataset("cifar10", "test", root=str(root))


def test_ham10000_fixture_loads_with_labels_from_dx_and_grouped_split(tmp_path: Path):
    rows = make_ham_root(tmp_path)
    train = load_dataset("ham10000", root=str(tmp_path))
    test = load_dataset("ham10000", "test", root=str(tmp_path), image_size=16)
    assert train.x.shape[1:] == (3, 64, 64) and test.x.shape[1:] == (3, 16, 16)
    assert len(train) + len(test) == len(rows) and len(test) > 0
    assert train.num_classes == 7 and sorted(set(train.y.tolist())) == list(range(7))
    for d in (train, test):  # red channel encodes the class: labels come from dx
        red = pixels(d)[:, 0].mean(dim=(1, 2))
        assert torch.allclose(red, 30 * d.y.float() + 20, atol=3)
    assert torch.equal(load_dataset("ham10000", root=str(tmp_path)).y, train.y)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("digits", image_size=16)


def test_ham10000_missing_image_or_unknown_dx_is_reported(tmp_path: Path):
    rows = make_ham_root(tmp_path, per_class=1)
    gone = rows[0]["image_id"]
    next(tmp_path.glob(f"*/{gone}.jpg")).unlink()
    errors = []
    for split in ("train", "test"):  # it is in exactly one split; `limit` does not hide it
        try:
            load_dataset("ham10000", split, root=str(tmp_path), limit=1)
        except FileNotFoundError as e:
            errors.append(str(e))
    assert len(errors) == 1 and f"{gone}.jpg" in errors[0]
    meta = tmp_path / "HAM10000_metadata.csv"
    meta.write_text(meta.read_text().replace(f",{rows[0]['dx']},", ",melanoma,"))
    with pytest.raises(ValueError, match="melanoma"):
        load_dataset("ham10000", root=str(tmp_path))


def test_digits_load_offline_with_disjoint_covering_splits():
    from sklearn.datasets import load_digits

    train, test = load_dataset("digits"), load_dataset("digits", "test")
    assert len(train) + len(test) == 1797 and abs(len(test) - 0.2 * 1797) < 10
    assert train.num_classes == 10 and set(test.y.tolist()) == set(range(10))
    # digits has no duplicate images, so comparing rows proves disjoint and covering.
    def rows(a: torch.Tensor | np.ndarray) -> set[tuple]:
        return {tuple(r) for r in np.round(np.asarray(a).reshape(len(a), -1), 2).tolist()}

    tr, te = rows(pixels(train) / 255 * 16), rows(pixels(test) / 255 * 16)
    assert not tr & te and tr | te == rows(load_digits().data)


def test_limit_is_a_seeded_deterministic_subset():
    a, b = load_dataset("digits", limit=50, seed=3), load_dataset("digits", limit=50, seed=3)
    c = load_dataset("digits", limit=50, seed=4)
    assert len(a) == 50 and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    sub = a.subset(np.array([0, 2]))
    assert torch.equal(sub.x, a.x[[0, 2]]) and sub.num_classes == 10 and len(sub) == 2
    assert torch.equal(a.subset(torch.tensor([1])).y, a.y[1:2])
    assert torch.equal(a.subset(a.y == a.y[0]).y, a.y[a.y == a.y[0]])


def test_real_fashion_mnist_from_debian_package_loads_with_limit():
    if not (FASHION_ROOT / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"{FASHION_ROOT} absent: apt-get install dataset-fashion-mnist")
    train = load_dataset("fashion-mnist", limit=500, seed=1)
    test = load_dataset("fashion-mnist", "test", limit=200)
    assert train.x.shape == (500, 1, 28, 28) and test.x.shape == (200, 1, 28, 28)
    assert set(train.y.tolist()) == set(range(10))
    assert abs(train.x.mean()) < 0.2 and 0.8 < train.x.std() < 1.2  # standardised
    assert torch.equal(load_dataset("fashion-mnist", "test", limit=200).y, test.y)


# ----------------------------------------------------------------------------- partition


def entropy_per_client(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    ent = []
    for p in parts:
        q = np.bincount(labels[p], minlength=10) / len(p)
        ent.append(-(q[q > 0] * np.log(q[q > 0])).sum())
    return float(np.mean(ent))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_is_disjoint_covering_and_seed_deterministic(scheme: str):
    labels = np.random.default_rng(0).integers(0, 10, 1000)
    parts = partition(labels, 7, scheme=scheme, seed=5)
    assert len(parts) == 7 and all(len(p) > 0 for p in parts)
    flat = np.concatenate(parts)
    assert len(flat) == 1000 and np.array_equal(np.sort(flat), np.arange(1000))
    again = partition(torch.from_numpy(labels), 7, scheme=scheme, seed=5)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again, strict=True))
    other = partition(labels, 7, scheme=scheme, seed=6)
    assert not all(np.array_equal(p, q) for p, q in zip(parts, other, strict=True))
    if scheme == "iid":
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_dirichlet_partition_with_small_alpha_is_more_skewed_than_iid():
    labels = np.random.default_rng(1).integers(0, 10, 2000)
    iid = partition(labels, 10, scheme="iid")
    skew = partition(labels, 10, scheme="dirichlet", alpha=0.1)
    assert entropy_per_client(labels, iid) > 2.2  # close to log(10) = 2.30
    assert entropy_per_client(labels, skew) < entropy_per_client(labels, iid) - 0.8


def test_dirichlet_gives_every_client_a_sample_even_with_tiny_alpha():
    labels = np.repeat(np.arange(3), 20)
    parts = partition(labels, 40, scheme="dirichlet", alpha=0.01, seed=2)
    assert all(len(p) >= 1 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(60))


def test_partition_rejects_bad_scheme_client_count_or_alpha():
    with pytest.raises(ValueError, match=r"scheme: .*'shards'.*iid.*dirichlet"):
        partition(np.zeros(10), 2, scheme="shards")
    with pytest.raises(ValueError, match="num_clients"):
        partition(np.zeros(10), 0)
    with pytest.raises(ValueError, match="num_clients"):
        partition(np.zeros(10), 11)
    with pytest.raises(ValueError, match="alpha"):
        partition(np.zeros(10), 2, scheme="dirichlet", alpha=0)


# ----------------------------------------------------------------------------- offline


def test_loading_never_touches_the_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted during data loading")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    make_idx_root(tmp_path / "idx")
    make_cifar_root(tmp_path / "cifar")
    make_ham_root(tmp_path / "ham")
    assert len(load_dataset("digits", "test")) > 0
    assert len(load_dataset("fashion-mnist", root=str(tmp_path / "idx"))) == 6
    assert len(load_dataset("cifar10", root=str(tmp_path / "cifar"))) == 10
    assert len(load_dataset("ham10000", root=str(tmp_path / "ham"))) > 0
    if (FASHION_ROOT / "t10k-images-idx3-ubyte.gz").is_file():
        assert len(load_dataset("fashion-mnist", "test", limit=10)) == 10


def test_synthetic32_is_deterministic_per_sample_and_cifar_shaped():
    a = load_dataset("synthetic32", "train", limit=6, seed=3)
    b = load_dataset("synthetic32", "train")
    assert a.x.shape == (6, 3, 32, 32) and a.num_classes == 10
    # The same sample index yields the same image whatever subset was asked for.
    idx = np.random.default_rng(3).permutation(len(b))[:6]
    assert torch.equal(a.x, b.x[torch.as_tensor(idx)])
    assert not torch.equal(b.x[0], b.x[1])
