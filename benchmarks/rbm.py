"""RBMs and DBNs (issue #33) against scikit-learn, and a DBN's pretraining where labels are few.

1. scikit-learn's "RBM features for digit classification" setting: the 1,797 digits scaled to
   [0, 1] and nudged one pixel in each of four directions (8,985 images), split 80/20 with
   ``random_state=0`` (7,188 training images); 100 hidden units, learning rate 0.06, batch 10,
   10 epochs, persistent chains. jaxpar's ``--model rbm:100 --persistent`` on one device against
   `sklearn.neural_network.BernoulliRBM`: the test pseudo-log-likelihood (both computed exactly,
   by `jaxpar.models.rbm.RBM.pseudo_log_likelihood` on each one's weights), logistic
   regression on each one's features (C=6000, and on the raw pixels C=100, as the example;
   ``tol=1e-4``: the example's ``tol=1`` stops at once in scikit-learn 1.9), and training
   speed: jaxpar's images/s as its training lines time them (compilation, evaluation and
   checkpoints left out) against scikit-learn's over its whole ``fit``.
2. The same digits at MNIST's format (28x28, bilinear), a DBN ``784-500-500-2000``: each layer's
   pretraining speed in images/s on 1 device and on 4 (``--mesh 4``).
3. With ``--labeled-fraction 0.01`` (72 labelled images), the DBN fine-tuned from its
   pretraining against the same network from random initialisation, at equal fine-tuning steps
   and each learning rate; and the seed's ReLU MLP on the same labels, for scale.

    python benchmarks/rbm.py                  # all three (about 10 minutes on 2 cores)
    python benchmarks/rbm.py --parts 1        # the scikit-learn comparison alone
"""

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jaxpar

jaxpar.request_devices(4)  # before JAX starts: mesh 1 uses one of them

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.neural_network import BernoulliRBM  # noqa: E402

from jaxpar.data import DATASETS, Dataset  # noqa: E402
from jaxpar.run.checkpoint import Checkpoints  # noqa: E402
from jaxpar.run.pretrain import layer_weights  # noqa: E402

WORK = Path(tempfile.mkdtemp(prefix="jaxpar-rbm-"))


def nudged() -> tuple:
    """scikit-learn's example's data: each digit and its four one-pixel shifts, each pixel
    min-max scaled to [0, 1]."""
    digits = load_digits()
    images, labels = digits.images.astype(np.float32) / 16.0, digits.target
    shifted = [images]
    for axis, step in ((1, 1), (1, -1), (2, 1), (2, -1)):  # down, up, right, left; zeros enter
        moved = np.roll(images, step, axis=axis)
        edge = [slice(None)] * 3
        edge[axis] = 0 if step == 1 else -1
        moved[tuple(edge)] = 0
        shifted.append(moved)
    x, y = np.concatenate(shifted), np.tile(labels, 5)
    low, high = x.min(axis=0), x.max(axis=0)  # each pixel scaled to [0, 1], as the example
    x = ((x - low) / np.where(high > low, high - low, 1)).astype(np.float32)
    return train_test_split(x, y, test_size=0.2, random_state=0)


def as_dataset(name: str, size: int = 8) -> Dataset:
    x_train, x_test, y_train, y_test = nudged()
    if size != 8:  # MNIST's format: 28x28, bilinear
        zoom = (1, size / 8, size / 8)
        x_train, x_test = (np.clip(ndimage.zoom(x, zoom, order=1), 0, 1) for x in (x_train, x_test))
    return Dataset(name, x_train[..., None], y_train.astype(np.int32), x_test[..., None],
                   y_test.astype(np.int32), 10, pixel_range=(0.0, 1.0))  # fmt: skip


DATASETS["nudged_digits"] = lambda name, data_dir=None: as_dataset(name)
DATASETS["nudged_digits_28"] = lambda name, data_dir=None: as_dataset(name, 28)


