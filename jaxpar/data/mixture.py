"""Dataset mixtures: ``--dataset NAME=SHARE[@ordered],NAME=SHARE...`` draws every global batch
from several sources, each holding its share of the rows.

Shares are fractions that sum to 1 (``fashion_mnist=0.75,mnist=0.25``) or counts that sum to the
batch (``mnist=64,fashion_mnist=32`` with ``--batch-size 96``). Fractions of the batch that are
not whole go by largest remainder (the earlier source first on a tie), so every batch holds
exactly the same count of each source. The sources' rows are interleaved in the batch in
proportion (row j of a source's k at (j + 1/2) / k), so each device's block of rows holds about
each source's share too, not one source (replicas of ``--sync local:H`` see every source).

Each source is a stream of its own rows: a permutation of its training split drawn from (seed,
source name, epoch), re-drawn when it ends (``@ordered``: in stored order), read at ``step *
rows`` onwards; a small source so repeats while a large one runs once. grain's random-access
``MapDataset`` (``range(n).shuffle(seed).repeat()``) draws the permutations (kept one epoch at a
time as arrays); the batch of a step stays a function of (seed, step) alone, the same on every
mesh and process count, and a resume needs only the step (with the same grain: its shuffle
decides the order). An epoch of the mixture is the steps in which its longest-running source
passes once.

Sources must share the image shape (or be resized to the first one's: ``--resize-sources``,
`resized`) and storage type; with ``--data-dir DIR`` each is read from
``DIR/<name>`` (or ``DIR`` where no such folder exists). ``--labels shared`` (the default) keeps
each source's labels, so ``mnist`` and ``fashion_mnist`` share classes 0-9; ``--labels joint``
offsets each source's labels past the previous ones' (20 classes). Images are normalised with the
mean and standard deviation of the mixed pixels (pooled from the sources' statistics in
proportion to their shares). Evaluation reports each source's test accuracy and loss
(``eval_accuracy/<source>``) and the mixture's over all their test examples.
"""

import dataclasses
import functools
import math
import re
import zlib
from functools import cached_property

import numpy as np

from jaxpar.core.errors import UserError
from jaxpar.data.datasets import DATASETS, Dataset, known, loader, read_rows

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
    """Each source's rows of a batch of `batch_size`: shares that sum to 1 are fractions of it,
    rounded by largest remainder (the earlier source first on a tie); otherwise they are counts
    and must sum to the batch.

    >>> rows_per_batch([Share("a", 64), Share("b", 32)], 96)
    [64, 32]
    >>> rows_per_batch([Share("a", 0.75), Share("b", 0.25)], 6)
    [5, 1]
    """
    total = sum(s.weight for s in shares)
    counts = total == batch_size and all(s.weight == int(s.weight) for s in shares)
    if not math.isclose(total, 1.0) and not counts:
        raise UserError(f"--dataset {text}: shares are fractions summing to 1 or counts summing "
                        f"to the batch ({batch_size}); these sum to {total:g}")  # fmt: skip
    exact = [s.weight / total * batch_size for s in shares]
    rows = [math.floor(x + 1e-9) for x in exact]
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
    the sources in order; reading gathers from each source's own array (passing on the
    augmentation seeds of sources that take them, as ImageNet's crops do)."""

    def __init__(self, parts: list, offsets: list[int] | None = None):
        self.parts = parts
        self.starts = np.cumsum([0, *[len(p) for p in parts]])
        self.offsets = offsets  # added to each part's values (labels of a joint label space)
        self.dtype = parts[0].dtype
        self.shape = (int(self.starts[-1]), *parts[0].shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows):
        return self.read(rows)

    def read(self, rows, seeds=None):
        rows = np.asarray(rows)
        flat = rows.ravel()  # one batch (B,), or the stacked batches of a dispatch (K, B)
        flat_seeds = None if seeds is None else np.asarray(seeds).reshape(len(flat), -1)
        which = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty((len(flat), *self.shape[1:]), self.dtype)
        for i in np.unique(which):
            at = which == i
            part_seeds = None if flat_seeds is None else flat_seeds[at]
            values = np.asarray(read_rows(self.parts[i], flat[at] - self.starts[i], part_seeds))
            out[at] = values + self.offsets[i] if self.offsets else values
        return out.reshape(*rows.shape, *self.shape[1:])


