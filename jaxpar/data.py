"""Datasets and the deterministic batch order.

The global batch of a step is a function of (seed, epoch, step) only: a permutation of the training
set drawn from ``(seed, epoch)``, cut into consecutive batches (the last partial batch is dropped).
Each device then fetches just its own rows (`jax.make_array_from_callback`), so the order is the
same on every mesh and process count, each process reads only the rows its devices hold, and
resuming needs only the step. Reading (and, for ImageNet, decoding and cropping) can run in grain
worker processes (``--data-workers``, `in_order`): the batches are the same.

Images stay in host memory as stored (uint8 for real datasets) and are converted, normalised with
per-dataset statistics and augmented on the devices, inside the jitted step (`preprocess`).
Augmentation draws from ``fold_in(key(seed), step)``, so it is the same on every mesh too.

Datasets: ``digits`` (embedded), ``mnist``, ``fashion_mnist`` (IDX files in ``--data-dir``, or
tensorflow-datasets), ``cifar10``, ``cifar100`` (tensorflow-datasets, read into memory),
``imagenet2012`` (tensorflow-datasets, streamed and cropped on the host: `jaxpar.imagenet`),
``synthetic`` (``synthetic:HxWxC:K``, for benchmarks).
"""

import contextlib
import dataclasses
import functools
import gzip
import logging
import queue
import re
import signal
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxpar.errors import UserError
from jaxpar.registry import Registry
from jaxpar.sharding import batch_sharding


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
    shares: tuple = ()  # a mixture's sources and their shares of a batch (`jaxpar.mixture`)
    parts: tuple = ()  # a mixture's ((source, Dataset), ...), each evaluated on its own

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
    # ImageNet's crops and flips are made on the host, from the full-size image (jaxpar.imagenet)
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
        from jaxpar.imagenet import Records

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


# A user's own loader is named module:attribute (`jaxpar.registry`): ``fn(name, data_dir)``
# returning a `Dataset`.
DATASETS = Registry(
    {"digits": load_digits, **dict.fromkeys(TFDS, load_tfds), "synthetic": load_synthetic}
)


def loader(name: str):
    """The loader of dataset `name`: a registered one (``synthetic:HxWxC:K`` passes options after
    its colon), or a ``module:attribute`` imported (`jaxpar.registry`); else a `UserError`."""
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


def load_dataset(
    name: str, data_dir: str | None = None, labels: str = "shared", resize: bool = False
) -> Dataset:
    """A dataset by name, or a mixture of several (``NAME=SHARE,...``: `jaxpar.mixture`)."""
    from jaxpar.mixture import is_mixture, load_mixture

    if is_mixture(name):
        return load_mixture(name, data_dir, labels, resize)
    return loader(name)(name, data_dir)


# --- order, batches, prefetching ----------------------------------------------------------


def _sampler(ds: Dataset, batch_size: int, seed: int = 0):
    from jaxpar.mixture import sampler

    sizes = tuple(len(part.train_labels) for _, part in ds.parts)
    return sampler(ds.shares, batch_size, sizes, seed)


def steps_per_epoch(ds: Dataset, batch_size: int) -> int:
    if ds.shares:
        return _sampler(ds, batch_size).steps_per_epoch()
    n = len(ds.train_labels)
    if batch_size > n:
        raise UserError(f"--batch-size {batch_size} is larger than the {n} training examples")
    return n // batch_size


# One dataset's order stays this NumPy permutation rather than grain's shuffle (which a mixture's
# sources use, `jaxpar.mixture`): the runs, checkpoints and golden losses recorded before grain
# came in resume onto the same batches. grain reads the batches (`in_order`), not their order.
@functools.lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng((seed, epoch)).permutation(n)


