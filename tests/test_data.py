"""Datasets, the batch order, evaluation coverage and on-device augmentation."""

import gzip
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import digits

import train as cli
from jaxpar import Config, UserError
from jaxpar.core.mesh import make_mesh, parse_mesh
from jaxpar.core.sharding import batch_sharding
from jaxpar.data import (
    crop_and_flip,
    device_batch,
    eval_batches,
    load_dataset,
    prefetch,
    train_batches,
    train_indices,
)

ROOT = Path(__file__).resolve().parent.parent


def write_idx(path, array, compress):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    for split, n, compress in (("train", 50, True), ("t10k", 20, False)):
        images = rng.integers(0, 256, (n, 28, 28))
        labels = rng.integers(0, 10, n)
        suffix = ".gz" if compress else ""
        write_idx(tmp_path / f"{split}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte{suffix}", labels, compress)
    return tmp_path


def test_idx_files_are_read_directly(idx_dir):
    ds = load_dataset("mnist", str(idx_dir))
    assert ds.train_images.shape == (50, 28, 28, 1) and ds.train_images.dtype == np.uint8
    assert ds.test_labels.shape == (20,) and ds.num_classes == 10
    raw = gzip.decompress((idx_dir / "train-images-idx3-ubyte.gz").read_bytes())
    np.testing.assert_array_equal(ds.train_images[0, :, :, 0].ravel(), list(raw[16 : 16 + 784]))


