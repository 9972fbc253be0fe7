"""The datasets a name gives, as a `Dataset` of arrays in host memory (or readers of rows).

``digits`` (embedded), ``mnist``, ``fashion_mnist`` (IDX files in ``--data-dir``, or
tensorflow-datasets), ``cifar10``, ``cifar100`` (tensorflow-datasets, read into memory),
``imagenet2012`` (tensorflow-datasets, streamed and cropped on the host: `jaxpar.data.imagenet`),
``synthetic`` (``synthetic:HxWxC:K``, for benchmarks), or a user's own loader named
``module:attribute``.
"""

import contextlib
import dataclasses
import gzip
import logging
import re
from pathlib import Path

import numpy as np

from jaxpar.core.errors import UserError
from jaxpar.core.registry import Registry


@dataclasses.dataclass(frozen=True)
class Dataset:
    """NHWC images (uint8, or float32 already normalised) and int32 labels in host memory."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    mean: tuple = (0.0,)  # per channel, of images scaled to [0, 1]
    std: tuple = (1.0,)
    augment: bool = False  # random crop (4-pixel padding) and horizontal flip, as for CIFAR
    shares: tuple = ()  # a mixture's sources and their shares of a batch (`jaxpar.data.mixture`)
    parts: tuple = ()  # a mixture's ((source, Dataset), ...), each evaluated on its own
    # The training split's (smallest, largest) pixel, where known without reading it: a model
    # that reads pixels as probabilities maps it to [0, 1] (`jaxpar.data.batches.unit_interval`).
    pixel_range: tuple | None = None

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train_images.shape[1:])


def load_digits(name="digits", data_dir=None) -> Dataset:
    """scikit-learn's 1,797 real 8x8 handwritten digits, shipped in its wheel (works offline).

    A fixed split, whatever the seed: 360 test images, 1,437 training images.
    """
    from sklearn.datasets import load_digits as sk_load

    digits = sk_load()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(labels))
    test, train = order[:360], order[360:]
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    return Dataset("digits", images[train], labels[train], images[test], labels[test], 10)


class Tiled:
    """`n` rows that repeat a small pool: row i is ``pool[i % len(pool)]`` (synthetic data)."""

    def __init__(self, pool: np.ndarray, n: int):
        self.pool, self.shape, self.dtype = pool, (n, *pool.shape[1:]), pool.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows):
        return self.pool[np.asarray(rows) % len(self.pool)]


def load_synthetic(name: str, data_dir=None) -> Dataset:
    """``synthetic:HxWxC:K`` (default 32x32x3, 10 classes), for benchmarks: 50,000 training and
    10,000 test rows repeating a pool of at most 256 MiB; each class has its own mean pattern."""
    m = re.fullmatch(r"synthetic(?::(\d+)x(\d+)x(\d+))?(?::(\d+))?", name)
    if not m:
        raise UserError(
            f"dataset '{name}': use synthetic or synthetic:HxWxC:K (e.g. :224x224x3:1000)"
        )
    h, w, c = (int(x) for x in m.group(1, 2, 3)) if m[1] else (32, 32, 3)
    classes = int(m[4] or 10)
    if min(h, w, c, classes) < 1:
        raise UserError(f"dataset '{name}': sizes must be positive")
    pool = int(np.clip(2**28 // (h * w * c), 1, 4096))
    labels, images = synthetic_pool(pool, (h, w, c), classes)
    return Dataset(
        name, Tiled(images, 50_000), Tiled(labels, 50_000), Tiled(images, 10_000),
        Tiled(labels, 10_000), classes, mean=(0.5,) * c, std=(0.25,) * c,
    )  # fmt: skip


def synthetic_pool(n: int, shape: tuple, classes: int, seed: int = 0):
    """`n` labels and uint8 images: the label's pattern (uint8 in [0, 128)) plus uniform noise in
    [0, 128), built in place in uint8, one pattern at a time, so the memory it needs is the
    images' own (a 256 MiB pool, not the gigabytes of int64 intermediates)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.int32)
    images = rng.integers(0, 128, (n, *shape), dtype=np.uint8)  # the noise
    for k in np.unique(labels):
        pattern = np.random.default_rng((seed, int(k))).integers(0, 128, shape, dtype=np.uint8)
        for i in np.flatnonzero(labels == k):
            images[i] += pattern  # at most 127 + 127: no overflow
    return labels, images


# --- MNIST-format IDX files, read directly --------------------------------------------------

IDX_NAMES = ("mnist", "fashion_mnist")  # datasets that may come as IDX files
IDX = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}  # fmt: skip


def _idx_path(data_dir: Path, stem: str) -> Path | None:
    return next((p for p in (data_dir / f"{stem}.gz", data_dir / stem) if p.is_file()), None)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX array of unsigned bytes (magic 0x0000080N) with `ndim` dimensions."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[:3] != b"\0\0\x08" or raw[3] != ndim:
        raise UserError(f"{path} is not an IDX file of {ndim}-dimensional unsigned bytes")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != np.prod(shape):
        raise UserError(f"{path} holds {data.size} bytes, its header says {shape}")
    return data.reshape(shape)


