"""Data sets and their partition across clients.

This module owns everything between files on disk and tensors in memory:
readers for the on-disk formats (IDX, CIFAR-10 binary, HAM10000's CSV+JPEG layout,
scikit-learn's bundled digits), the train/test split where a data set has none,
normalisation, and the split of a training set across clients (IID or Dirichlet).
Everything reads local files only: nothing is ever downloaded, and nothing is unpickled.

Models, training loops and transport live elsewhere; they see only ArrayDataset.
"""

from __future__ import annotations

import csv
import functools
import gzip
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nodes.imports import is_reference, resolve

SPLITS = ("train", "test")
SCHEMES = ("iid", "dirichlet")
HAM_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
# Fixed, independent of `seed`: train and test must stay disjoint whatever seed a run uses.
_SPLIT_SEED = 20240601
_TEST_FRACTION = 0.2


@dataclass
class ArrayDataset:
    """Whole data set held as two tensors; cheap to index, subset and ship to a node."""

    x: torch.Tensor  # float32, N x C x H x W, standardised
    y: torch.Tensor  # int64, N
    num_classes: int
    name: str

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def subset(self, idx: np.ndarray | torch.Tensor) -> ArrayDataset:
        a = np.asarray(idx)
        if a.dtype == bool:  # a mask, which a cast to long would turn into indices 0 and 1
            a = np.flatnonzero(a)
        idx = torch.as_tensor(a, dtype=torch.long)
        return ArrayDataset(self.x[idx], self.y[idx], self.num_classes, self.name)


# A reader returns the labels and a function fetching images (float32 in [0, 1], N x C x H x W)
# for chosen indices, so `limit` decodes only what is kept (matters for HAM10000's JPEGs).
Fetch = Callable[[np.ndarray], np.ndarray]
Reader = Callable[[Path, str, int], tuple[np.ndarray, Fetch]]


@dataclass(frozen=True)
class DatasetSpec:
    read: Reader
    in_channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_root: str | None
    how_to_get: str
    needs_root: bool = True  # False for data bundled with a Python package


# ----------------------------------------------------------------------------- IDX (MNIST)

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse one IDX file (gzip-compressed if its name ends in .gz), checking its header."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # truncated or non-gzip data
        raise ValueError(f"{path}: cannot read IDX file: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: bad IDX magic number {raw[:4].hex() or '(empty)'}")
    if raw[3] != ndim:
        raise ValueError(f"{path}: IDX file has {raw[3]} dimensions, expected {ndim}")
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4)) if len(raw) >= header else ()
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    if len(dims) != ndim or len(raw) - header != int(np.prod(dims)) * dtype.itemsize:
        raise ValueError(f"{path}: IDX size mismatch: header dims {dims}, {len(raw)} bytes")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims)


def _find(root: Path, names: list[str], how_to_get: str) -> Path:
    for name in names:
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"{root / names[0]} not found (also tried {names[1:]}); {how_to_get}")


def _read_mnist_like(name: str) -> Reader:
    def read(root: Path, split: str, image_size: int) -> tuple[np.ndarray, Fetch]:
        prefix = "train" if split == "train" else "t10k"
        arrays = []
        for kind, ndim in (("images-idx3", 3), ("labels-idx1", 1)):
            base = f"{prefix}-{kind}-ubyte"
            dotted = base.replace("-idx", ".idx")  # how some mirrors name the unpacked files
            names = [base + ".gz", base, dotted + ".gz", dotted]
            path = _find(root, names, DATASETS[name].how_to_get)
            arrays.append((read_idx(path, ndim), path))
        (images, ipath), (labels, lpath) = arrays
        if len(images) != len(labels):
            raise ValueError(f"{ipath} has {len(images)} images but {lpath} {len(labels)} labels")
        if labels.size and labels.max() > 9:
            raise ValueError(f"{lpath}: label {labels.max()} outside 0..9")
        return labels.astype(np.int64), lambda i: images[i, None].astype(np.float32) / 255.0

    return read


# ----------------------------------------------------------------------------- CIFAR-10 binary

_CIFAR_RECORD = 1 + 3 * 32 * 32


