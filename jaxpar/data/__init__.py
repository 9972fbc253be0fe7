"""Input: the datasets a name gives, mixtures of them, and the batches every mesh reads alike.

- `jaxpar.data.datasets`: a `Dataset` by name (built in, tensorflow-datasets, IDX files, or a
  user's ``module:attribute``); reading rows of one.
- `jaxpar.data.mixture`: ``--dataset A=S,B=S``, batches that hold each source's share.
- `jaxpar.data.imagenet`: ImageNet's records, decoded and cropped on the host.
- `jaxpar.data.batches`: the batch order, a function of (seed, step) alone; each device's rows;
  grain worker processes; prefetching; evaluation batches; preprocessing on the devices.

This package imports, from the rest of jaxpar, only `jaxpar.core` (errors, the registry, and
where a batch's rows go). Its modules import one way: datasets, then mixture, then batches;
`load_dataset` here chooses between a dataset and a mixture.
"""

from jaxpar.data.batches import (
    CHUNK_BYTES,
    CHUNK_STEPS,
    TrainReads,
    corrupted,
    crop_and_flip,
    device_batch,
    eval_batch_size,
    eval_batches,
    in_order,
    labelled,
    local_blocks,
    pixel_range,
    prefetch,
    preprocess,
    read_blocks,
    steps_per_epoch,
    to_devices,
    train_batches,
    train_indices,
    unit_interval,
)
from jaxpar.data.datasets import (
    DATASETS,
    Dataset,
    known,
    load_digits,
    load_synthetic,
    load_tfds,
    loader,
    read_rows,
    synthetic_pool,
)
from jaxpar.data.mixture import is_mixture, load_mixture


def load_dataset(
    name: str, data_dir: str | None = None, labels: str = "shared", resize: bool = False
) -> Dataset:
    """A dataset by name, or a mixture of several (``NAME=SHARE,...``: `jaxpar.data.mixture`)."""
    if is_mixture(name):
        return load_mixture(name, data_dir, labels, resize)
    return loader(name)(name, data_dir)


__all__ = [
    "CHUNK_BYTES", "CHUNK_STEPS", "DATASETS", "Dataset", "TrainReads", "crop_and_flip",
    "device_batch", "eval_batch_size", "eval_batches", "in_order", "known", "labelled",
    "load_dataset", "load_digits", "load_synthetic", "load_tfds", "loader", "local_blocks",
    "corrupted", "pixel_range", "prefetch", "preprocess", "read_blocks", "read_rows",
    "steps_per_epoch",
    "synthetic_pool", "to_devices", "train_batches", "train_indices", "unit_interval",
]  # fmt: skip