@dataclasses.dataclass(frozen=True)
class Sampler:
    """The rows of each step's batch: each source's share from its own stream, interleaved."""

    shares: tuple[Share, ...]
    rows: tuple[int, ...]  # per batch, per source
    sizes: tuple[int, ...]  # training examples per source
    seed: int

    @cached_property
    def streams(self) -> list:
        """grain's view of each source's stream: position -> row of that source."""
        import grain

        out = []
        for share, n in zip(self.shares, self.sizes, strict=True):
            ds = grain.MapDataset.range(n)
            if not share.ordered:  # seeded by the source's name, not its place in the list
                key = (self.seed, zlib.crc32(share.name.encode()))
                ds = ds.shuffle(seed=int(np.random.SeedSequence(key).generate_state(1)[0]))
            out.append(ds.repeat())  # grain draws a new permutation each epoch (seed, epoch)
        return out

    # The batch's composition is hand-written rather than grain's `MapDataset.mix`: mix picks the
    # source element by element from the weights, so a batch cut from its stream holds a share
    # only up to rounding that moves between batches (0.3 of 64 rows: 20, 19, 19, 19, 20, ...),
    # where every batch here holds the same count (19) of each source. The sources' own streams
    # are grain's (`streams`).
    @cached_property
    def order(self) -> np.ndarray:
        """Where the sources' rows go in a batch: interleaved by their place in their own share
        (row j of k at (j + 1/2) / k), so any contiguous block of the batch, one device's rows,
        holds about each source's share rather than one source."""
        keys = np.concatenate([(np.arange(k) + 0.5) / k for k in self.rows])
        return np.argsort(keys, kind="stable")

    def epoch(self, i: int, e: int) -> np.ndarray:
        """Source `i`'s rows in its epoch `e`: one pass of grain's stream, kept as an array."""
        return _epoch(self, i, e)

    def indices(self, step: int) -> np.ndarray:
        starts = np.cumsum([0, *self.sizes])
        parts = []
        for i, (n, k) in enumerate(zip(self.sizes, self.rows, strict=True)):
            position = np.arange(step * k, (step + 1) * k)
            epochs = position // n
            rows = np.concatenate([self.epoch(i, int(e))[position[epochs == e] % n]
                                   for e in np.unique(epochs)])  # fmt: skip
            parts.append(starts[i] + rows)
        return np.concatenate(parts)[self.order]

    def steps_per_epoch(self) -> int:
        return max(n // k for n, k in zip(self.sizes, self.rows, strict=True))


@functools.lru_cache(maxsize=16)
def _epoch(sampler: Sampler, i: int, e: int) -> np.ndarray:
    n, stream = sampler.sizes[i], sampler.streams[i]
    return np.array([stream[e * n + j] for j in range(n)], np.int64)


@functools.lru_cache(maxsize=4)
def sampler(shares: tuple[Share, ...], batch_size: int, sizes: tuple[int, ...], seed: int):
    made = Sampler(shares, tuple(rows_per_batch(list(shares), batch_size)), sizes, seed)
    if made.steps_per_epoch() == 0:
        raise UserError("every source of the mixture holds fewer training examples than its "
                        "rows of a batch; use a smaller --batch-size")  # fmt: skip
    return made


def _pooled(weights, means, stds) -> tuple[tuple, tuple]:
    """Mean and standard deviation, per channel, of the sources mixed in these proportions."""
    means, stds = np.asarray(means, np.float64), np.asarray(stds, np.float64)
    mean = weights @ means
    std = np.sqrt(weights @ (stds**2 + (means - mean) ** 2))
    return tuple(mean.tolist()), tuple(std.tolist())


LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601: RGB to grey


def resized(ds, shape: tuple, who: str):
    """`ds` with its images resized (bilinear, PIL) to `shape` ``(H, W, C)``, for
    ``--resize-sources``: one channel becomes three by repetition, three become one by ITU-R 601
    luma (the statistics follow). uint8 images held in memory only.

    >>> grey = np.zeros((2, 4, 4, 1), np.uint8)
    >>> ds = resized(Dataset("g", grey, np.zeros(2), grey, np.zeros(2), 10), (8, 8, 3), "g")
    >>> ds.image_shape, ds.mean
    ((8, 8, 3), (0.0, 0.0, 0.0))
    """
    from PIL import Image

    h, w, c = shape
    if hasattr(ds.train_images, "read") or np.dtype(ds.train_images.dtype) != np.uint8:
        raise UserError(f"{who}: only uint8 images held in memory can be resized")
    if {c, ds.image_shape[-1]} - {1, 3}:
        raise UserError(f"{who}: images of {ds.image_shape[-1]} channels cannot become {c}")

    def resize(images):
        out = np.empty((len(images), h, w, c), np.uint8)
        for i, image in enumerate(images[np.arange(len(images))]):  # synthetic sets: views
            picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
            picture = picture.resize((w, h), Image.Resampling.BILINEAR)
            out[i] = np.asarray(picture.convert("L" if c == 1 else "RGB")).reshape(h, w, c)
        return out

    def channels(stat):
        stat = np.asarray(stat, float)
        if len(stat) != c:
            stat = np.repeat(stat, c) if c == 3 else np.array([LUMA @ stat])
        return tuple(float(x) for x in stat)

    return dataclasses.replace(ds, train_images=resize(ds.train_images),
                               test_images=resize(ds.test_images), mean=channels(ds.mean),
                               std=channels(ds.std))  # fmt: skip


def load_mixture(text: str, data_dir: str | None, labels: str = "shared", resize: bool = False):
    """The `jaxpar.data.Dataset` of a mixture: sources read from ``DATA_DIR/<name>`` (or
    ``DATA_DIR`` itself where that folder does not exist, as tensorflow-datasets keeps each
    dataset in a folder of its own), joined; its `shares` say how batches draw from them, its
    `parts` hold each source's own dataset (labels as in the mixture) for evaluation."""
    from pathlib import Path

    shares = parse(text)

    def where(share):
        if data_dir is None:
            return None
        folder = Path(data_dir) / share.name
        return str(folder) if folder.is_dir() else data_dir

    sources = [loader(s.name)(s.name, where(s)) for s in shares]
    first = sources[0]
    for i, (s, ds) in enumerate(zip(shares[1:], sources[1:], strict=True), 1):
        if ds.image_shape != first.image_shape and resize:
            sources[i] = ds = resized(ds, first.image_shape, f"--dataset {text}: {s.name}")
        if ds.image_shape != first.image_shape:
            raise UserError(f"--dataset {text}: {s.name} has images of shape {ds.image_shape}, "
                            f"{shares[0].name} of {first.image_shape}; mix one shape, or add "
                            f"--resize-sources to resize them to {shares[0].name}'s")  # fmt: skip
        if np.dtype(ds.train_images.dtype) != np.dtype(first.train_images.dtype):
            raise UserError(f"--dataset {text}: {s.name} stores {ds.train_images.dtype} images, "
                            f"{shares[0].name} {first.train_images.dtype}; mix sources that store "
                            "the same pixel type")  # fmt: skip
    shifts = [int(x) for x in np.cumsum([0] + [ds.num_classes for ds in sources[:-1]])]
    offsets = shifts if labels == "joint" else None
    classes = sum(ds.num_classes for ds in sources) if offsets else max(
        ds.num_classes for ds in sources)  # fmt: skip
    weights = np.array([s.weight for s in shares]) / sum(s.weight for s in shares)
    mean, std = _pooled(weights, [ds.mean for ds in sources], [ds.std for ds in sources])
    parts = []
    for i, (s, ds) in enumerate(zip(shares, sources, strict=True)):
        labels_here = ds.test_labels
        if offsets and shifts[i]:
            labels_here = Joined([ds.test_labels], [shifts[i]])
        parts.append((s.name, dataclasses.replace(ds, test_labels=labels_here, num_classes=classes,
                                                  mean=mean, std=std)))  # fmt: skip

    def joined(arrays, offsets=None):  # plain arrays where every source's are in memory
        if all(isinstance(a, np.ndarray) for a in arrays):
            out = np.concatenate(arrays)
            if offsets:
                out = out + np.repeat(offsets, [len(a) for a in arrays]).astype(out.dtype)
            return out
        return Joined(arrays, offsets)

    return Dataset(
        text,
        joined([ds.train_images for ds in sources]),
        joined([ds.train_labels for ds in sources], offsets),
        joined([ds.test_images for ds in sources]),
        joined([ds.test_labels for ds in sources], offsets),
        classes, mean=mean, std=std, augment=first.augment, shares=tuple(shares),
        parts=tuple(parts),
    )  # fmt: skip