def train_indices(ds: Dataset, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Rows of the global batch for optimizer step `step` (0-based)."""
    if ds.shares:  # a mixture: each source's share, from its own stream
        return _sampler(ds, batch_size, seed).indices(step)
    epoch, i = divmod(step, steps_per_epoch(ds, batch_size))
    return _permutation(seed, epoch, len(ds.train_labels))[i * batch_size : (i + 1) * batch_size]


def local_blocks(mesh, shape: tuple) -> dict:
    """``{spans: index}``: the row blocks of a batch of rows shaped `shape` (``(B,)``, or
    ``(K, B)`` for K stacked steps) that this process's devices hold, each block once (devices
    that differ only along ``model`` hold the same block). Plain tuples and slices: they travel
    to worker processes."""
    n = len(shape)
    index = batch_sharding(mesh, n, stacked=n == 2).addressable_devices_indices_map(shape)
    return {_spans(i, n): i for i in index.values()}


def _spans(index, n: int) -> tuple:
    return tuple((s.start, s.stop) for s in index[:n])  # a dict key


def read_blocks(arrays: dict, rows: np.ndarray, blocks: dict, seeds=None) -> dict:
    """The host side of a batch: ``{k: [arrays[k][rows[index]] for each block]}``, read in the
    order of `arrays` (a source may read labels with its images). No JAX: runs in any process.
    `seeds`, shaped like `rows` plus a last axis, seed the host-side augmentation of sources that
    have one (``source.read(rows, seeds)``, e.g. ImageNet's crops)."""
    return {
        k: [
            read_rows(source, rows[i], None if seeds is None else seeds[i]) for i in blocks.values()
        ]
        for k, source in arrays.items()
    }


def to_devices(read: dict, shape: tuple, mesh, blocks: dict) -> dict[str, jax.Array]:
    """Global batch-sharded arrays from `read_blocks`' blocks of rows shaped `shape`."""
    n, position = len(shape), {b: j for j, b in enumerate(blocks)}

    def one(k):
        full = (*shape, *read[k][0].shape[n:])
        sharding = batch_sharding(mesh, len(full), stacked=n == 2)
        return jax.make_array_from_callback(
            full, sharding, lambda i: read[k][position[_spans(i, n)]]
        )

    return {k: one(k) for k in read}


def device_batch(arrays: dict, rows: np.ndarray, mesh, seeds=None) -> dict[str, jax.Array]:
    """Global arrays of ``arrays[k][rows]``, batch-sharded over the mesh.

    `rows` is one batch's ``(B,)`` or a stack of batches' ``(K, B)``. Each process reads only the
    row blocks of its own devices (`local_blocks`, `read_blocks`).
    """
    blocks = local_blocks(mesh, rows.shape)
    return to_devices(read_blocks(arrays, rows, blocks, seeds), rows.shape, mesh, blocks)


def read_rows(source, rows, seeds=None):
    """`source`'s `rows`: ``source.read(rows, seeds)`` for sources that augment on the host
    (ImageNet's crops, a mixture's), else ``source[rows]``."""
    return source.read(rows, seeds) if hasattr(source, "read") else source[rows]


class TrainReads:
    """The host side of `train_batches`, as a sequence: item i is the blocks of dispatch
    ``plan[i]`` (a step, or a range of steps stacked) that this process's devices hold.

    A function of (seed, step) alone, so it can be read in any process and any order: grain's
    worker processes each get a copy (pickled) and read every N-th item.
    """

    def __init__(self, ds: Dataset, batch_size: int, seed: int, plan: list, mesh):
        self.ds, self.batch_size, self.seed, self.plan = ds, batch_size, seed, plan
        self.blocks = {shape: local_blocks(mesh, shape) for shape in set(map(self.shape, plan))}

    def shape(self, item) -> tuple:
        """The shape of `item`'s rows: ``(B,)`` for a step, ``(K, B)`` for K stacked steps."""
        k = len(item) if isinstance(item, range) else 1
        return (k, self.batch_size) if k > 1 else (self.batch_size,)

    def rows_and_seeds(self, step: int):
        """The step's rows, and the host-side augmentation seeds: (seed, position in the run's
        sequence of examples), the same on every mesh and process count."""
        seeds = np.stack([np.full(self.batch_size, self.seed),
                          step * self.batch_size + np.arange(self.batch_size)], -1)  # fmt: skip
        return train_indices(self.ds, self.batch_size, self.seed, step), seeds

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> dict:
        item = self.plan[i]
        steps = item if isinstance(item, range) else [item]
        rows, seeds = (np.stack(x) for x in zip(*map(self.rows_and_seeds, steps), strict=True))
        shape = self.shape(item)
        rows, seeds = rows.reshape(shape), seeds.reshape(*shape, -1)
        arrays = {"image": self.ds.train_images, "label": self.ds.train_labels}
        return read_blocks(arrays, rows, self.blocks[shape], seeds)


def in_order(reads, workers: int = 0):
    """The items of the sequence `reads`, in order: read here (`workers` 0), or by `workers`
    grain worker processes, worker j reading items j, j + N, ... two ahead of their use (each with
    its own copy of `reads`; the arrays come back through shared memory, ``/dev/shm``)."""
    if not workers:
        yield from (reads[i] for i in range(len(reads)))
        return
    import grain
    from absl import flags

    # grain 0.2.18 reads an absl flag, which fails unless flags were parsed (google/grain#1355).
    # This marks absl's flags parsed, at their defaults, for the rest of the process; jaxpar
    # reads none of them.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    # One read at a time in each worker, none buffered beyond grain's two per worker: an item is
    # a whole batch (38 MB for 256 ImageNet crops), and grain's default reads up to 500 ahead in
    # 16 threads.
    ds = grain.MapDataset.source(reads).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    )
    options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2)
    items = iter(ds.mp_prefetch(options, worker_init_fn=_leave_signals_to_the_trainer))
    try:
        yield from map(_unlinked, items)
    finally:
        items.close()  # stops the worker processes now rather than at garbage collection


