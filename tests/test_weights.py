"""Pretrained weights: PyTorch state dicts imported exactly, fine-tuned on any mesh, predicted from.

The PyTorch networks are `torch_reference`'s (torchvision's structure and names) with random
weights and BatchNorm statistics: nothing is downloaded.
"""

import contextlib
import io
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import torch_reference as ref  # beside this file (pgx installs a package named tests)
from flax import nnx
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import train as cli
from jaxpar.core.errors import UserError
from jaxpar.core.sharding import path_str
from jaxpar.data import load_dataset
from jaxpar.models import MODELS, revision
from jaxpar.models.pytorch import convert, read_tensors
from jaxpar.run.checkpoint import FORMAT, IDENTITY, Checkpoints, check_fits
from jaxpar.run.config import Config
from jaxpar.run.loop import train
from jaxpar.tools import predict as predict_cli
from jaxpar.tools import weights as weights_cli
from jaxpar.tools.predict import predict
from jaxpar.tools.weights import import_weights

pytestmark = pytest.mark.torch  # every test here compares with PyTorch or builds its files


def save(net, path: Path, names=lambda d: d) -> Path:
    state = {k: v.contiguous() for k, v in names(net.state_dict()).items()}
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    return path


def torch_logits(net, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


@pytest.mark.parametrize(
    "model,side,mesh",
    [("resnet8", 16, "1"), ("resnet18", 64, "1"), ("resnet18", 224, "model=2"),
     ("resnet50", 64, "fsdp=2"), ("resnet50", 224, "2x2")],
)  # fmt: skip
@pytest.mark.slow
def test_imported_resnet_computes_pytorchs_logits(model, side, mesh, tmp_path):
    net = ref.randomize(ref.resnet(model, 7, small_stem=side <= 32), seed=side)
    file = save(net, tmp_path / "w.safetensors")
    manifest = import_weights(file, model, tmp_path / "imported", (side, side, 3))
    assert manifest["num_classes"] == 7 and manifest["imported"]["names"] == "torchvision"
    x = np.random.default_rng(0).normal(size=(3, side, side, 3)).astype(np.float32)
    expected = torch_logits(net, x)
    got = predict(tmp_path / "imported", x, mesh=mesh)
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-4 * max(scale, 1.0), (got, expected)


@pytest.mark.slow
@pytest.mark.parametrize("names,suffix", [("torchvision", ".pth"), ("timm", ".safetensors")])
def test_imported_vit_computes_pytorchs_logits(names, suffix, tmp_path):
    net = ref.randomize(ref.ViT(32, 4, 192, 12, 3, 768, 5), seed=1)  # vit-tiny's sizes
    file = save(net, tmp_path / f"w{suffix}", ref.timm_names if names == "timm" else lambda d: d)
    manifest = import_weights(file, "vit-tiny", tmp_path / "imported", (32, 32, 3))
    assert manifest["imported"]["names"] == names and manifest["patch_size"] == 4
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(predict(tmp_path / "imported", x), torch_logits(net, x), atol=1e-4)


@pytest.fixture(scope="module")
def resnet8(tmp_path_factory):
    """A torchvision-style ResNet-8 for 8x8x1 digits with a 5-class head, as a file and imported."""
    root = tmp_path_factory.mktemp("resnet8")
    net = ref.randomize(ref.resnet("resnet8", 5, channels=1, small_stem=True), seed=3)
    file = save(net, root / "resnet8.safetensors")
    import_weights(file, "resnet8", root / "imported", (8, 8, 1))
    return {"net": net, "file": file, "workdir": root / "imported", "root": root}


def fine_tune(resnet8, mesh, source, name, **flags):
    workdir = resnet8["root"] / name
    cfg = Config.of(mesh=mesh, model="resnet8", steps=3, log_every=1, batch_size=64,
                 workdir=str(workdir), init_from=str(source), **flags)  # fmt: skip
    train(cfg)
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return workdir, [line["train_loss"] for line in lines if "train_loss" in line]


@pytest.fixture(scope="module")
def fine_tuned(resnet8):
    """The import fine-tuned on 1 device for digits (a fresh 10-class head): its workdir, its
    losses and what the run printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        workdir, losses = fine_tune(resnet8, "1", resnet8["workdir"], "ft1")
    return workdir, losses, printed.getvalue()


@pytest.mark.slow
def test_fine_tuning_imported_weights_gives_the_same_losses_on_every_mesh(resnet8, fine_tuned):
    """From the imported workdir or straight from the file; the 5-class head is replaced for
    digits' 10 classes; 1 device and 2x2 agree. (That the weights are the imported ones:
    `test_freeze_backbone_trains_only_the_head`.)"""
    one, losses, out = fine_tuned
    assert "a fresh classifier head (5 classes in" in out and "10 here" in out, out
    for mesh, source in (("2x2", resnet8["file"]),):
        _, other = fine_tune(resnet8, mesh, source, f"ft-{mesh}")
        np.testing.assert_allclose(other, losses, rtol=1e-5)
    # predict restores the fine-tuned model on another mesh: its accuracy is the run's own
    ds = load_dataset("digits", None)
    logits = predict(one, ds.test_images, mesh="2x2")
    last = json.loads((one / "metrics.jsonl").read_text().splitlines()[-1])
    assert (logits.argmax(-1) == ds.test_labels).mean() == pytest.approx(last["eval_accuracy"])


@pytest.mark.slow
def test_freeze_backbone_trains_only_the_head(resnet8):
    workdir, _ = fine_tune(resnet8, "2x2", resnet8["workdir"], "frozen", freeze="backbone")
    ckpts = Checkpoints(workdir)
    try:
        step = ckpts.latest()
        meta = ckpts.manager.item_metadata(step)["state"]
        state = ckpts.manager.restore(step).state
    finally:
        ckpts.close()
    sd = resnet8["net"].state_dict()
    stem = np.asarray(state["model"]["stem"]["kernel"])
    np.testing.assert_array_equal(stem, sd["conv1.weight"].numpy().transpose(2, 3, 1, 0))
    assert not np.allclose(state["model"]["head"]["kernel"], 0)
    leaves = jax.tree.leaves(meta["optimizer"])
    shapes = {tuple(m.shape) for m in leaves if len(getattr(m, "shape", ()))}
    assert shapes == {(64, 10), (10,)}, shapes  # momentum for the head's kernel and bias only


def test_checkpoints_of_an_earlier_revision_are_refused():
    for model in ("resnet18", "mlp"):
        identity = dict.fromkeys(IDENTITY) | {"model": model, "revision": revision(model)}
        old = {k: v for k, v in identity.items() if k != "revision"} | {"format": FORMAT}
        if model == "mlp":  # the MLP never changed: its checkpoints from before still fit
            check_fits(old, identity, 5, Path("w"))
            continue
        with pytest.raises(UserError, match="revision 1, and this jaxpar's resnet18 is revision 2"):
            check_fits(old, identity, 5, Path("w"))


def test_an_imported_workdir_is_not_resumed_by_train(resnet8, capsys):
    code = cli.main(["--model", "resnet8", "--workdir", str(resnet8["workdir"]), "--steps", "1"])
    assert code == 2
    assert "holds weights imported from" in capsys.readouterr().err


def bad_weights(tmp_path, resnet8):
    sd = resnet8["net"].state_dict()
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in sd.items() if k != "layer1.0.bn1.weight"}, missing)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("mine")
    data = Path(resnet8["file"]).read_bytes()
    truncated, scrambled = tmp_path / "truncated.safetensors", tmp_path / "scrambled.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    scrambled.write_bytes(data[:8] + b"{" + b"\xff" * 64 + data[73:])  # a header that is no JSON
    args = ["import", str(resnet8["file"]), "--model"]
    return {
        ("import", str(truncated), "--model", "resnet8"): "is a damaged .safetensors file",
        ("import", str(scrambled), "--model", "resnet8"): "is a damaged .safetensors file",
        ("import", str(text), "--model", "resnet8"): "neither a .safetensors file nor",
        ("import", str(missing), "--model", "resnet8"): "missing (layer1.0.bn1.weight)",
        (*args, "resnet8", "--image-shape", "64x64x1"): "conv1.weight has shape (16, 1, 3, 3)",
        (*args, "resnet18", "--image-shape", "8x8x1"): "do not fit --model resnet18",
        (*args, "resnet8", "--image-shape", "8x8x1", "--classes", "10"): "has 5 classes",
        (*args, "resnet8", "--image-shape", "8x8"): "--image-shape must be HxWxC",
        (*args, "mlp"): "no PyTorch counterpart",
        (*args, "resnet8", "--image-shape", "8x8x1", "--out", str(tmp_path / "used")): "not empty",
    }


def test_bad_imports_exit_2_with_one_line(tmp_path, resnet8, capsys):
    for argv, message in bad_weights(tmp_path, resnet8).items():
        argv = [*argv, "--out", str(tmp_path / "out")] if "--out" not in argv else list(argv)
        assert weights_cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, (argv, err)
        assert not (tmp_path / "out").exists()


def test_a_pickle_without_torch_says_how_to_convert(tmp_path, resnet8, monkeypatch, capsys):
    file = save(resnet8["net"], tmp_path / "w.pth")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails
    assert weights_cli.main(["import", str(file), "--model", "resnet8", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert "torch is not installed" in err and "safetensors" in err and err.count("\n") == 1


def test_bad_init_from_and_freeze_exit_2(tmp_path, resnet8, capsys):
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(Path(resnet8["file"]).read_bytes()[:200])
    cases = {
        ("--init-from", str(tmp_path / "nothing")): "does not exist",
        ("--init-from", str(tmp_path)): "has no checkpoints/ folder",
        ("--init-from", str(empty), "--model", "resnet8"): "holds no complete checkpoint",
        ("--init-from", str(resnet8["workdir"])): "holds resnet8 weights, not --model mlp",
        ("--freeze", "something"): "invalid choice: 'something'",
        ("--init-from", str(damaged), "--model", "resnet8"): "is a damaged .safetensors file",
    }
    for argv, message in cases.items():
        workdir = tmp_path / "w"
        try:
            code = cli.main([*argv, "--steps", "1", "--workdir", str(workdir)])
        except SystemExit as e:  # argparse's own errors
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err, (argv, err)
        assert not workdir.exists(), argv


def test_predict_cli(resnet8, tmp_path, capsys):
    ds = load_dataset("digits", None)
    images, out = tmp_path / "x.npy", tmp_path / "logits.npy"
    np.save(images, ds.test_images[:5])
    assert (
        predict_cli.main([str(resnet8["workdir"]), "--input", str(images), "--output", str(out)])
        == 0
    )
    expected = torch_logits(resnet8["net"], ds.test_images[:5])
    np.testing.assert_allclose(np.load(out), expected, atol=1e-4)
    assert (
        f"top-1 labels of 5 images: {' '.join(map(str, expected.argmax(-1)))}"
        in capsys.readouterr().out
    )
    # A ResNet's parameters do not depend on the resolution: 16x16 images (the same small stem)
    larger = np.repeat(np.repeat(ds.test_images[:3], 2, axis=1), 2, axis=2)
    np.save(images, larger)
    argv = [str(resnet8["workdir"]), "--input", str(images), "--output", str(out)]
    assert predict_cli.main(argv) == 0
    np.testing.assert_allclose(np.load(out), torch_logits(resnet8["net"], larger), atol=1e-4)
    np.save(images, ds.test_images[:5, :, :, :0])  # no channels: refused
    uint8 = tmp_path / "u.npy"
    np.save(uint8, np.zeros((2, 8, 8, 1), np.uint8))
    for argv, message in (
        ([str(resnet8["workdir"]), "--input", str(images)], "shape (N, 8, 8, 1)"),
        ([str(resnet8["workdir"]), "--input", str(tmp_path / "none.npy")], "not a readable .npy"),
        ([str(tmp_path), "--input", str(images)], "has no checkpoints/ folder"),
        ([str(resnet8["workdir"]), "--input", str(uint8)], "give float32 inputs"),
    ):
        assert predict_cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)


def export(workdir, out: Path, *flags) -> Path:
    code = weights_cli.main(["export", str(workdir), "--out", str(out), *flags])
    assert code == 0, (workdir, flags)
    return out


def header(file) -> dict:
    with safe_open(file, framework="np") as f:
        return f.metadata()


def test_export_torch_gives_back_the_imported_files_tensors(resnet8, tmp_path):
    """Import then export is the identity on PyTorch's names, shapes and values (BatchNorm's
    ``num_batches_tracked`` aside: import ignores them and ``load_state_dict`` fills them in);
    ``--format jaxpar`` is `convert`'s parameters under their '/'-joined paths."""
    vit = ref.randomize(ref.ViT(32, 4, 192, 12, 3, 768, 5), seed=2)  # vit-tiny's sizes
    vit_file = save(vit, tmp_path / "vit.safetensors")
    import_weights(vit_file, "vit-tiny", tmp_path / "vit", (32, 32, 3))
    cases = [
        (resnet8["workdir"], resnet8["net"], (), lambda d: d),
        (tmp_path / "vit", vit, (), lambda d: d),
        (tmp_path / "vit", vit, ("--names", "timm"), ref.timm_names),
    ]
    for i, (workdir, net, flags, names) in enumerate(cases):
        file = export(workdir, tmp_path / f"{i}.safetensors", "--format", "torch", *flags)
        got = load_file(file)
        want = {k: v for k, v in names(net.state_dict()).items()
                if not k.endswith("num_batches_tracked")}  # fmt: skip
        assert sorted(got) == sorted(want), set(got) ^ set(want)
        for name, tensor in want.items():
            assert got[name].dtype == torch.float32 and torch.equal(got[name], tensor), name
        if not flags:  # the reference modules have torchvision's names
            net.load_state_dict(got, strict=True)
        meta = header(file)
        assert meta["format"] == "torch" and meta["step"] == "0", meta
        assert meta["names"] == ("timm" if flags else "torchvision"), meta
    assert header(tmp_path / "0.safetensors")["model"] == "resnet8"
    file = export(resnet8["workdir"], tmp_path / "jaxpar.safetensors")
    params, _ = convert(read_tensors(resnet8["file"]), "resnet8", (8, 8, 1))
    want = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    got = read_tensors(file)
    assert sorted(got) == sorted(want) and "stem_bn/mean" in got
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    assert header(file)["format"] == "jaxpar" and header(file)["model"] == "resnet8"