def test_idx_problems_are_named(idx_dir):
    (idx_dir / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(UserError, match="lacks t10k-labels-idx1-ubyte"):
        load_dataset("fashion_mnist", str(idx_dir))
    write_idx(idx_dir / "t10k-labels-idx1-ubyte", np.zeros(7), compress=False)
    with pytest.raises(UserError, match=r"expected N x 28 x 28 images and N labels"):
        load_dataset("mnist", str(idx_dir))
    (idx_dir / "t10k-labels-idx1-ubyte").write_bytes(b"not an idx file")
    with pytest.raises(UserError, match="is not an IDX file"):
        load_dataset("mnist", str(idx_dir))


def test_missing_tfds_data_says_how_to_get_it(tmp_path, capsys):
    with pytest.raises(UserError, match="tfds build cifar10 --data_dir DIR"):
        load_dataset("cifar10", str(tmp_path))
    assert cli.main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--steps", "1"]) == 2
    assert "no prepared train split" in capsys.readouterr().err
    with pytest.raises(UserError, match="--manual_dir DIR_WITH_ILSVRC2012_img_train.tar"):
        load_dataset("imagenet2012", str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("data_dir", [True, False])
def test_missing_mnist_names_both_routes_in_one_line_of_a_real_process(data_dir, tmp_path):
    """Nothing printed before the error line (tfds logged "Variant folder ... has no
    dataset_info.json" first), and the IDX files are named as well as tfds build."""
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["--dataset", "mnist", "--steps", "1", "--workdir", str(tmp_path / "w")]
    args += ["--data-dir", str(empty)] if data_dir else []
    env = {**os.environ, "TFDS_DATA_DIR": str(empty)}  # tfds's default data directory: empty too
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True,
                          text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: mnist: ") and proc.stderr.count("\n") == 1, proc.stderr
    for stem in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1"):
        assert f"{stem}-ubyte[.gz]" in proc.stderr
    assert "tfds build mnist --data_dir DIR" in proc.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["empty"]  # nothing written


@pytest.mark.parametrize(
    "name, shape, model", [("mnist", (28, 28, 1), "mlp"), ("cifar10", (32, 32, 3), "resnet8")]
)
@pytest.mark.slow
def test_tfds_datasets_train_one_real_step(name, shape, model, tmp_path):
    with tfds.testing.mock_data(num_examples=64):
        ds = load_dataset(name)
        assert ds.image_shape == shape and ds.train_images.dtype == np.uint8
        assert ds.augment == (name == "cifar10")
        args = ["--dataset", name, "--model", model, "--steps", "1", "--batch-size", "16"]
        assert cli.main([*args, "--mesh", "2x2", "--workdir", str(tmp_path)]) == 0


class Counting:
    """A data source that counts its reads."""

    def __init__(self, source):
        self.source, self.reads = source, 0

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        self.reads += 1
        return self.source[i]


@pytest.mark.slow
def test_imagenet_streams_seeded_crops_the_same_on_every_mesh(tmp_path):
    with tfds.testing.mock_data(num_examples=48):  # random JPEG-decoded images of random sizes
        ds = load_dataset("imagenet2012")
        assert ds.image_shape == (224, 224, 3) and ds.num_classes == 1000
        assert not isinstance(ds.train_images, np.ndarray)  # nothing read up front
        records = ds.train_images.read.__self__
        records.source = Counting(records.source)
        one, grid = make_mesh(parse_mesh("1")), make_mesh(parse_mesh("2x2"))
        a = next(train_batches(ds, 16, 5, [3], one))
        reads = records.source.reads
        b = next(train_batches(ds, 16, 5, [3], grid))
        assert reads == records.source.reads - reads == 16  # each row once, labels included
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
        rows, seeds = train_indices(ds, 16, 5, 3), np.stack([np.full(16, 5), np.arange(16)], -1)
        read = ds.train_images.read
        np.testing.assert_array_equal(read(rows, seeds), read(rows, seeds))
        assert not np.array_equal(read(rows, seeds), read(rows, seeds + [0, 16]))  # other step
        evals = [np.asarray(next(eval_batches(ds, 16, m))["image"]) for m in (one, grid)]
        np.testing.assert_array_equal(*evals)
        args = ["--dataset", "imagenet2012", "--model", "resnet8", "--steps", "2"]
        args += ["--batch-size", "8", "--mesh", "2x2", "--workdir", str(tmp_path)]
        assert cli.main(args) == 0


def test_random_resized_crop_is_seeded_and_handles_extreme_shapes():
    from jaxpar.data.imagenet import center_crop, random_resized_crop

    image = np.random.default_rng(0).integers(0, 256, (300, 500, 3), np.uint8)
    crop = lambda s, img=image: random_resized_crop(img, np.random.default_rng(s))  # noqa: E731
    np.testing.assert_array_equal(crop(1), crop(1))
    assert not np.array_equal(crop(1), crop(2))
    for shape in [(4000, 3, 3), (3, 4000, 3), (1, 1, 3)]:  # falls back to a central box
        assert crop(0, np.full(shape, 7, np.uint8)).shape == (224, 224, 3)
    assert center_crop(image).shape == (224, 224, 3)
    assert center_crop(np.full((64, 48, 3), 9, np.uint8)).max() == 9


def test_synthetic_any_shape():
    ds = load_dataset("synthetic:16x12x2:5")
    assert ds.image_shape == (16, 12, 2) and ds.num_classes == 5
    assert len(ds.train_labels) == 50_000 and ds.train_images[[0, 49_999]].shape == (2, 16, 12, 2)
    with pytest.raises(UserError, match="synthetic:HxWxC:K"):
        load_dataset("synthetic:big")


def test_synthetic_images_are_class_patterns_plus_noise():
    ds = load_dataset("synthetic:6x5x2:3")
    pool, labels = ds.train_images.pool, ds.train_labels.pool
    assert pool.dtype == np.uint8 and pool.shape == (4096, 6, 5, 2) and pool.max() <= 254
    means = np.stack([pool[labels == k].mean(0) for k in range(3)])  # noise averages out
    assert np.abs(means - means.mean(0)).mean() > 10  # each class has its own pattern
    spread = pool[labels == 0].astype(np.int16) - pool[labels == 0].min(0)
    assert 100 < spread.max() < 128 and spread.std() > 20  # uniform noise in [0, 128)
    np.testing.assert_array_equal(pool, load_dataset("synthetic:6x5x2:3").train_images.pool)


@pytest.mark.slow
def test_synthetic_pool_is_built_without_large_intermediates(tmp_path):
    """ImageNet-size synthetic data peaked at 7.5 GB (int64 intermediates) for a 256 MiB pool."""
    script = (
        "import resource\n"
        "from jaxpar.data import load_dataset\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "pool = load_dataset('synthetic:224x224x3:1000').train_images.pool\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(pool.dtype, pool.nbytes, (after - before) * 1024)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    dtype, nbytes, grown = proc.stdout.split()
    assert dtype == "uint8" and int(nbytes) <= 2**28
    assert int(grown) < 1.5 * int(nbytes), f"peak grew {int(grown) >> 20} MiB"


class Jpegs:
    """Records as tensorflow-datasets hands them out, decoded on access: generated JPEGs of
    several sizes (picklable, so grain's worker processes can read them)."""

    def __init__(self, n):
        import io

        from PIL import Image

        rng, self.blobs = np.random.default_rng(0), []
        for i in range(n):
            out = io.BytesIO()
            pixels = rng.integers(0, 256, (40 + 7 * i, 60 - 3 * i, 3), np.uint8)
            Image.fromarray(pixels).save(out, "JPEG")
            self.blobs.append(out.getvalue())

    def __len__(self):
        return len(self.blobs)

    def __getitem__(self, i):
        import io

        from PIL import Image

        with Image.open(io.BytesIO(self.blobs[i])) as image:
            return {"image": np.asarray(image.convert("RGB")), "label": i % 7}


@pytest.mark.slow
def test_worker_processes_read_the_same_batches():
    """--data-workers: grain's processes read (decode, crop) the batches this process would."""
    from jaxpar.data import Dataset
    from jaxpar.data.imagenet import Records

    mesh, plan = make_mesh(parse_mesh("2x2")), [0, range(1, 3), 3]
    records = Records(Jpegs(12), threads=2)
    jpegs = Dataset("jpegs", records.images, records.labels, records.images, records.labels, 7)
    for ds, batch in ((jpegs, 4), (digits(), 32)):
        here = [jax.device_get(b) for b in train_batches(ds, batch, 5, plan, mesh)]
        there = [jax.device_get(b) for b in train_batches(ds, batch, 5, plan, mesh, workers=2)]
        for a, b in zip(here, there, strict=True):
            for key in ("image", "label"):
                np.testing.assert_array_equal(a[key], b[key])
    assert here[1]["image"].shape == (2, 32, 8, 8, 1)  # stacked steps stay stacked


class Pids:
    """Items that say which process read them."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return {"read": np.array([os.getpid(), i])}


@pytest.mark.slow
def test_data_workers_read_in_their_own_processes_in_order_and_stop_when_closed():
    import multiprocessing

    from jaxpar.data import in_order

    reads = [item["read"] for item in in_order(Pids(), workers=2)]
    assert [int(i) for _, i in reads] == list(range(6))
    pids = {int(pid) for pid, _ in reads}
    assert len(pids) == 2 and os.getpid() not in pids  # worker j read items j, j + 2, ...
    assert not multiprocessing.active_children()  # stopped once read to the end
    batches = prefetch(train_batches(digits(), 32, 0, range(1000), make_mesh(parse_mesh("1")), 2))
    next(batches)
    assert len(multiprocessing.active_children()) == 2
    batches.close()  # as the training loop does on its way out (a signal, an error)
    for _ in range(100):
        if not multiprocessing.active_children():
            break
        time.sleep(0.1)
    assert not multiprocessing.active_children(), "the workers outlived their batches"


HELD_TO_THE_END = """
import os, numpy as np
from jaxpar.data import in_order

class Blocks:
    def __len__(self):
        return 3

    def __getitem__(self, i):
        return {"image": [np.full(1000, i), np.full(1000, -i)], "label": [np.arange(100) + i]}

if __name__ == "__main__":
    kept = list(in_order(Blocks(), workers=2))  # alive at exit, as a run's last batches are
    assert [int(x["image"][1][0]) for x in kept] == [0, -1, -2]
    names = [a.shm.name for x in kept for blocks in x.values() for a in blocks]
    assert len(names) == 9 and not [n for n in names if os.path.exists("/dev/shm/" + n)]
"""


@pytest.mark.slow
def test_worker_batches_leave_no_shared_memory_behind(tmp_path):
    """Arrays from --data-workers held until the process exits: no shared memory file is left
    and Python's resource tracker does not warn of leaked ones (it did at every such exit)."""
    script = tmp_path / "held.py"
    script.write_text(HELD_TO_THE_END)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "leaked shared_memory" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_a_run_with_data_workers_writes_the_same_metrics(tmp_path):
    import json

    def losses(name, *extra):
        args = ["--steps", "4", "--log-every", "1", "--workdir", str(tmp_path / name), *extra]
        assert cli.main(args) == 0
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [
            (m["step"], m.get("train_loss"), m.get("eval_loss")) for m in map(json.loads, lines)
        ]

    assert losses("workers", "--data-workers", "2") == losses("here")


def test_global_batch_is_the_same_on_every_mesh():
    ds = digits()
    data = {"image": ds.train_images, "label": ds.train_labels}
    rows = train_indices(ds, 64, 3, 25)
    batches = [device_batch(data, rows, make_mesh(parse_mesh(m))) for m in ("1", "2x2", "fsdp=8")]
    for b in batches[1:]:
        np.testing.assert_array_equal(np.asarray(b["image"]), np.asarray(batches[0]["image"]))
    np.testing.assert_array_equal(np.asarray(batches[0]["label"]), ds.train_labels[rows])


def test_resuming_mid_epoch_gives_the_same_next_batches():
    ds, mesh = digits(), make_mesh(parse_mesh("2"))
    straight = list(train_batches(ds, 100, 7, range(0, 20), mesh))
    resumed = list(prefetch(train_batches(ds, 100, 7, range(13, 20), mesh)))
    for a, b in zip(straight[13:], resumed, strict=True):
        np.testing.assert_array_equal(np.asarray(a["label"]), np.asarray(b["label"]))
    epochs = {tuple(sorted(train_indices(ds, 100, 7, s))) for s in range(14)}
    assert len(epochs) == 14  # 14 batches per epoch, no row repeated within an epoch


def test_stacked_batches_hold_each_steps_batch_sharded_by_rows():
    ds, mesh = digits(), make_mesh(parse_mesh("2x2"))
    [stacked] = train_batches(ds, 64, 3, [range(5, 8)], mesh)
    singles = list(train_batches(ds, 64, 3, range(5, 8), mesh))
    image = stacked["image"]
    assert image.shape == (3, 64, 8, 8, 1)
    assert image.sharding.shard_shape(image.shape) == (3, 32, 8, 8, 1)  # data=2 splits the rows
    for i, single in enumerate(singles):  # read as one chunk, handed out as on-device slices
        assert single["image"].sharding.is_equivalent_to(batch_sharding(mesh, 4), 4)
        np.testing.assert_array_equal(np.asarray(image[i]), np.asarray(single["image"]))
        np.testing.assert_array_equal(np.asarray(stacked["label"][i]), np.asarray(single["label"]))


def test_in_memory_test_splits_stay_on_the_devices_streamed_ones_are_read_again():
    from types import SimpleNamespace

    from jaxpar.run.evaluation import evaluation_batches

    mesh = make_mesh(parse_mesh("2"))
    for ds, kept in [(digits(), True), (load_dataset("synthetic:4x4x1:3"), False)]:
        cfg = Config.of(batch_size=500, eval_examples=None)
        run = SimpleNamespace(ds=ds, cfg=cfg, mesh=mesh, spec=parse_mesh("2"))
        batches = evaluation_batches(run)
        first, again = batches(), batches()
        assert (first is again) == kept  # the same device arrays, or a fresh read
        labels = np.concatenate([np.asarray(b["label"]) for b in first])
        assert len(labels) >= len(ds.test_labels)


@pytest.mark.parametrize("mesh", ["8", "2x4"])
def test_evaluation_counts_each_example_once(mesh):
    ds = digits()
    labels, weights = [], []
    for batch in eval_batches(ds, 128, make_mesh(parse_mesh(mesh))):
        labels.append(np.asarray(batch["label"]))
        weights.append(np.asarray(batch["mask"]))
    labels, weights = np.concatenate(labels), np.concatenate(weights)
    assert len(labels) == 384 and weights.sum() == 360  # 3 batches, the last padded
    np.testing.assert_array_equal(labels[weights == 1], ds.test_labels)


def test_augmentation_is_deterministic_and_mesh_independent():
    images = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype(np.float32)
    key = jax.random.key(5)
    out = [
        np.asarray(jax.jit(crop_and_flip)(jax.device_put(images, s), key))
        for s in (None, jax.sharding.NamedSharding(make_mesh(parse_mesh("8")), jax.P("data")))
    ]
    np.testing.assert_array_equal(out[0], out[1])
    assert out[0].shape == images.shape and not np.array_equal(out[0], images)


def test_prefetch_passes_errors_on():
    def broken():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(prefetch(broken()))