def _unlinked(item):
    """`item` with its arrays' ``/dev/shm`` names removed now that this process has them mapped
    (the memory stays until the arrays go): grain removes them when an array is deleted, and the
    batches' last arrays, which JAX's CPU arrays share, outlived that at exit, so Python's
    resource tracker warned of leaked shared memory at every exit of a run with workers."""
    from grain._src.python.ipc.shared_memory_array import SharedMemoryArray

    for leaf in jax.tree.leaves(item):
        if isinstance(leaf, SharedMemoryArray) and leaf._unlink_on_del:
            leaf.shm.unlink()
            leaf._unlink_on_del = False  # grain would remove the name again when it is deleted
    return item


def _leave_signals_to_the_trainer(worker: int, workers: int) -> None:
    """Workers ignore Ctrl-C and SIGTERM (sent to the whole process group): the training process
    saves its checkpoint, then stops them (grain kills those that do not stop)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# Performance is decided here for small batches on CPUs: putting an array on a CPU device while
# XLA's threads compute blocks the caller 0.4-0.7 ms (measured; why is not), even for 512
# bytes and even zero-copy; that cost the MLP's 2.7 ms step 7-10%. So consecutive single steps
# are read as one stacked array of up to CHUNK_BYTES (one put per run) and cut into the steps'
# batches on the devices (`_cut`: one dispatch per run, no transfer).
CHUNK_BYTES, CHUNK_STEPS = 8 << 20, 64


def _chunks(plan: list, steps: int) -> list[tuple[range, bool]]:
    """``(item to read, handed out step by step)``: runs of consecutive single steps grouped
    into ranges of up to `steps`; multi-step dispatches kept as they are.

    >>> _chunks([0, 1, 2, range(3, 5), range(5, 6), 6, 9], 2)
    [(range(0, 2), True), (range(2, 3), True), (range(3, 5), False), (range(5, 7), True), \
(range(9, 10), True)]
    """
    out: list = []
    for item in plan:
        if isinstance(item, range) and len(item) != 1:
            out.append((item, False))
            continue
        step = item.start if isinstance(item, range) else item
        last = out[-1][0] if out and out[-1][1] else None
        if last is not None and last.stop == step and len(last) < steps:
            out[-1] = (range(last.start, step + 1), True)
        else:
            out.append((range(step, step + 1), True))
    return out


@functools.lru_cache(maxsize=16)
def _cut(mesh, ndims: tuple, k: int):
    """A jitted ``stacked batch -> [batch of step j for j < k]`` (keys and array ranks in
    `ndims`), each sharded as a single step's batch: compiled once per run length."""
    out = {key: batch_sharding(mesh, n - 1) for key, n in ndims}
    cut = lambda stacked: [{key: a[j] for key, a in stacked.items()} for j in range(k)]  # noqa: E731
    return jax.jit(cut, out_shardings=[out] * k)


