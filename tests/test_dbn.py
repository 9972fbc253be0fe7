"""Deep belief networks (`jaxpar.models.dbn`, `jaxpar.run.pretrain`, issue #33): the unrolled
network's forward pass is the stack of RBMs' upward pass; each layer's pretraining is an
ordinary RBM run (the first equals ``--model rbm:W`` exactly), stopped in layer 2 it resumes on
another mesh as if never stopped; the fine-tuned checkpoint serves predict, compress and
--init-from; ``--labeled-fraction`` keeps the same examples for a seed; bad input exits 2."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import jaxpar
import train as cli
from jaxpar.core.sharding import state_shardings
from jaxpar.data import labelled, load_digits, pixel_range, unit_interval
from jaxpar.models import DBN, RBM
from jaxpar.run.config import Config
from jaxpar.run.init_from import with_weights
from jaxpar.run.observe import Window
from jaxpar.run.pretrain import layer_configs, layer_weights, partial_loader, pretrain
from jaxpar.run.setup import setup
from jaxpar.tools.compress import main as compress_main
from jaxpar.tools.predict import predict


def test_the_unrolled_network_computes_the_stacks_upward_pass():
    rng = np.random.default_rng(0)
    widths = (64, 16, 8)
    normal = lambda *shape: rng.normal(0, 0.5, shape).astype(np.float32)  # noqa: E731
    stack = [(normal(a, b), normal(b)) for a, b in zip(widths, widths[1:], strict=False)]
    build = lambda: DBN((8, 8, 1), 10, sizes=widths[1:], rngs=nnx.Rngs(0))  # noqa: E731
    graphdef, state = nnx.split(build())
    mesh = jaxpar.make_mesh(jaxpar.parse_mesh("1"))
    shardings = state_shardings(nnx.split(nnx.eval_shape(build))[1], mesh)[0]
    pure = nnx.to_pure_dict(state)
    loaded = with_weights({0: pure, 1: {}}, partial_loader(stack)(shardings))[0]
    net = nnx.merge(graphdef, loaded)
    v = rng.random((5, 64)).astype(np.float32)
    h = v
    for kernel, bias in stack:  # each layer an RBM's p(h | v)
        rbm = RBM((h.shape[1],), 10, hidden=kernel.shape[1], rngs=nnx.Rngs(0))
        rbm.kernel[...], rbm.hidden_bias[...] = kernel, bias
        h = np.asarray(rbm.hidden_probs(h))
    np.testing.assert_allclose(np.asarray(net.features(v)), h, rtol=1e-6)
    head = net.head
    assert np.array_equal(np.asarray(head.kernel[...]), np.asarray(pure["head"]["kernel"]))
    logits = np.asarray(net(v.reshape(5, 8, 8, 1)))  # the head on the stack's features
    np.testing.assert_allclose(logits, h @ np.asarray(head.kernel[...]), rtol=1e-5, atol=1e-6)


def test_a_labeled_fraction_keeps_the_same_examples_for_a_seed():
    ds = load_digits()
    part, again, other = (labelled(ds, 0.1, s) for s in (0, 0, 1))
    assert len(part.train_labels) == round(0.1 * len(ds.train_labels))
    assert np.array_equal(part.train_images, again.train_images)
    assert not np.array_equal(part.train_images, other.train_images)
    same = lambda x: (ds.train_images == x).all(axis=(1, 2, 3))  # noqa: E731
    rows = [np.flatnonzero(same(x))[0] for x in part.train_images]
    assert np.array_equal(part.train_labels, ds.train_labels[rows])
    # A model of pixels in [0, 1] sees each kept example as in the whole split.
    assert part.pixel_range == pixel_range(ds)
    whole = np.asarray(unit_interval(ds)(ds.train_images[rows]))
    assert np.array_equal(np.asarray(unit_interval(part)(part.train_images)), whole)
    assert labelled(ds, 1.0, 0) is ds and labelled(ds, None, 0) is ds


# Pretraining: 1,437 digits at batch 32 are 44 steps an epoch per layer.
DBN_FLAGS = ["--model", "dbn:16-8", "--pretrain-epochs", "1", "--steps", "6", "--batch-size",
             "32", "--log-every", "4", "--eval-every", "3"]  # fmt: skip


def metrics(workdir) -> list[dict]:
    return [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def numbers(lines: list[dict]) -> np.ndarray:
    keys = ("train_loss", "eval_loss", "eval_accuracy", "eval_reconstruction_error",
            "eval_pseudo_log_likelihood")  # fmt: skip
    return np.array([[x["step"], *(x.get(k, np.nan) for k in keys)] for x in lines])


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("dbn") / "whole"
    assert cli.main([*DBN_FLAGS, "--mesh", "1", "--workdir", str(workdir)]) == 0
    return workdir


@pytest.mark.slow
def test_the_first_layer_is_an_ordinary_rbm_run(whole, tmp_path):
    rbm = tmp_path / "rbm"
    jaxpar.train(Config.of(model="rbm:16", epochs=1, batch_size=32, lr=0.06, momentum=0.0,
                           mesh="1", workdir=str(rbm), log_every=4))  # fmt: skip
    layer = metrics(whole / "pretrain" / "layer-1")
    assert [x["step"] for x in layer if "eval_pseudo_log_likelihood" in x] == [44]
    assert np.array_equal(numbers(layer), numbers(metrics(rbm)), equal_nan=True)  # the same run
    config = json.loads((whole / "pretrain" / "layer-2" / "config.json").read_text())
    assert config["model"]["model"] == "rbm:8" and config["optimization"]["lr"] == 0.06
    fine = metrics(whole)
    assert [x["step"] for x in fine if "eval_accuracy" in x] == [3, 6]


@pytest.mark.slow
def test_stopped_in_layer_2_it_resumes_on_another_mesh_as_if_never_stopped(
    whole, tmp_path, monkeypatch, capsys
):
    push = Window.push

    def stop_in_layer_2(self, done, metrics):  # SIGTERM, as a scheduler sends it, at step 20
        push(self, done, metrics)
        if self.cfg.model.model == "rbm:8" and done == 20:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Window, "push", stop_in_layer_2)
    argv = [*DBN_FLAGS, "--workdir", str(tmp_path), "--checkpoint-every", "10"]
    assert cli.main([*argv, "--mesh", "1"]) == 128 + signal.SIGTERM
    assert "stopped by signal 15 at step 20" in capsys.readouterr().err
    assert not (tmp_path / "metrics.jsonl").exists()  # the fine-tuning has not begun
    monkeypatch.setattr(Window, "push", push)
    assert cli.main([*argv, "--mesh", "2x2"]) == 0
    out = capsys.readouterr().out
    assert f"layer 1 of 2 is pretrained ({tmp_path / 'pretrain' / 'layer-1'})" in out
    assert "resumed from step 20 (saved on mesh stage=1,data=1,fsdp=1,model=1)" in out
    for part in ("pretrain/layer-2", "."):  # Gibbs draws per example: only the sums round
        np.testing.assert_allclose(
            numbers(metrics(tmp_path / part)),
            numbers(metrics(whole / part)),
            rtol=1e-4,
            err_msg=part,
        )
    # The same command once more: every layer pretrained, the fine-tuning done.
    assert cli.main([*argv, "--mesh", "2x2"]) == 0
    assert "already at step 6 of 6" in capsys.readouterr().out
    # Another length of pretraining would build on layers trained for this one: refused.
    argv[argv.index("--pretrain-epochs") + 1] = "2"
    assert cli.main([*argv, "--mesh", "2x2"]) == 2
    assert "layer 1 in " in (err := capsys.readouterr().err) and "was pretrained with " \
        "--pretrain-epochs 1, not 2; pass --pretrain-epochs 1, or --restart" in err  # fmt: skip


@pytest.mark.slow
def test_the_fine_tuning_starts_from_the_layers_checkpoints(whole):
    cfg = cli.parse_args([*DBN_FLAGS, "--mesh", "1", "--workdir", str(whole)]).validate()
    cfg, ds, weights = pretrain(cfg, train_run=None)  # every layer trained: none trains again
    model = setup(cfg, ds, weights).init()[0]
    for i, layer in enumerate(model["layers"].values()):
        kernel, bias = layer_weights(whole / "pretrain" / f"layer-{i + 1}", 44)
        assert np.array_equal(np.asarray(layer["kernel"]), kernel)
        assert np.array_equal(np.asarray(layer["bias"]), bias)


def test_a_layer_takes_none_of_the_fine_tunings_optimisation_flags():
    cfg = Config.of(
        model="dbn:16-8",
        pretrain_epochs=2,
        label_smoothing=0.1,
        lr=0.5,
        optimizer="adamw",
        clip_grad_norm=1.0,
        labeled_fraction=0.5,
        workdir="w",
    )
    for layer in layer_configs(cfg):
        layer.validate()  # an RBM: refuses label smoothing, a labeled fraction
        o = layer.optimization
        assert (o.optimizer, o.lr, o.momentum, o.epochs) == ("sgd", 0.06, 0.0, 2)


@pytest.mark.slow
def test_the_fine_tuned_checkpoint_serves_predict_compress_and_init_from(whole, tmp_path, capsys):
    ds = load_digits()
    low, high = pixel_range(ds)
    x = np.clip((ds.test_images - low) / (high - low), 0, 1).astype(np.float32)  # pixels in [0, 1]
    accuracy = np.mean(predict(whole, x).argmax(-1) == ds.test_labels)
    assert abs(accuracy - metrics(whole)[-1]["eval_accuracy"]) <= 1 / len(x)
    assert compress_main([str(whole), "--quantize", "int8"]) == 0
    assert "int8" in capsys.readouterr().out
    argv = ["--model", "dbn:16-8", "--steps", "2", "--batch-size", "32", "--mesh", "1"]
    assert cli.main([*argv, "--init-from", str(whole), "--workdir", str(tmp_path / "w")]) == 0
    assert f"initialised from {whole} (step 6)" in capsys.readouterr().out


@pytest.mark.slow
def test_a_labeled_fraction_trains_on_that_share_of_the_examples(tmp_path):
    cfg = Config.of(labeled_fraction=0.1, steps=12, batch_size=16, mesh="1", log_every=1,
                    workdir=str(tmp_path))  # fmt: skip
    jaxpar.train(cfg)
    lines = metrics(tmp_path)
    assert [x["step"] for x in lines if "eval_accuracy" in x] == [9, 12]  # 144 // 16 an epoch
    with pytest.raises(jaxpar.UserError, match="labeled_fraction=0.1 there, 0.2 here"):
        jaxpar.train(cfg.replace(labeled_fraction=0.2, steps=14))


BAD = {
    "--model dbn:": "--model dbn:: a DBN's layers are widths of at least 1",
    "--model dbn:16-0": "--model dbn:16-0: a DBN's layers are widths of at least 1",
    "--model dbn:16-x": "--model dbn:16-x: a DBN's layers are widths of at least 1",
    "--pretrain-epochs 2": "--pretrain-epochs goes with --model dbn:A-B-C",
    "--model rbm:16 --pretrain-epochs 2": "--pretrain-epochs goes with --model dbn:A-B-C",
    "--model dbn:16 --pretrain-epochs -1": "--pretrain-epochs must be at least 0, got -1",
    "--model dbn:16 --cd-k 2": "--cd-k goes with --model rbm:H, or dbn:A-B-C with",
    "--model dbn:16 --pretrain-epochs 1 --precision bf16": "--precision bf16 with an RBM or a "
    "pretrained DBN is not supported",
    "--labeled-fraction 0": "--labeled-fraction must be in (0, 1], got 0.0",
    "--labeled-fraction 1.5": "--labeled-fraction must be in (0, 1], got 1.5",
    "--model rbm:16 --labeled-fraction 0.5": "--labeled-fraction with an RBM",
    "--dataset synthetic:8x8x1:10=0.5,synthetic:8x8x1:5=0.5 --labeled-fraction 0.5":
        "--labeled-fraction with a mixture is not supported",
    "--model dbn:16 --clients 4": "--clients N with --model dbn:16 is not supported",
    "--model dbn:16 --sync local:2": "--sync local:H with --model dbn:16 is not supported",
    "--model dbn:16 --pretrain-epochs 1 --labeled-fraction 0.01 --batch-size 32":
        "--batch-size 32 is larger than the 14 training examples",  # before any pretraining
}  # fmt: skip


@pytest.mark.parametrize("flags", BAD)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(flags, refuses):
    refuses(flags, BAD[flags])


def test_init_from_with_pretraining_is_refused(tmp_path, refuses):
    (tmp_path / "source" / "checkpoints").mkdir(parents=True)
    refuses(f"--model dbn:16 --pretrain-epochs 1 --init-from {tmp_path / 'source'}",
            "--init-from with --pretrain-epochs")  # fmt: skip