def load_idx(data_dir: Path, name: str) -> dict | None:
    """The four MNIST-format files from `data_dir`, or None when none is there."""
    paths = {s: [_idx_path(data_dir, stem) for stem in IDX[s]] for s in IDX}
    found = [p for pair in paths.values() for p in pair if p]
    if not found:
        return None
    missing = [stem for s in IDX for stem, p in zip(IDX[s], paths[s], strict=True) if not p]
    if missing:
        raise UserError(f"{name}: {data_dir} lacks {', '.join(missing)} (.gz or raw)")
    out = {}
    for split, (images, labels) in paths.items():
        x, y = read_idx(images, 3), read_idx(labels, 1)
        if x.shape[1:] != (28, 28) or len(x) != len(y):
            raise UserError(f"{name}: {images} holds {x.shape} images for {len(y)} labels; "
                            "expected N x 28 x 28 images and N labels")  # fmt: skip
        out[split] = (x[..., None], y.astype(np.int32))
    return out


# --- tensorflow-datasets, through its random-access (ArrayRecord) data sources -------------

TFDS = {  # name: (test split, mean, std, augment)
    "mnist": ("test", (0.1307,), (0.3081,), False),
    "fashion_mnist": ("test", (0.2860,), (0.3530,), False),
    "cifar10": ("test", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    "cifar100": ("test", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
    # ImageNet's crops and flips are made on the host, from the full-size image (data.imagenet)
    "imagenet2012": ("validation", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), False),
}


@contextlib.contextmanager
def _held_logs(name: str = "absl"):
    """Hold what logger `name` logs in the block (tensorflow-datasets logs through absl): replay
    it if the block succeeds, drop it if it raises, so that a refusal's one line stands alone
    (e.g. tfds's "Variant folder ... has no dataset_info.json" before "no prepared split")."""
    logger, held = logging.getLogger(name), []
    hold = logging.Handler()
    hold.emit = held.append
    handlers, propagate = logger.handlers, logger.propagate
    logger.handlers, logger.propagate = [hold], False
    try:
        yield
    finally:
        logger.handlers, logger.propagate = handlers, propagate
    for record in held:
        logger.handle(record)


IDX_ROUTE = (
    "put the four MNIST-format IDX files train-images-idx3-ubyte[.gz], "
    "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz] in "
    "--data-dir DIR"
)


def _open_tfds(name: str, split: str, data_dir):
    """The random-access tfds source of a prepared split (ArrayRecord files, no TensorFlow)."""
    try:
        with _held_logs():
            import tensorflow_datasets as tfds

            return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # noqa: BLE001 - tfds raises many kinds for "not prepared"
        where = data_dir or "tensorflow-datasets' default data directory"
        manual = (
            " --manual_dir DIR_WITH_ILSVRC2012_img_train.tar_AND_img_val.tar (from image-net.org)"
            if name == "imagenet2012"
            else ""
        )
        problem = f"no prepared {split} split in {where}"
        fix = "prepare it"
        if name in IDX_NAMES:
            idx = f"no IDX files in {data_dir}" if data_dir else "no --data-dir with IDX files"
            problem = f"{idx} and {problem}"
            fix = f"{IDX_ROUTE}, or prepare it with tensorflow-datasets"
        raise UserError(
            f"{name}: {problem} ({type(e).__name__}); {fix} on a machine with network: "
            f"pip install 'jaxpar[prepare]' && tfds build {name} --data_dir DIR --file_format "
            f"array_record{manual}, then pass --data-dir DIR"
        ) from None


def _read_tfds(name: str, split: str, data_dir) -> tuple[np.ndarray, np.ndarray]:
    source = _open_tfds(name, split, data_dir)
    records = [source[i] for i in range(len(source))]
    images = np.stack([r["image"] for r in records]).astype(np.uint8)
    return images, np.array([r["label"] for r in records], np.int32)


def load_tfds(name: str, data_dir=None) -> Dataset:
    test_split, mean, std, augment = TFDS[name]
    if name == "imagenet2012":  # streamed: too large for memory
        from jaxpar.data.imagenet import Records

        train, test = (Records(_open_tfds(name, s, data_dir)) for s in ("train", test_split))
        return Dataset(name, train.images, train.labels, test.images, test.labels, 1000, mean, std)
    idx = load_idx(Path(data_dir), name) if data_dir and name in IDX_NAMES else None
    if idx:
        (x, y), (tx, ty) = idx["train"], idx["test"]
    else:
        (x, y), (tx, ty) = (
            _read_tfds(name, "train", data_dir),
            _read_tfds(name, test_split, data_dir),
        )
    classes = 100 if name == "cifar100" else 10
    return Dataset(name, x, y, tx, ty, classes, mean=mean, std=std, augment=augment)


# A user's own loader is named module:attribute (`jaxpar.core.registry`): ``fn(name, data_dir)``
# returning a `Dataset`.
DATASETS = Registry(
    {"digits": load_digits, **dict.fromkeys(TFDS, load_tfds), "synthetic": load_synthetic}
)


def loader(name: str):
    """The loader of dataset `name`: a registered one (``synthetic:HxWxC:K`` passes options after
    its colon), or a ``module:attribute`` imported (`jaxpar.core.registry`); else a `UserError`."""
    head = name.split(":")[0]
    if dict.__contains__(DATASETS, head) and (head == name or head == "synthetic"):
        return DATASETS[head]
    return DATASETS.lookup(name, "dataset")


def known(name: str) -> bool:
    try:
        loader(name)
    except UserError:
        return False
    return True


def read_rows(source, rows, seeds=None):
    """`source`'s `rows`: ``source.read(rows, seeds)`` for sources that augment on the host
    (ImageNet's crops, a mixture's), else ``source[rows]``."""
    return source.read(rows, seeds) if hasattr(source, "read") else source[rows]