def lines(workdir) -> list[dict]:
    return [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def speed(workdir) -> float:
    """The median images/s of a run's training lines (the loop's clock: steps only)."""
    return statistics.median(x["examples_per_s"] for x in lines(workdir) if "examples_per_s" in x)


def rbm_weights(workdir) -> tuple:
    ckpts = Checkpoints(workdir)
    step = ckpts.latest()
    ckpts.close()
    return layer_weights(workdir, step)


def exact_pll(x, kernel, visible_bias, hidden_bias) -> float:
    """The mean exact pseudo-log-likelihood of rows `x` under an RBM of these weights."""
    from flax import nnx

    from jaxpar.models import RBM

    rbm = RBM((x.shape[1],), 10, hidden=kernel.shape[1], rngs=nnx.Rngs(0))
    rbm.kernel[...], rbm.visible_bias[...], rbm.hidden_bias[...] = kernel, visible_bias, hidden_bias
    return float(np.mean(rbm.pseudo_log_likelihood(x)))


def logistic(train, test, y_train, y_test, c: float) -> float:
    model = LogisticRegression(C=c, max_iter=1000, tol=1e-4).fit(train, y_train)
    return float(model.score(test, y_test))


def part1(seeds=(0, 1, 2)) -> dict:
    """Quality over `seeds` at scikit-learn's settings (batch 10), and speed at batch 10 and 100."""
    x_train, x_test, y_train, y_test = (a.reshape(len(a), -1) if a.ndim > 1 else a
                                        for a in nudged())  # fmt: skip
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    rows, speeds = [], {}
    for seed in seeds:
        for batch in (100, 10) if seed == seeds[0] else (10,):  # the last: batch 10
            workdir = WORK / f"rbm-{seed}-{batch}"
            steps = len(x_train) // batch
            jaxpar.train(jaxpar.Config.of(model="rbm:100", persistent=True, batch_size=batch,
                                          epochs=10, seed=seed, dataset="nudged_digits", mesh="1",
                                          steps_per_dispatch=steps // 7, log_every=steps // 7,
                                          workdir=str(workdir)))  # fmt: skip
            sk = BernoulliRBM(n_components=100, learning_rate=0.06, batch_size=batch, n_iter=10,
                              random_state=seed)  # fmt: skip
            t = time.perf_counter()
            sk.fit(x_train)
            sk_fit = time.perf_counter() - t
            speeds[f"batch {batch}, seed {seed}"] = {
                "jaxpar_images_per_s": speed(workdir),
                "sklearn_images_per_s": len(x_train) * 10 / sk_fit,
            }
        kernel, hidden_bias = rbm_weights(WORK / f"rbm-{seed}-10")
        ours = lambda x, k=kernel, c=hidden_bias: sigmoid(x @ k + c)  # noqa: E731
        rows.append({
            "seed": seed,
            "jaxpar_test_pll": lines(WORK / f"rbm-{seed}-10")[-1]["eval_pseudo_log_likelihood"],
            "sklearn_test_pll": exact_pll(x_test, sk.components_.T, sk.intercept_visible_,
                                          sk.intercept_hidden_),
            "sklearn_test_pll_score_samples": float(np.mean(sk.score_samples(x_test))),
            "jaxpar_features_logistic": logistic(ours(x_train), ours(x_test), y_train, y_test,
                                                 6000),
            "sklearn_features_logistic": logistic(sk.transform(x_train), sk.transform(x_test),
                                                  y_train, y_test, 6000),
        })  # fmt: skip
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "seed"}
    for row in speeds.values():
        row["ratio"] = row["jaxpar_images_per_s"] / row["sklearn_images_per_s"]
    return {"seeds": rows, "mean": mean, "speed": speeds,
            "raw_pixels_logistic": logistic(x_train, x_test, y_train, y_test, 100)}  # fmt: skip


DBN = dict(model="dbn:500-500-2000", dataset="nudged_digits_28", batch_size=24, eval_examples=0,
           log_every=100)  # fmt: skip


def part2() -> dict:
    """Each layer's pretraining images/s, one epoch, on 1 and 4 devices."""
    out = {}
    for mesh in ("1", "4"):
        workdir = WORK / f"speed-{mesh}"
        jaxpar.train(jaxpar.Config.of(**DBN, pretrain_epochs=1, steps=1, mesh=mesh,
                                      steps_per_dispatch=100, workdir=str(workdir)))  # fmt: skip
        out[f"mesh {mesh}"] = {f"layer {i}": speed(workdir / "pretrain" / f"layer-{i}")
                               for i in (1, 2, 3)}  # fmt: skip
    return out


def part3(pretrain_epochs: int, steps: int, rates=(0.1, 0.5)) -> dict:
    """Test accuracy with 1% of the labels, pretrained against random initialisation, at each
    fine-tuning learning rate (the pretraining is done once, then copied)."""
    out, pretrained = {}, None
    for lr in rates:
        for name, epochs in (("pretrained", pretrain_epochs), ("random init", 0)):
            workdir = WORK / f"labels-{name.replace(' ', '-')}-{lr}"
            if epochs and pretrained:  # the same layers: their checkpoints read, not retrained
                shutil.copytree(pretrained / "pretrain", workdir / "pretrain")
            cfg = jaxpar.Config.of(**{**DBN, "eval_examples": None}, pretrain_epochs=epochs,
                                   labeled_fraction=0.01, steps=steps, lr=lr, mesh="1",
                                   steps_per_dispatch=100, eval_every=steps,
                                   workdir=str(workdir))  # fmt: skip
            out[f"{name}, lr {lr}"] = jaxpar.train(cfg)["eval_accuracy"]
            pretrained = pretrained or (workdir if epochs else None)
    for lr in (0.01, 0.1):  # the seed's MLP (ReLU, dropout) on the same labels, for scale
        cfg = jaxpar.Config.of(model="mlp", dataset=DBN["dataset"], batch_size=DBN["batch_size"],
                               labeled_fraction=0.01, steps=steps, lr=lr, mesh="1",
                               steps_per_dispatch=100, eval_every=steps,
                               workdir=str(WORK / f"labels-mlp-{lr}"))  # fmt: skip
        out[f"mlp (ReLU, random init), lr {lr}"] = jaxpar.train(cfg)["eval_accuracy"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="123", help="which parts to run, e.g. 13")
    parser.add_argument("--pretrain-epochs", type=int, default=5, help="part 3's pretraining")
    parser.add_argument("--steps", type=int, default=300, help="part 3's fine-tuning steps")
    args = parser.parse_args()
    report = {"machine": f"{platform.processor() or platform.machine()}, "
              f"{__import__('os').cpu_count()} cores"}  # fmt: skip
    if "1" in args.parts:
        report["1. scikit-learn's setting (rbm:100, PCD, 10 epochs)"] = part1()
    if "2" in args.parts:
        report["2. DBN 784-500-500-2000 pretraining, images/s per layer"] = part2()
    if "3" in args.parts:
        key = f"3. 1% labels, {args.steps} fine-tuning steps: test accuracy"
        report[key] = part3(args.pretrain_epochs, args.steps)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