def train_batches(ds: Dataset, batch_size: int, seed: int, steps, mesh, workers: int = 0):
    """The device batch of each step in `steps`; an item that is a range of several steps gives
    their batches stacked (leading axis: steps) for one multi-step dispatch. Host-side
    augmentation is seeded by (seed, step, position in the global batch). With `workers`, the
    host side (reading, decoding, cropping) runs in that many grain worker processes; the
    batches are the same."""
    row_bytes = np.dtype(ds.train_images.dtype).itemsize * int(np.prod(ds.image_shape)) + 4
    chunk = int(np.clip(CHUNK_BYTES // (row_bytes * batch_size), 1, CHUNK_STEPS))
    groups = _chunks(list(steps), chunk)
    reads = TrainReads(ds, batch_size, seed, [item for item, _ in groups], mesh)
    with contextlib.closing(in_order(reads, workers)) as host:  # closing this closes the workers
        for (item, single), read in zip(groups, host, strict=True):
            shape = reads.shape(item)
            batch = to_devices(read, shape, mesh, reads.blocks[shape])
            if not single or len(item) == 1:
                yield batch
                continue
            yield from _cut(mesh, tuple((k, a.ndim) for k, a in batch.items()), len(item))(batch)


def prefetch(batches, depth: int = 2):
    """Build the next `depth` batches (host reads and host-to-device copies) in a thread, while
    the devices compute. Closing this generator (or dropping it) stops the thread and closes
    `batches` (which stops `--data-workers` processes)."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                ready.put(item, timeout=0.1)
                return True
        return False

    def fill():
        try:
            for batch in batches:
                if not put(batch):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            put(e)
        finally:
            if hasattr(batches, "close"):
                batches.close()

    thread = threading.Thread(target=fill, daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()  # `batches` closed (worker processes stopped) before the caller goes on


def eval_batch_size(batch_size: int, examples: int, rows: int = 1024) -> int:
    """The evaluation batch: a whole multiple of the training batch (so it splits over the
    batch shards and pipeline microbatches as training's does) of about `rows` rows, no larger
    than the test split needs. Performance is decided here: evaluating 10,000 MNIST-size images
    in batches of 128 costs 79 dispatches and host syncs, which took 16% of a Fashion-MNIST
    run's time with per-epoch evaluation.

    >>> eval_batch_size(128, 10_000), eval_batch_size(128, 360), eval_batch_size(4096, 10_000)
    (1024, 384, 4096)
    """
    return batch_size * max(1, min(-(-examples // batch_size), rows // batch_size))


def eval_batches(ds: Dataset, batch_size: int, mesh, limit: int | None = None):
    """The test split (its first `limit` examples) in batches; the last one is padded and masked,
    so each example counts exactly once on every mesh."""
    n = min(len(ds.test_labels), limit or len(ds.test_labels))
    padded = -(-n // batch_size) * batch_size
    mask = (np.arange(padded) < n).astype(np.float32)
    rows = np.minimum(np.arange(padded), n - 1)  # padding repeats the last row, masked out
    arrays = {"image": ds.test_images, "label": ds.test_labels}
    for start in range(0, padded, batch_size):
        batch = device_batch(arrays, rows[start : start + batch_size], mesh)
        batch["mask"] = device_batch({"m": mask}, np.arange(start, start + batch_size), mesh)["m"]
        yield batch


def preprocess(ds: Dataset):
    """``prepare(images, key=None)``: float32, normalised, augmented when a key is given. Runs
    on the devices inside the jitted steps."""
    scale = 255.0 if np.dtype(ds.train_images.dtype) == np.uint8 else 1.0
    mean, std = np.asarray(ds.mean, np.float32), np.asarray(ds.std, np.float32)

    def prepare(images, key=None):
        x = (images.astype(jnp.float32) / scale - mean) / std
        return crop_and_flip(x, key) if ds.augment and key is not None else x

    return prepare


def crop_and_flip(images, key, pad: int = 4):
    """Random crop after zero padding, and horizontal flip, per image (the CIFAR recipe)."""
    n, h, w, _ = images.shape
    k1, k2 = jax.random.split(key)
    offsets = jax.random.randint(k1, (n, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(k2, 0.5, (n,))
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(img, off, flip):
        crop = jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))
        return jnp.where(flip, crop[:, ::-1], crop)

    return jax.vmap(one)(padded, offsets, flips)