def _read_cifar10(root: Path, split: str, image_size: int) -> tuple[np.ndarray, Fetch]:
    names = [f"data_batch_{k}.bin" for k in range(1, 6)] if split == "train" else ["test_batch.bin"]
    chunks = []
    for name in names:
        path = _find(root, [name], DATASETS["cifar10"].how_to_get)
        raw = np.fromfile(path, np.uint8)
        if raw.size == 0 or raw.size % _CIFAR_RECORD:
            raise ValueError(f"{path}: {raw.size} bytes is not a whole number of 3073-byte records")
        chunks.append(raw.reshape(-1, _CIFAR_RECORD))
    records = np.concatenate(chunks)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise ValueError(f"{root}: CIFAR-10 label {labels.max()} outside 0..9")
    # Each record stores the R, G then B planes row-major: already C x H x W.
    return labels, lambda i: records[i, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0


# ----------------------------------------------------------------------------- HAM10000


def _split_indices(labels: np.ndarray, groups: np.ndarray, split: str) -> np.ndarray:
    """Stratified, grouped, fixed-seed 80/20 split: a group (lesion) never straddles the split."""
    rng = np.random.default_rng(_SPLIT_SEED)
    uniq, first = np.unique(groups, return_index=True)
    group_label = labels[first]  # a lesion has one dx; if not, its first image decides
    test_groups = []
    for c in np.unique(group_label):
        g = rng.permutation(uniq[group_label == c])
        # At least one test group per class that has two, so tiny sets still test every class.
        n_test = max(1, round(len(g) * _TEST_FRACTION)) if len(g) > 1 else 0
        test_groups.append(g[:n_test])
    in_test = np.isin(groups, np.concatenate(test_groups))
    return np.flatnonzero(in_test if split == "test" else ~in_test)


def _read_ham10000(root: Path, split: str, image_size: int) -> tuple[np.ndarray, Fetch]:
    from PIL import Image  # only this reader needs Pillow

    how = DATASETS["ham10000"].how_to_get
    meta = _find(root, ["HAM10000_metadata.csv", "HAM10000_metadata"], how)
    with open(meta, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"image_id", "dx"} <= set(rows[0]):
        raise ValueError(f"{meta}: expected a CSV with columns image_id and dx (and lesion_id)")
    bad = sorted({r["dx"] for r in rows} - set(HAM_CLASSES))
    if bad:
        raise ValueError(f"{meta}: unknown dx {bad}; valid: {list(HAM_CLASSES)}")
    labels = np.array([HAM_CLASSES.index(r["dx"]) for r in rows], np.int64)
    groups = np.array([r.get("lesion_id") or r["image_id"] for r in rows])
    keep = _split_indices(labels, groups, split)
    # Images sit in root or in any direct subfolder (HAM10000_images_part_1, ..._part_2).
    paths = {p.stem: p for pattern in ("*.jpg", "*/*.jpg") for p in root.glob(pattern)}
    ids = [rows[k]["image_id"] for k in keep]
    missing = [i for i in ids if i not in paths]
    if missing:
        raise FileNotFoundError(
            f"{root}: {len(missing)} images listed in {meta.name} not found, e.g. "
            f"{missing[0]}.jpg (looked in {root} and its subfolders); {how}"
        )

    def fetch(idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), image_size, image_size, 3), np.uint8)
        for j, k in enumerate(idx):
            with Image.open(paths[ids[k]]) as im:
                im.draft("RGB", (image_size, image_size))  # JPEG DCT downscale: ~4x faster decode
                out[j] = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
        return out.transpose(0, 3, 1, 2).astype(np.float32) / 255.0

    return labels[keep], fetch


# ----------------------------------------------------------------------------- digits


