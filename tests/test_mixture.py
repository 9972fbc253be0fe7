"""Dataset mixtures (`jaxpar.data.mixture`): every batch holds each source's exact share, each
source runs through its own epochs, per-source evaluation, the same run on any mesh and across a
resume, and one-line refusals."""

import gzip
import json

import numpy as np
import pytest

import train as cli
from jaxpar.data import load_dataset, steps_per_epoch, train_indices

SIZES = {"mnist": 200, "fashion_mnist": 60}


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """MNIST-format files of two small learnable sources: a pattern per class plus noise."""
    root = tmp_path_factory.mktemp("mixture")
    for k, (name, n) in enumerate(SIZES.items()):
        (root / name).mkdir()
        rng = np.random.default_rng(k)
        patterns = rng.integers(0, 128, (10, 28, 28))
        for split, m in (("train", n), ("t10k", 40)):
            labels = rng.integers(0, 10, m)
            write_idx(root / name / f"{split}-images-idx3-ubyte.gz", patterns[labels]
                      + rng.integers(0, 128, (m, 28, 28)))  # fmt: skip
            write_idx(root / name / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


def test_every_batch_holds_each_share_and_each_source_runs_its_own_epochs(data_dir):
    from jaxpar.data.mixture import _epoch, sampler

    ds = load_dataset("mnist=48@ordered,fashion_mnist=16", str(data_dir))
    assert steps_per_epoch(ds, 64) == 4  # mnist's 200 rows pass once in 4 steps of 48
    rows = np.stack([train_indices(ds, 64, 0, step) for step in range(15)])
    is_mnist = rows < 200
    assert (is_mnist.sum(1) == 48).all()  # exact shares in every batch ...
    assert is_mnist[:, :16].sum(1).tolist() == [12] * 15  # ... and in each quarter of one
    mnist, fashion = rows[is_mnist], rows[~is_mnist] - 200  # each stream in batch order
    np.testing.assert_array_equal(mnist, np.arange(15 * 48) % 200)  # @ordered: repeats in order
    epochs = [fashion[e * 60 : (e + 1) * 60] for e in range(4)]  # the small source: 4 epochs
    assert all(sorted(e) == list(range(60)) for e in epochs)  # each a permutation of its own
    assert (epochs[0] != epochs[1]).any() and (epochs[0] != np.arange(60)).any()
    sampler.cache_clear(), _epoch.cache_clear()  # nothing kept: step 7 from (seed, step) alone
    again = load_dataset("mnist=48@ordered,fashion_mnist=16", str(data_dir))
    np.testing.assert_array_equal(train_indices(again, 64, 0, 7), rows[7])
    assert (train_indices(ds, 64, 1, 0) != rows[0]).any()  # another seed, another order


def test_fractions_round_by_largest_remainder_and_joint_labels_follow_each_other(data_dir):
    ds = load_dataset("fashion_mnist=0.75,mnist=0.25", str(data_dir), labels="joint")
    counts = np.bincount(train_indices(ds, 6, 0, 0) >= SIZES["fashion_mnist"], minlength=2)
    assert counts.tolist() == [5, 1]  # 4.5 and 1.5 rows: the tie goes to the first source
    assert ds.num_classes == 20
    fashion, mnist = (load_dataset(n, str(data_dir / n)) for n in ("fashion_mnist", "mnist"))
    np.testing.assert_array_equal(ds.train_labels[:60], fashion.train_labels)
    np.testing.assert_array_equal(ds.train_labels[60:], mnist.train_labels + 10)
    (_, fashion_part), (_, mnist_part) = ds.parts
    np.testing.assert_array_equal(fashion_part.test_labels, fashion.test_labels)
    np.testing.assert_array_equal(mnist_part.test_labels[np.arange(40)], mnist.test_labels + 10)


def metrics(workdir):
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_mixture_trains_alike_on_every_mesh_and_across_a_resume(data_dir, tmp_path):
    args = ["--dataset", "mnist=12,fashion_mnist=4", "--data-dir", str(data_dir), "--batch-size",
            "16", "--log-every", "1", "--eval-every", "3"]  # fmt: skip
    one, parts = tmp_path / "one", tmp_path / "parts"
    assert cli.main([*args, "--steps", "6", "--mesh", "1", "--workdir", str(one)]) == 0
    assert cli.main([*args, "--steps", "3", "--mesh", "fsdp=4", "--steps-per-dispatch", "3",
                     "--workdir", str(parts)]) == 0  # fmt: skip
    assert cli.main([*args, "--steps", "6", "--mesh", "2x2", "--workdir", str(parts)]) == 0
    a, b = metrics(one), metrics(parts)
    keys = ("train_loss", "eval_loss", "eval_accuracy/mnist", "eval_loss/fashion_mnist")
    pick = lambda lines: [(x["step"], k, x[k]) for x in lines for k in keys if k in x]  # noqa: E731
    assert [x[:2] for x in pick(a)] == [x[:2] for x in pick(b)]
    np.testing.assert_allclose([x[2] for x in pick(b)], [x[2] for x in pick(a)], rtol=1e-5)
    evals = [x for x in a if "eval_accuracy" in x]
    assert len(evals) == 2 and all("eval_accuracy/fashion_mnist" in x for x in evals)
    last = evals[-1]  # the mixture's accuracy counts every test example of both sources
    both = (last["eval_accuracy/mnist"] + last["eval_accuracy/fashion_mnist"]) / 2
    assert last["eval_accuracy"] == pytest.approx(both)  # 40 test examples each


@pytest.mark.parametrize(
    "dataset, message",
    [
        ("mnist=0,fashion_mnist=1", "the share of mnist must be a positive number, got 0"),
        ("mnist=1,mnist=2", "mnist is named twice"),
        ("mnist=0.5,imagenet=0.5", "unknown source 'imagenet'"),
        ("mnist=48,fashion_mnist=32", "counts summing to the batch (64); these sum to 80"),
        ("mnist=0.995,fashion_mnist=0.005", "fashion_mnist's share rounds to 0 of the 64 rows"),
        ("mnist=0.5,digits=0.5", "digits has images of shape (8, 8, 1), mnist of (28, 28, 1)"),
        (
            "digits=0.5,synthetic:8x8x1:10=0.5",
            "synthetic:8x8x1:10 stores uint8 images, digits "
            "float32; mix sources that store the same pixel type",
        ),
    ],
)
def test_bad_mixtures_exit_2_with_one_line(data_dir, tmp_path, capsys, dataset, message):
    args = ["--dataset", dataset, "--data-dir", str(data_dir), "--batch-size", "64", "--steps",
            "1", "--workdir", str(tmp_path / "w")]  # fmt: skip
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "w" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_sources_of_other_shapes_are_refused_or_resized(data_dir, tmp_path, capsys):
    """Refused, naming both shapes; with --resize-sources, resized (bilinear, RGB to grey) to the
    first source's shape."""
    from PIL import Image

    mix = "mnist=48,synthetic:20x20x3:10=16"
    args = ["--dataset", mix, "--data-dir", str(data_dir), "--batch-size", "64", "--steps", "2",
            "--workdir", str(tmp_path / "w")]  # fmt: skip
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "synthetic:20x20x3:10 has images of shape (20, 20, 3), mnist of (28, 28, 1)" in err
    assert "--resize-sources" in err and err.count("\n") == 1, err
    assert cli.main([*args, "--resize-sources"]) == 0
    ds = load_dataset(mix, str(data_dir), resize=True)
    assert ds.image_shape == dict(ds.parts)["synthetic:20x20x3:10"].image_shape == (28, 28, 1)
    original = load_dataset("synthetic:20x20x3:10").train_images[np.array([0])][0]
    expected = Image.fromarray(original).resize((28, 28), Image.Resampling.BILINEAR).convert("L")
    resized = ds.train_images[SIZES["mnist"], ..., 0]  # its first row
    np.testing.assert_array_equal(resized, np.asarray(expected))


def test_joint_labels_need_a_mixture(capsys):
    assert cli.main(["--labels", "joint", "--steps", "1"]) == 2
    assert "--labels joint goes with a mixture" in capsys.readouterr().err
