"""Dataset mixtures: ``--dataset NAME=SHARE[@ordered],NAME=SHARE...`` draws every global batch
from several sources, each holding its share of the rows.

Shares are weights normalised to the batch: ``mnist=64,fashion_mnist=32`` with ``--batch-size
96`` gives 64 and 32 rows (counts that sum to the batch are taken as they are),
``fashion_mnist=0.75,mnist=0.25`` three quarters and one quarter. Where a share of the batch is
not whole, the rows go by largest remainder (the earlier source first on a tie), so every batch
holds exactly the same count of each source. Rows of a batch are the sources' rows one source
after another, in the order given.

Each source is a stream of its own rows: a permutation of its training split drawn from (seed,
source, epoch), re-drawn when it ends (``@ordered``: in stored order), read at ``step * rows``
onwards; a small source so repeats while a large one runs once. grain's random-access
``MapDataset`` (``range(n).shuffle(seed).repeat()``) gives the permutation of each epoch; the
batch of a step stays a function of (seed, step) alone, the same on every mesh and process
count, and a resume needs only the step. An epoch of the mixture is the steps in which its
longest-running source passes once.

Sources must share the image shape and storage type. ``--labels shared`` (the default) keeps
each source's labels, so ``mnist`` and ``fashion_mnist`` share classes 0-9; ``--labels joint``
offsets each source's labels past the previous ones' (20 classes). Images are normalised with
the share-weighted mean of the sources' means and standard deviations. Evaluation reports each
source's test accuracy and loss (``eval_accuracy/<source>``) and the mixture's over all their
test examples.
"""

import dataclasses
import functools
import math
import re
from functools import cached_property

import numpy as np

from jaxpar.errors import UserError

LABELS = ("shared", "joint")


@dataclasses.dataclass(frozen=True)
class Share:
    name: str
    weight: float
    ordered: bool = False


def is_mixture(text: str) -> bool:
    return "=" in text


def parse(text: str) -> list[Share]:
    """``NAME=SHARE[@ordered],...`` as shares, refused (`UserError`) when malformed.

    >>> [(s.name, s.weight, s.ordered) for s in parse("mnist=64@ordered,fashion_mnist=32")]
    [('mnist', 64.0, True), ('fashion_mnist', 32.0, False)]
    """
    from jaxpar.data import DATASETS, known

    shares = []
    for part in text.split(","):
        m = re.fullmatch(r"([^=@]+)=([^=@]+)(@ordered)?", part.strip())
        if not m:
            raise UserError(f"--dataset {text}: '{part}' is not NAME=SHARE or NAME=SHARE@ordered")
        name, weight = m[1].strip(), m[2].strip()
        try:
            value = float(weight)
        except ValueError:
            value = math.nan
        if not value > 0 or not math.isfinite(value):
            raise UserError(f"--dataset {text}: the share of {name} must be a positive number, "
                            f"got {weight}")  # fmt: skip
        if not known(name):
            raise UserError(f"--dataset {text}: unknown source '{name}'; choose from "
                            f"{', '.join(DATASETS)}")  # fmt: skip
        if name in [s.name for s in shares]:
            raise UserError(f"--dataset {text}: {name} is named twice")
        shares.append(Share(name, value, bool(m[3])))
    return shares


def rows_per_batch(shares: list[Share], batch_size: int, text: str = "") -> list[int]:
    """Each source's rows of a batch of `batch_size`: the weights' proportions, by largest
    remainder (the earlier source first on a tie).

    >>> rows_per_batch([Share("a", 64), Share("b", 32)], 96)
    [64, 32]
    >>> rows_per_batch([Share("a", 1), Share("b", 1), Share("c", 1)], 128)
    [43, 43, 42]
    """
    total = sum(s.weight for s in shares)
    exact = [s.weight / total * batch_size for s in shares]
    rows = [math.floor(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - rows[i]), i))
    for i in order[: batch_size - sum(rows)]:
        rows[i] += 1
    for s, n in zip(shares, rows, strict=True):
        if n == 0:
            raise UserError(f"--dataset {text}: {s.name}'s share rounds to 0 of the "
                            f"{batch_size} rows of a batch; raise it or the batch")  # fmt: skip
    return rows


