"""Compression of trained runs (`jaxpar.tools.compress`): int8 quantization by qwix keeps accuracy
and sharding at a quarter of the bytes, one-shot pruning is exact per matrix, results accumulate in
compress.json, and bad requests exit with status 2."""

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import train as cli
from jaxpar.core.sharding import spec_table
from jaxpar.models import MODELS
from jaxpar.modes.quantize import aware, post_training
from jaxpar.tools import compress


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    """The seed's MLP trained 3 epochs of digits on a 2x2 mesh."""
    workdir = tmp_path_factory.mktemp("mlp")
    assert cli.main(["--epochs", "3", "--mesh", "2x2", "--workdir", str(workdir)]) == 0
    return workdir


def run(workdir, *flags):
    return compress.main([str(workdir), "--time", "0", *flags])  # 3 timed passes, no more


def variants(workdir) -> dict:
    saved = json.loads((workdir / "compress.json").read_text())
    return saved["step"], {v["name"]: v for v in saved["variants"]}


@pytest.mark.slow
def test_mlp_int8_keeps_accuracy_at_a_quarter_of_the_bytes_and_pruning_is_exact(mlp_run):
    assert run(mlp_run, "--quantize", "int8,bf16", "--activations", "int8", "--prune", "0.9",
               "--finetune-epochs", "1") == 0  # fmt: skip
    step, v = variants(mlp_run)
    assert step == 33 and list(v) == ["float32", "int8", "int8-act", "bf16", "pruned-0.90"]
    base = v["float32"]
    assert base["nonzero_params"] == 167_178 and base["test_accuracy"] > 0.9
    for name in ("int8", "int8-act", "bf16"):
        assert abs(v[name]["test_accuracy"] - base["test_accuracy"]) <= 0.005, name
        assert v[name]["eval_vs_float32"] > 0, name  # timed in the same call
    for name in ("int8", "int8-act"):
        assert 0.24 < v[name]["param_bytes"] / base["param_bytes"] < 0.27
    assert v["bf16"]["param_bytes"] < base["param_bytes"] / 1.9
    pruned = v["pruned-0.90"]
    for layer, (nonzero, size) in pruned["layers"].items():
        assert nonzero == size - round(0.9 * size), layer  # exactly 90% zeros, each matrix
    assert pruned["finetune_epochs"] == 1
    assert pruned["test_accuracy"] > pruned["test_accuracy_before_finetune"]
    assert pruned["sparse_bytes"] < 0.2 * pruned["param_bytes"]
    assert (mlp_run / "compress" / "pruned-0.90-from-step-33-1-epochs" / "checkpoints").is_dir()

    # A later call adds its variant (one-shot, no fine-tuning) and keeps the others.
    assert run(mlp_run, "--prune", "0.5") == 0
    _, again = variants(mlp_run)
    assert list(again) == ["float32", "int8", "int8-act", "bf16", "pruned-0.90", "pruned-0.50"]
    assert again["int8"] == v["int8"] and again["pruned-0.50"]["finetune_epochs"] == 0
    for layer, (nonzero, size) in again["pruned-0.50"]["layers"].items():
        assert nonzero == size - round(0.5 * size), layer


def test_int8_weights_and_scales_are_sharded_like_their_channels(mlp_run):
    cfg = compress.run_config(mlp_run, "2x2", None)
    t = compress.restore_run(cfg)
    q = compress.int8_model(t, False, compress.calibration_images(t, 1))
    specs = spec_table(jax.tree.map(lambda a: a.sharding, nnx.to_pure_dict(nnx.state(q))))
    column, row = P(None, "model"), P("model", None)  # Megatron's MLP on data=2, model=2
    assert t.model.fc1.kernel[...].sharding.spec == column
    assert specs["fc1/kernel/array/qvalue"] == column and specs["fc1/kernel/array/scale"] == column
    assert specs["fc2/kernel/array/qvalue"] == row and specs["fc2/kernel/array/scale"] == P(
        None, None
    )
    assert q.fc1.kernel.array.qvalue.dtype == jnp.int8


@pytest.mark.slow
def test_resnet8_int8_keeps_its_accuracy_at_a_quarter_of_the_bytes(resnet8_run):
    assert run(resnet8_run, "--quantize", "int8", "--mesh", "1") == 0
    _, v = variants(resnet8_run)
    assert v["float32"]["test_accuracy"] > 0.5  # trained: a comparison at chance proves little
    assert abs(v["int8"]["test_accuracy"] - v["float32"]["test_accuracy"]) <= 0.01
    assert 0.24 < v["int8"]["param_bytes"] / v["float32"]["param_bytes"] < 0.27