@pytest.mark.slow
def test_exported_fine_tuned_weights_compute_jaxpars_logits_in_pytorch(
    resnet8, fine_tuned, tmp_path
):
    workdir = fine_tuned[0]
    file = export(workdir, tmp_path / "ft.safetensors", "--format", "torch")
    tensors = load_file(file)
    original = resnet8["net"].state_dict()
    for name in ("conv1.weight", "bn1.running_mean", "layer3.0.bn2.running_var"):
        assert not torch.equal(tensors[name], original[name]), name  # trained, not the import
    net = ref.resnet("resnet8", 10, channels=1, small_stem=True).eval()
    net.load_state_dict(tensors, strict=True)
    x = load_dataset("digits", None).test_images[:16]
    expected = torch_logits(net, x)
    got = predict(workdir, x)
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-4 * max(scale, 1.0), (got, expected)
    assert header(file)["step"] == "3" and header(file)["num_classes"] == "10"


def fake_run(workdir: Path, model: str, step: int = 0, **manifest) -> dict:
    """A checkpoint of `model`'s initial weights at `step`, as a run would leave it (no
    training); returns the weights by '/'-joined path."""
    net = MODELS[model]((8, 8, 1), 10, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(net))
    identity = {"model": model, "revision": revision(model), "image_shape": [8, 8, 1]}
    manifest = {"step": step, "format": FORMAT, **identity, "num_classes": 10,
                "patch_size": None, **manifest}  # fmt: skip
    ckpts = Checkpoints(workdir)
    try:
        ckpts.save(step, {0: params}, manifest, wait=True)
    finally:
        ckpts.close()
    return {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.mark.slow
def test_bad_exports_exit_2_with_one_line_and_write_nothing(resnet8, tmp_path, capsys):
    mlp = fake_run(tmp_path / "mlp", "mlp")
    fake_run(tmp_path / "diloco", "mlp", step=2, sync="diloco:4")  # between syncs
    file = export(tmp_path / "mlp", tmp_path / "mlp.safetensors")  # jaxpar's names: any model
    got = read_tensors(file)
    assert sorted(got) == sorted(mlp) and all(np.array_equal(got[k], mlp[k]) for k in mlp)
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"mine")
    capsys.readouterr()
    out = str(tmp_path / "out.safetensors")
    cases = {
        (str(tmp_path / "mlp"), "--out", out, "--format", "torch"): "torch: mlp (in",
        (str(resnet8["workdir"]), "--out", str(taken)): "exists; pass --force",
        (str(resnet8["workdir"]), "--out", str(taken), "--format", "torch"): "exists; pass --force",
        (str(resnet8["workdir"]), "--out", out, "--names", "timm"): "is for --format torch",
        (str(resnet8["workdir"]), "--out", str(tmp_path)): "is a folder",
        (str(tmp_path / "diloco"), "--out", out): "step 2, lies between syncs",
        (str(tmp_path / "none"), "--out", out): "does not exist",
        (str(resnet8["root"]), "--out", out): "has no checkpoints/ folder",
    }
    for argv, message in cases.items():
        assert weights_cli.main(["export", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, (argv, err)
        assert not Path(out).exists() and taken.read_bytes() == b"mine", argv
    assert not (resnet8["root"] / "checkpoints").exists()
    export(resnet8["workdir"], taken, "--force")
    assert header(taken)["model"] == "resnet8"