class Joined:
    """The training (or test) rows of several sources as one array-like: row ids count through
    the sources in order; reading gathers from each source's own array."""

    def __init__(self, parts: list, offsets: list[int] | None = None):
        self.parts = parts
        self.sizes = [len(p) for p in parts]
        self.starts = np.cumsum([0, *self.sizes])
        self.offsets = offsets  # added to each part's values (labels of a joint label space)
        first = parts[0]
        self.dtype = first.dtype
        self.shape = (int(self.starts[-1]), *first.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows):
        rows = np.asarray(rows)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        for i in np.unique(which):
            at = which == i
            values = np.asarray(self.parts[i][rows[at] - self.starts[i]])
            out[at] = values + self.offsets[i] if self.offsets else values
        return out


@dataclasses.dataclass(frozen=True)
class Sampler:
    """The rows of each step's batch: each source's stream, one after another."""

    shares: tuple[Share, ...]
    rows: tuple[int, ...]  # per batch, per source
    sizes: tuple[int, ...]  # training examples per source
    seed: int

    @cached_property
    def streams(self) -> list:
        import grain

        out = []
        for i, (share, n) in enumerate(zip(self.shares, self.sizes, strict=True)):
            ds = grain.MapDataset.range(n)
            if not share.ordered:
                seed = int(np.random.SeedSequence((self.seed, i)).generate_state(1)[0])
                ds = ds.shuffle(seed=seed)  # a new permutation each epoch (grain: seed, epoch)
            out.append(ds.repeat())
        return out

    def indices(self, step: int) -> np.ndarray:
        starts = np.cumsum([0, *self.sizes])
        return np.concatenate([
            start + np.array([stream[p] for p in range(step * k, (step + 1) * k)], np.int64)
            for stream, k, start in zip(self.streams, self.rows, starts, strict=False)
        ])  # fmt: skip

    def steps_per_epoch(self) -> int:
        return max(n // k for n, k in zip(self.sizes, self.rows, strict=True))


@functools.lru_cache(maxsize=4)
def sampler(shares: tuple[Share, ...], batch_size: int, sizes: tuple[int, ...], seed: int):
    return Sampler(shares, tuple(rows_per_batch(list(shares), batch_size)), sizes, seed)


def load_mixture(text: str, data_dir: str | None, labels: str = "shared"):
    """The `jaxpar.data.Dataset` of a mixture: sources read from ``DATA_DIR/<name>``, joined;
    its `shares` say how batches draw from them, its `parts` hold each source's own dataset
    (labels as in the mixture) for evaluation."""
    from pathlib import Path

    from jaxpar.data import Dataset, load_dataset

    shares = parse(text)
    sources = [load_dataset(s.name, str(Path(data_dir) / s.name) if data_dir else None)
               for s in shares]  # fmt: skip
    first = sources[0]
    for s, ds in zip(shares[1:], sources[1:], strict=True):
        if ds.image_shape != first.image_shape:
            raise UserError(f"--dataset {text}: {s.name} has images of shape {ds.image_shape}, "
                            f"{shares[0].name} of {first.image_shape}; mix one shape")  # fmt: skip
        if np.dtype(ds.train_images.dtype) != np.dtype(first.train_images.dtype):
            raise UserError(f"--dataset {text}: {s.name} stores {ds.train_images.dtype} images, "
                            f"{shares[0].name} {first.train_images.dtype}")  # fmt: skip
    offsets = list(np.cumsum([0] + [ds.num_classes for ds in sources[:-1]]))
    offsets = [int(o) for o in offsets] if labels == "joint" else None
    classes = sum(ds.num_classes for ds in sources) if offsets else max(
        ds.num_classes for ds in sources)  # fmt: skip
    weights = np.array([s.weight for s in shares]) / sum(s.weight for s in shares)
    mean = tuple(np.tensordot(weights, [ds.mean for ds in sources], 1).tolist())
    std = tuple(np.tensordot(weights, [ds.std for ds in sources], 1).tolist())
    parts = []
    for i, (s, ds) in enumerate(zip(shares, sources, strict=True)):
        shift = offsets[i] if offsets else 0
        own = dataclasses.replace(ds, test_labels=ds.test_labels + shift, num_classes=classes,
                                  mean=mean, std=std)  # fmt: skip
        parts.append((s.name, own))
    return Dataset(
        text,
        Joined([ds.train_images for ds in sources]),
        Joined([ds.train_labels for ds in sources], offsets),
        Joined([ds.test_images for ds in sources]),
        Joined([ds.test_labels for ds in sources], offsets),
        classes, mean=mean, std=std, augment=first.augment, shares=tuple(shares),
        parts=tuple(parts),
    )  # fmt: skip