def _digits_table() -> np.ndarray:
    """scikit-learn's bundled digits.csv.gz (1797 rows: 64 pixels, then the label), parsed as
    `sklearn.datasets.load_digits` parses it, without importing scikit-learn: its import
    (with scipy) costs ~0.8 s of every process that reads digits, the csv ~20 ms."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # locates the package, does not run it
    path = (Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" /
            "digits.csv.gz") if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():  # a layout we do not know: ask scikit-learn
        from sklearn.datasets import load_digits

        d = load_digits()
        return np.column_stack([d.data, d.target])
    with gzip.open(path, mode="rt", encoding="utf-8") as f:
        return np.loadtxt(f, delimiter=",")


def _read_digits(root: Path, split: str, image_size: int) -> tuple[np.ndarray, Fetch]:
    table = _digits_table()  # bundled inside the scikit-learn wheel: no network
    labels = table[:, -1].astype(int).astype(np.int64)
    keep = _split_indices(labels, np.arange(len(labels)), split)
    images = (table[keep, :-1].reshape(-1, 8, 8) / 16.0).astype(np.float32)[:, None]
    return labels[keep], lambda i: images[i]


def _read_synthetic32(root: Path, split: str, image_size: int) -> tuple[np.ndarray, Fetch]:
    """Random 3x32x32 images with random labels (seeded): CIFAR-shaped load for benchmarks of
    time and memory, where the content does not matter. Not for accuracy."""
    n, seed = (5000, 1) if split == "train" else (1000, 2)
    labels = np.random.default_rng(seed).integers(0, 10, n).astype(np.int64)

    def fetch(i: np.ndarray) -> np.ndarray:
        # Per-index seeds: the same sample whatever subset or order is asked for.
        return np.stack([np.random.default_rng([seed, int(k)]).random((3, image_size, image_size),
                                                                       dtype=np.float32)
                         for k in i]) if len(i) else np.zeros((0, 3, image_size, image_size),
                                                              np.float32)

    return labels, fetch


# ----------------------------------------------------------------------------- registry

_IDX_LAYOUT = (
    "pass root= a folder holding train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (each optionally .gz)"
)
DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        _read_mnist_like("fashion-mnist"), 1, 28, 10, (0.2860,), (0.3530,),
        "/usr/share/datasets/fashion-mnist",
        f"install it with `apt-get install dataset-fashion-mnist`, or {_IDX_LAYOUT}",
    ),
    "mnist": DatasetSpec(
        _read_mnist_like("mnist"), 1, 28, 10, (0.1307,), (0.3081,), None, _IDX_LAYOUT,
    ),
    "digits": DatasetSpec(
        _read_digits, 1, 8, 10, (0.3053,), (0.3760,), None, "install scikit-learn", False,
    ),
    "synthetic32": DatasetSpec(
        _read_synthetic32, 3, 32, 10, (0.5, 0.5, 0.5), (0.2887, 0.2887, 0.2887), None,
        "generated, nothing to get", False,
    ),
    "cifar10": DatasetSpec(
        _read_cifar10, 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), None,
        "pass root= the cifar-10-batches-bin folder (data_batch_1..5.bin, test_batch.bin) "
        "from the binary version of CIFAR-10",
    ),
    "ham10000": DatasetSpec(
        # Approximate channel statistics of the full set; resizing barely moves them.
        _read_ham10000, 3, 64, 7, (0.7635, 0.5461, 0.5705), (0.1409, 0.1526, 0.1700), None,
        "pass root= a folder holding HAM10000_metadata.csv and <image_id>.jpg files in it "
        "or in subfolders (HAM10000_images_part_1, HAM10000_images_part_2)",
    ),
}


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"name: unknown data set {name!r}; valid: {sorted(DATASETS)} or your "
                         f"own as pkg.module:load or path/to/file.py:load")
    return DATASETS[name]


def dataset_info(name: str, root: str | None = None) -> dict:
    """Shape facts a model needs, without touching any file (a user's data set: loaded once)."""
    if is_reference(name):
        train, _ = user_dataset(name, root)
        return {"in_channels": int(train.x.shape[1]), "image_size": int(train.x.shape[-1]),
                "num_classes": train.num_classes}
    s = _spec(name)
    return {"in_channels": s.in_channels, "image_size": s.image_size, "num_classes": s.num_classes}


@functools.lru_cache(maxsize=4)
def user_dataset(ref: str, root: str | None = None) -> tuple[ArrayDataset, ArrayDataset]:
    """The user's data set `ref`: a function returning (train, test), each an (x, y) pair of
    tensors or arrays or a torch Dataset of (x, y) items; called with `root` if it takes it.
    Images are N x C x H x W (N x H x W gets one channel); labels 0..classes-1. They are used
    as given (standardise them in the loader)."""
    load = resolve(ref, "dataset")
    takes_root = "root" in inspect.signature(load).parameters
    try:
        got = load(root=root) if takes_root else load()
    except Exception as e:  # the user's code: say whose and what
        raise ValueError(f"dataset {ref!r}: loading raised {type(e).__name__}: {e}") from None
    try:
        train, test = got
    except (TypeError, ValueError):
        raise ValueError(f"dataset {ref!r}: expected load() -> (train, test), got "
                         f"{type(got).__name__}") from None
    parts = [_as_arrays(ref, split, d) for split, d in (("train", train), ("test", test))]
    classes = int(max(int(y.max()) for _, y in parts)) + 1
    return tuple(ArrayDataset(x, y, classes, ref) for x, y in parts)  # type: ignore[return-value]


def _as_arrays(ref: str, split: str, d: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(d, (tuple, list)) and len(d) == 2:
        x, y = d
    elif hasattr(d, "__len__") and hasattr(d, "__getitem__"):  # a torch Dataset
        items = [d[i] for i in range(len(d))]
        x = torch.stack([torch.as_tensor(a) for a, _ in items])
        y = torch.as_tensor([int(b) for _, b in items])
    else:
        raise ValueError(f"dataset {ref!r}: {split} is a {type(d).__name__}, not (x, y) or a "
                         f"Dataset")
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).float()
    y = torch.as_tensor(np.asarray(y) if not torch.is_tensor(y) else y).long()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or len(x) != len(y) or len(y) == 0 or int(y.min()) < 0:
        raise ValueError(f"dataset {ref!r}: {split} must be N x C x H x W images and N labels "
                         f">= 0, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    return x.contiguous(), y


def load_dataset(
    name: str,
    split: str = "train",
    *,
    root: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
) -> ArrayDataset:
    """Load one split, standardised; `limit` keeps the first `limit` after a shuffle by `seed`.

    `image_size` applies to ham10000 only (its JPEGs are resized; default 64).
    """
    if split not in SPLITS:
        raise ValueError(f"split: unknown split {split!r}; valid: {list(SPLITS)}")
    if is_reference(name):
        data = user_dataset(name, root)[SPLITS.index(split)]
        if limit is not None:
            data = data.subset(np.random.default_rng(seed).permutation(len(data))[:limit])
        return data
    spec = _spec(name)
    if limit is not None and limit < 1:
        raise ValueError(f"limit: must be >= 1 or None, got {limit}")
    if image_size is not None and (name != "ham10000" or image_size < 1):
        raise ValueError(f"image_size: only ham10000 can be resized (to >= 1), not {name!r}")
    where = root if root is not None else spec.default_root
    if where is None and spec.needs_root:
        raise FileNotFoundError(f"{name}: no root given and no default location; {spec.how_to_get}")
    labels, fetch = spec.read(Path(where or "."), split, image_size or spec.image_size)
    idx = np.arange(len(labels))
    if limit is not None:
        idx = np.random.default_rng(seed).permutation(len(labels))[:limit]
    x = torch.from_numpy(np.ascontiguousarray(fetch(idx)))
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    x.sub_(mean).div_(std)  # in place: the full Fashion-MNIST train set is 188 MB as float32
    return ArrayDataset(x, torch.from_numpy(labels[idx].copy()), spec.num_classes, name)


# ----------------------------------------------------------------------------- partition


def partition(
    labels: np.ndarray | torch.Tensor,
    num_clients: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split sample indices across clients: disjoint, covering, each client non-empty.

    "iid": a seeded permutation cut into near-equal shards. "dirichlet": for each class,
    client proportions ~ Dir(alpha); small alpha gives few classes per client (label skew).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: unknown scheme {scheme!r}; valid: {list(SCHEMES)}")
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if num_clients < 1 or num_clients > len(y):
        raise ValueError(f"num_clients: must be in 1..{len(y)} (1 sample each), got {num_clients}")
    if scheme == "dirichlet" and not alpha > 0:
        raise ValueError(f"alpha: must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(s) for s in np.array_split(rng.permutation(len(y)), num_clients)]

    shards: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        p = rng.dirichlet(np.full(num_clients, alpha))
        if not np.all(np.isfinite(p)):  # old numpy can return NaN for tiny alpha
            p = np.eye(num_clients)[rng.integers(num_clients)]
        cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
        for k, part in enumerate(np.split(idx, cuts)):
            shards[k].append(part)
    parts = [np.concatenate(s).astype(np.int64) for s in shards]
    # Deterministic fix-up rather than resampling (which may never succeed for tiny alpha
    # and many clients): each empty client takes one sample from the currently largest.
    for k in range(num_clients):
        if len(parts[k]) == 0:
            big = max(range(num_clients), key=lambda j: len(parts[j]))
            parts[k], parts[big] = parts[big][-1:], parts[big][:-1]
    return [np.sort(p) for p in parts]