@pytest.mark.slow
def test_compress_save_writes_the_int8_model_that_predict_serves(resnet8_run, tmp_path):
    """``--save``: the int8 model (inputs int8 too, static scales) as a checkpoint; predict
    rebuilds it from the manifest and computes what compress measured; readers that need float
    weights refuse it in one line."""
    from jaxpar import UserError
    from jaxpar.run.checkpoint import latest_manifest
    from jaxpar.tools.predict import inputs, latest, predict, restored

    out = tmp_path / "int8"
    flags = ["--quantize", "int8", "--activations", "int8", "--mesh", "1", "--save", str(out)]
    assert run(resnet8_run, *flags) == 0
    t = compress.restore_run(compress.run_config(resnet8_run, "1", None))
    measured = compress.int8_model(t, True, compress.calibration_images(t, 4))
    step, manifest = latest(out, quantized=True)
    _, saved, _ = restored(out, step, manifest, t.mesh)
    want = nnx.to_pure_dict(nnx.state(measured))
    assert jax.tree.structure(saved) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)  # int8 weights, scales, input scales
    assert saved["head"]["kernel"]["array"]["qvalue"].dtype == jnp.int8
    images = t.ds.test_images[:24]
    logits = measured(inputs(images, t.manifest, t.ds.image_shape), train=False)
    # the same model; an input on a rounding boundary may quantize one step apart when compiled
    np.testing.assert_allclose(predict(out, images, "1"), logits, atol=2e-2)
    with pytest.raises(UserError, match="int8 model written by compress --save, which only pre"):
        latest_manifest(out, f"--init-from {out}")
    assert run(resnet8_run, "--quantize", "int8", "--save", str(out)) == 2  # never overwritten


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--quantize", "int4"], "--quantize int4 is not supported; choose int8 or bf16 (or both)"),
        (["--prune", "1.5"], "--prune must be a sparsity in (0, 1), got 1.5"),
        (["--activations", "int8"], "--activations int8 goes with --quantize int8"),
        (["--finetune-epochs", "2"], "--finetune-epochs goes with --prune"),
        (["--save", "out"], "--save writes the int8 model: add --quantize int8"),
    ],
)
def test_bad_requests_exit_2_with_one_line(tmp_path, capsys, flags, message):
    assert run(tmp_path, *flags) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_save_naming_a_file_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    assert run(tmp_path, "--quantize", "int8", "--save", str(tmp_path / "afile")) == 2
    assert capsys.readouterr().err == f"error: --save {tmp_path / 'afile'} is a file; name a new " \
        "folder\n"  # fmt: skip
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_workdir_without_a_checkpoint_is_refused(tmp_path, capsys):
    assert run(tmp_path, "--quantize", "int8") == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path} has no checkpoint to compress (no checkpoints/ folder)\n"


def test_a_vit_is_refused_int8_with_the_reason(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.json").write_text(json.dumps({"model": "vit-lite"}))
    assert run(tmp_path, "--quantize", "int8") == 2
    assert "vit-lite cannot be quantized to int8: qwix 0.1.8" in capsys.readouterr().err


@pytest.mark.slow
def test_a_qat_model_computes_what_post_training_quantization_makes_of_its_weights(resnet8_run):
    t = compress.restore_run(compress.run_config(resnet8_run, "1", None))
    x = compress.calibration_images(t, 1)[:16]
    build = aware(partial(MODELS["resnet8"], t.ds.image_shape, t.ds.num_classes), t.ds.image_shape)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build(rngs=nnx.Rngs(0))))
    qat = nnx.merge(graphdef, nnx.state(t.model))
    np.testing.assert_array_equal(qat(x), post_training(t.model, x)(x))
    assert np.abs(np.asarray(qat(x)) - np.asarray(t.model(x))).max() > 1e-4  # rounded weights


def test_qat_trains_float_weights_that_quantize_with_no_further_loss(tmp_path, capsys):
    workdir = tmp_path / "qat"
    args = ["--qat", "int8", "--epochs", "1", "--mesh", "2x2", "--workdir", str(workdir)]
    assert cli.main(args) == 0
    assert run(workdir, "--quantize", "int8") == 0
    _, v = variants(workdir)
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert v["int8"]["test_accuracy"] == pytest.approx(lines[-1]["eval_accuracy"], abs=1e-6)
    assert v["float32"]["param_bytes"] == 668_716  # the checkpoint holds float32 weights
    capsys.readouterr()
    assert cli.main(args[2:]) == 2  # resuming without --qat is refused
    assert "qat='int8' there, None here" in capsys.readouterr().err
