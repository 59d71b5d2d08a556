"""Tests for robustdeq.data: bundled digits, idx/CIFAR binary readers, synthetic, validation."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from robustdeq import data
from robustdeq.errors import ConfigError, DataError, InputError


# ----------------------------------------------------------------------------------- digits
def test_digits_shapes_ranges_and_split_sizes():
    x_tr, y_tr = data.load_digits("train")
    x_te, y_te = data.load_digits("test")
    x_all, y_all = data.load_digits("all")
    assert x_all.shape == (1797, 1, 8, 8) and y_all.shape == (1797,)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert x_tr.shape[1:] == (1, 8, 8)
    assert len(y_tr) + len(y_te) == 1797
    assert len(y_te) == pytest.approx(0.25 * 1797, abs=1)
    for x in (x_tr, x_te, x_all):
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float(x_all.max()) == 1.0  # 16 / 16
    # disjoint and together the whole set (compare flattened rows as a multiset)
    rows = lambda x: sorted(map(bytes, x.reshape(len(x), -1).numpy().astype(np.uint8)))
    assert rows(torch.cat([x_tr, x_te]) * 16) == rows(x_all * 16)


def test_digits_stratified_and_deterministic():
    _, y_all = data.load_digits("all")
    x_a, y_a = data.load_digits("test", seed=0)
    x_b, y_b = data.load_digits("test", seed=0)
    assert torch.equal(x_a, x_b) and torch.equal(y_a, y_b)
    _, y_c = data.load_digits("test", seed=1)
    x_c, _ = data.load_digits("test", seed=1)
    assert not torch.equal(x_a, x_c)
    share_all = torch.bincount(y_all, minlength=10).double() / len(y_all)
    for y in (y_a, y_c):
        share = torch.bincount(y, minlength=10).double() / len(y)
        assert torch.allclose(share, share_all, atol=0.01)
    _, y_small = data.load_digits("test", test_fraction=0.1)
    assert len(y_small) == pytest.approx(180, abs=1)


def test_digits_bad_arguments():
    with pytest.raises(ConfigError, match="split"):
        data.load_digits("validation")
    with pytest.raises(ConfigError, match="test_fraction"):
        data.load_digits("train", test_fraction=1.5)


# ------------------------------------------------------------------------------------ MNIST
def _write(path: Path, payload: bytes, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)
    return path


def _idx(arr: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape) + \
        arr.astype(np.uint8).tobytes()


def _write_mnist(folder: Path, split: str, n: int, *, gz: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    _write(folder / f"{prefix}-images-idx3-ubyte", _idx(images, 2051), gz)
    _write(folder / f"{prefix}-labels-idx1-ubyte", _idx(labels, 2049), gz)
    return images, labels


@pytest.mark.parametrize("layout,gz", [("", False), ("MNIST/raw", False), ("MNIST/raw", True),
                                       ("", True)])
def test_mnist_reader(tmp_path, layout, gz):
    images, labels = _write_mnist(tmp_path / layout if layout else tmp_path, "test", 7, gz=gz)
    x, y = data.load_mnist(tmp_path, "test")
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == labels.tolist()
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.allclose(x[:, 0] * 255, torch.from_numpy(images).float())
    x2, y2 = data.load_dataset("mnist", "test", root=tmp_path)
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_mnist_missing_files_name_paths(tmp_path):
    with pytest.raises(DataError) as info:
        data.load_mnist(tmp_path, "train")
    msg = str(info.value)
    assert "train-images-idx3-ubyte" in msg and str(tmp_path) in msg
    assert "MNIST/raw" in msg and "download" in msg.lower()
    _write_mnist(tmp_path, "test", 3)  # test split present does not satisfy train
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        data.load_mnist(tmp_path, "train")


def test_mnist_bad_magic_and_truncation(tmp_path):
    _write_mnist(tmp_path, "train", 4)
    img = tmp_path / "train-images-idx3-ubyte"
    raw = img.read_bytes()
    img.write_bytes(struct.pack(">I", 2049) + raw[4:])
    with pytest.raises(DataError, match="magic"):
        data.load_mnist(tmp_path, "train")
    img.write_bytes(raw[:-10])
    with pytest.raises(DataError, match="truncated"):
        data.load_mnist(tmp_path, "train")
    img.write_bytes(raw)
    lab = tmp_path / "train-labels-idx1-ubyte"
    lab.write_bytes(_idx(np.zeros(3, np.uint8), 2049))
    with pytest.raises(DataError, match="labels"):
        data.load_mnist(tmp_path, "train")


# --------------------------------------------------------------------------------- CIFAR-10
def _cifar_records(n: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    pixels = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    recs = np.concatenate([labels[:, None], pixels.reshape(n, -1)], axis=1)
    return recs.tobytes(), labels, pixels


@pytest.mark.parametrize("nested", [True, False])
def test_cifar10_reader(tmp_path, nested):
    folder = tmp_path / "cifar-10-batches-bin" if nested else tmp_path
    folder.mkdir(exist_ok=True)
    want_labels, want_pixels = [], []
    for i in range(1, 6):
        raw, lab, pix = _cifar_records(2, seed=i)
        (folder / f"data_batch_{i}.bin").write_bytes(raw)
        want_labels.append(lab)
        want_pixels.append(pix)
    raw, lab_te, pix_te = _cifar_records(3, seed=99)
    (folder / "test_batch.bin").write_bytes(raw)

    x, y = data.load_cifar10(tmp_path, "train")
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == np.concatenate(want_labels).tolist()
    assert torch.allclose(x * 255, torch.from_numpy(np.concatenate(want_pixels)).float())
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    x_te, y_te = data.load_dataset("cifar10", "test", root=tmp_path)
    assert x_te.shape == (3, 3, 32, 32) and y_te.tolist() == lab_te.tolist()
    # channel planes: red plane is the first 1024 bytes of each record's pixels
    assert torch.allclose(x_te[0, 0] * 255, torch.from_numpy(pix_te[0, 0]).float())


def test_cifar10_missing_and_truncated(tmp_path):
    with pytest.raises(DataError) as info:
        data.load_cifar10(tmp_path, "test")
    msg = str(info.value)
    assert "test_batch.bin" in msg and "cifar-10-batches-bin" in msg and str(tmp_path) in msg
    assert "download" in msg.lower()
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    (folder / "data_batch_1.bin").write_bytes(_cifar_records(1, 0)[0])
    with pytest.raises(DataError, match="data_batch_2.bin"):
        data.load_cifar10(tmp_path, "train")
    (folder / "test_batch.bin").write_bytes(_cifar_records(2, 0)[0][:-5])
    with pytest.raises(DataError, match="multiple"):
        data.load_cifar10(tmp_path, "test")


# ------------------------------------------------------------------------- synthetic/registry
def test_synthetic_is_separable_and_seeded():
    x, y = data.synthetic(200, shape=(1, 8, 8), num_classes=4, seed=3)
    assert x.shape == (200, 1, 8, 8) and y.shape == (200,)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert torch.bincount(y).tolist() == [50] * 4
    x2, y2 = data.synthetic(200, shape=(1, 8, 8), num_classes=4, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    # nearest class mean classifies (almost) perfectly
    means = torch.stack([x[y == c].mean(0) for c in range(4)]).flatten(1)
    pred = torch.cdist(x.flatten(1), means).argmin(1)
    assert (pred == y).float().mean() > 0.95


def test_load_dataset_registry_and_info():
    from robustdeq.registry import DATASETS
    assert set(DATASETS.names()) >= {"digits", "mnist", "mnist5k", "cifar10", "synthetic"}
    assert data.dataset_info("cifar10") == {"shape": (3, 32, 32), "num_classes": 10}
    assert data.dataset_info("mnist")["shape"] == (1, 28, 28)
    for name in DATASETS.names():
        assert set(data.dataset_info(name)) == {"shape", "num_classes"}
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet'.*digits"):
        data.load_dataset("imagenet", "train")
    with pytest.raises(ConfigError):
        data.dataset_info("nope")
    x, y = data.load_dataset("digits", "test")
    assert x.shape[1:] == data.dataset_info("digits")["shape"]
    xs_tr, _ = data.load_dataset("synthetic", "train", n=20)
    xs_te, _ = data.load_dataset("synthetic", "test", n=20)
    assert xs_tr.shape == (20, 1, 8, 8) and not torch.equal(xs_tr, xs_te)
    with pytest.raises(DataError, match="root"):
        data.load_dataset("mnist", "train")


# ------------------------------------------------------------------------------- validation
def test_validate_inputs_accepts_good_batch():
    x = torch.rand(4, 1, 8, 8, requires_grad=True)
    assert data.validate_inputs(x, expected_shape=(1, 8, 8)) is x
    edge = torch.tensor([[0.0, 1.0 + 5e-7, -5e-7]])
    assert data.validate_inputs(edge) is edge


@pytest.mark.parametrize(
    "value,kwargs,pattern",
    [
        (np.zeros((2, 1, 8, 8), np.float32), {}, "torch.Tensor"),
        (torch.zeros(2, 8, 8), {"expected_shape": (1, 8, 8)}, r"shape \(2, 8, 8\).*\(N, 1, 8, 8\)"),
        (torch.zeros(2, 3, 8, 8), {"expected_shape": (1, 8, 8)}, r"\(2, 3, 8, 8\)"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), {}, "floating"),
        (torch.tensor([0.5, float("nan"), float("inf")]), {}, "2 non-finite"),
        (torch.tensor([[0.2, -float("inf")]]), {}, "1 non-finite"),
        (torch.tensor([[0.0, 1.5]]), {}, r"outside \[0, 1\].*max=1\.5"),
        (torch.tensor([[-0.25, 0.5]]), {}, r"min=-0\.25"),
    ],
)
def test_validate_inputs_errors(value, kwargs, pattern):
    with pytest.raises(InputError, match=pattern):
        data.validate_inputs(value, **kwargs)


def test_validate_inputs_uses_name():
    with pytest.raises(InputError, match="x_adv"):
        data.validate_inputs(torch.full((1, 2), 2.0), name="x_adv")


def test_make_loader_seeded():
    x, y = data.synthetic(50, seed=0)
    order = lambda seed: torch.cat([yb for _, yb in data.make_loader(x, y, 8, True, seed)])
    assert torch.equal(order(1), order(1))
    assert not torch.equal(order(1), order(2))
    batches = list(data.make_loader(x, y, 16, shuffle=False, seed=0))
    assert len(batches) == 4 and torch.equal(batches[0][0], x[:16])
    with pytest.raises(InputError):
        data.make_loader(x, y[:10], 8, True, 0)
    with pytest.raises(ConfigError):
        data.make_loader(x, y, 0, True, 0)
