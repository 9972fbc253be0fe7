"""The deterministic batch order, and the batches each device reads.

The global batch of a step is a function of (seed, epoch, step) only: a permutation of the training
set drawn from ``(seed, epoch)``, cut into consecutive batches (the last partial batch is dropped).
Each device then fetches just its own rows (`jax.make_array_from_callback`), so the order is the
same on every mesh and process count, each process reads only the rows its devices hold, and
resuming needs only the step. Reading (and, for ImageNet, decoding and cropping) can run in grain
worker processes (``--data-workers``, `in_order`): the batches are the same.

Images stay in host memory as stored (uint8 for real datasets) and are converted, normalised with
per-dataset statistics and augmented on the devices, inside the jitted step (`preprocess`).
Augmentation draws from ``fold_in(key(seed), step)``, so it is the same on every mesh too.
"""

import contextlib
import dataclasses
import functools
import queue
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np

from jaxpar.core.errors import UserError
from jaxpar.core.sharding import batch_sharding
from jaxpar.data.datasets import Dataset, read_rows
from jaxpar.data.mixture import sampler

# --- order, batches, prefetching ----------------------------------------------------------


def _sampler(ds: Dataset, batch_size: int, seed: int = 0):
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
# sources use, `jaxpar.data.mixture`): the runs, checkpoints and golden losses recorded before grain
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


CORRUPTION = 1000.0  # what --corrupt-steps multiplies a batch's images by


def corrupted(batches, plan, steps: frozenset):
    """`batches` of `plan` (ranges of 0-based steps), those of the 1-based `steps` with their
    images multiplied by `CORRUPTION`: ``--corrupt-steps``, a spike on demand for testing
    ``--skip-spikes``. A stacked batch (several steps) has only its corrupted steps' scaled."""
    for item, batch in zip(plan, batches, strict=True):
        hit = np.array([s + 1 in steps for s in item])
        if hit.any():
            batch = {**batch, "image": _scaled(batch["image"], hit if len(item) > 1 else hit[0])}
        yield batch


@jax.jit
def _scaled(images, hit):
    factor = jnp.where(hit, CORRUPTION, 1.0).astype(images.dtype)
    return images * factor.reshape(factor.shape + (1,) * (images.ndim - factor.ndim))


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


def unit_interval(ds: Dataset):
    """``prepare(images, key=None)`` for models that read pixels as probabilities (an RBM):
    float32 in [0, 1], mapped from the training split's range (0-255 for bytes; the smallest and
    largest value otherwise, so a standardised copy such as the embedded digits gets its pixels
    back: x / 16 there; of the first 10,000 images when the split is not in memory), not
    normalised, not augmented."""
    low, high = pixel_range(ds)

    def prepare(images, key=None):
        return jnp.clip((images.astype(jnp.float32) - low) / (high - low), 0.0, 1.0)

    return prepare


def pixel_range(ds: Dataset) -> tuple[float, float]:
    """The training split's pixel range that `unit_interval` maps to [0, 1]: the dataset's own
    `Dataset.pixel_range` where it says, 0-255 for bytes, else the smallest and largest value
    (of the first 10,000 images when the split is not in memory)."""
    images = ds.train_images
    if ds.pixel_range is not None:
        return ds.pixel_range
    if np.dtype(images.dtype) == np.uint8:
        return 0.0, 255.0
    if not isinstance(images, np.ndarray):
        images = images[np.arange(min(len(images), 10_000))]
    return float(np.min(images)), float(np.max(images))


def labelled(ds: Dataset, fraction: float | None, seed: int) -> Dataset:
    """`ds` with its training split cut to `fraction` of its examples (``--labeled-fraction``),
    the same ones for a seed on any mesh (a permutation's first rows, kept in order); the
    pixel range stays the whole split's, so the examples' inputs are unchanged.

    >>> from jaxpar.data.datasets import load_digits
    >>> ds = load_digits()
    >>> part = labelled(ds, 0.01, seed=0)
    >>> len(part.train_labels), len(ds.train_labels), part.pixel_range == pixel_range(ds)
    (14, 1437, True)
    """
    if fraction is None or fraction == 1:
        return ds
    n = len(ds.train_labels)
    if not isinstance(ds.train_images, np.ndarray):
        raise UserError(f"--labeled-fraction with --dataset {ds.name}: its training split is "
                        "not held in memory as an array; use a dataset that is")  # fmt: skip
    rows = np.sort(np.random.default_rng(seed).permutation(n)[: max(1, round(fraction * n))])
    return dataclasses.replace(ds, train_images=ds.train_images[rows],
                               train_labels=ds.train_labels[rows],
                               pixel_range=pixel_range(ds))  # fmt: skip


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
