"""Datasets and the deterministic batch order.

The global batch of a step is a function of (seed, epoch, step) only: a permutation of the training
set drawn from ``(seed, epoch)``, cut into consecutive batches (the last partial batch is dropped).
Each device then fetches just its own rows (`jax.make_array_from_callback`), so the order is the
same on every mesh and process count, and resuming needs only the step.
"""

import dataclasses
import functools

import jax
import numpy as np

from jaxpar.errors import UserError
from jaxpar.sharding import batch_sharding


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Normalised NHWC float32 images and int32 labels, held in host memory."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.train_images.shape[1:]


def load_digits(data_dir=None) -> Dataset:
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


DATASETS = {"digits": load_digits}


def load_dataset(name: str, data_dir: str | None = None) -> Dataset:
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}'; choose from {', '.join(DATASETS)}")
    return DATASETS[name](data_dir)


def steps_per_epoch(ds: Dataset, batch_size: int) -> int:
    n = len(ds.train_labels)
    if batch_size > n:
        raise UserError(f"--batch-size {batch_size} is larger than the {n} training examples")
    return n // batch_size


@functools.lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng((seed, epoch)).permutation(n)


def train_indices(ds: Dataset, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Rows of the global batch for optimizer step `step` (0-based)."""
    epoch, i = divmod(step, steps_per_epoch(ds, batch_size))
    return _permutation(seed, epoch, len(ds.train_labels))[i * batch_size : (i + 1) * batch_size]


def device_batch(arrays: dict[str, np.ndarray], rows: np.ndarray, mesh) -> dict[str, jax.Array]:
    """Global arrays of `arrays[rows]`, batch-sharded over the mesh.

    Each device's callback gathers only that device's rows, so a process materialises only the part
    of the batch its devices hold.
    """

    def one(source):
        shape = (len(rows), *source.shape[1:])
        sharding = batch_sharding(mesh, len(shape))
        return jax.make_array_from_callback(shape, sharding, lambda idx: source[rows[idx[0]]])

    return {k: one(v) for k, v in arrays.items()}


def eval_batches(ds: Dataset, batch_size: int, mesh):
    """The whole test split in batches; the last one is padded and masked, so each example counts
    exactly once on every mesh."""
    images, labels = ds.test_images, ds.test_labels
    n = len(labels)
    padded = -(-n // batch_size) * batch_size
    mask = np.arange(padded) < n
    pad = lambda a: np.concatenate([a, np.zeros((padded - n, *a.shape[1:]), a.dtype)])  # noqa: E731
    arrays = {"image": pad(images), "label": pad(labels), "mask": mask.astype(np.float32)}
    for start in range(0, padded, batch_size):
        yield device_batch(arrays, np.arange(start, start + batch_size), mesh)
