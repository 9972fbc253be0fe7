"""ImageNet (``imagenet2012``): streamed from tensorflow-datasets' files, cropped on the host.

1.28 million JPEGs do not fit in memory, so nothing is read up front. Each step reads only the rows
of this process's devices from the ArrayRecord files (random access through `tfds.data_source`,
no TensorFlow), which tfds decodes with OpenCV or PIL, and crops them to 224x224 in a thread pool
(both release the GIL):

- training: the Inception random-resized crop (area 8-100%, aspect 3/4-4/3, as torchvision draws
  it) and a horizontal flip, from a generator seeded with (seed, step, position in the global
  batch), so every mesh and process count, and a resumed run, sees the same pixels;
- evaluation: the central 87.5% square, resized (the usual resize-to-256, crop-224).

Normalisation with ImageNet's statistics runs on the devices, as for the other datasets.
"""

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

SIZE = 224


def resize(image: np.ndarray, box, size: int = SIZE) -> np.ndarray:
    """The `box` ``(left, top, right, bottom)`` of `image`, resized bilinearly to size x size."""
    from PIL import Image

    out = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(out)


def random_resized_crop(image, rng, size=SIZE, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """A random box of drawn area and aspect (10 tries, else the central box of the nearest
    allowed aspect), resized to size x size and flipped with probability 1/2.

    >>> rng = np.random.default_rng(0)
    >>> random_resized_crop(np.zeros((300, 500, 3), np.uint8), rng, size=32).shape
    (32, 32, 3)
    """
    h, w = image.shape[:2]
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            break
    else:
        cw, ch = min(w, round(h * ratio[1])), min(h, round(w / ratio[0]))
        x, y = (w - cw) // 2, (h - ch) // 2
    out = resize(image, (x, y, x + cw, y + ch), size)
    return out[:, ::-1] if rng.random() < 0.5 else out


def center_crop(image, size=SIZE, fraction=0.875):
    """The central square of `fraction` of the shorter side, resized to size x size."""
    h, w = image.shape[:2]
    side = fraction * min(h, w)
    x, y = (w - side) / 2, (h - side) / 2
    return resize(image, (x, y, x + side, y + side), size)


class Records:
    """One split, read on demand; `images` and `labels` are array-likes over it.

    Reading rows for the images keeps their labels until the labels of those rows are read, so
    each record is read and decoded once.
    """

    def __init__(self, source, threads: int | None = None):
        self.source, self.kept = source, {}
        self.pool = ThreadPoolExecutor(threads or min(32, os.cpu_count() or 1))
        self.images = Column(self.read_images, (len(source), SIZE, SIZE, 3), np.uint8)
        self.labels = Column(self.read_labels, (len(source),), np.int32)

    def __getstate__(self):
        """A copy for a worker process (`--data-workers`): the source, decoding in one thread
        there, since the processes are the parallelism."""
        return {"source": self.source, "threads": 1}

    def __setstate__(self, state):
        self.__init__(state["source"], state["threads"])

    def read_one(self, row: int, seed) -> np.ndarray:
        """One record's 224x224 image: a seeded training crop, or the central crop."""
        record = self.source[row]
        self.kept[row] = int(record["label"])
        if seed is None:
            return center_crop(record["image"])
        return random_resized_crop(record["image"], np.random.default_rng(list(seed)))

    def read_images(self, rows: np.ndarray, seeds=None) -> np.ndarray:
        flat = [int(r) for r in rows.reshape(-1)]
        drawn = [None] * len(flat) if seeds is None else seeds.reshape(len(flat), -1)
        images = list(self.pool.map(self.read_one, flat, drawn))
        return np.stack(images).reshape(*rows.shape, SIZE, SIZE, 3)

    def read_labels(self, rows: np.ndarray, seeds=None) -> np.ndarray:
        flat = [int(r) for r in rows.reshape(-1)]
        labels = [self.kept[r] if r in self.kept else int(self.source[r]["label"]) for r in flat]
        for r in flat:
            self.kept.pop(r, None)
        return np.array(labels, np.int32).reshape(rows.shape)


class Column:
    """An array-like column of `Records`: ``read(rows, seeds)`` reads those rows."""

    def __init__(self, read, shape, dtype):
        self.read, self.shape, self.dtype = read, shape, np.dtype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows):
        return self.read(np.asarray(rows))
