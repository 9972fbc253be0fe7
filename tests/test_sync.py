"""Low-communication data parallelism (`--sync`): each mode reduces to synchronous SGD.

The seed's MLP on the digits through the real loop (`jaxpar.train`), SGD without momentum unless
said; stale SGD also against a few lines of NumPy on a linear model.
"""

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpar
from jaxpar.core.mesh import make_mesh, parse_mesh
from jaxpar.core.optimizers import make_optimizer
from jaxpar.core.sharding import path_str
from jaxpar.core.step import compile_steps, create_state
from jaxpar.data import train_batches
from jaxpar.models import MODELS
from jaxpar.models.vit import ViT
from jaxpar.modes.sync import Stale
from jaxpar.run.checkpoint import Checkpoints
from jaxpar.run.config import Config
from jaxpar.run.setup import setup
from jaxpar.tools.plan import plan


def train(workdir, mesh="data=4", steps=8, **flags):
    """Losses per step, the last line's comm_bytes_per_step, and the final model's arrays."""
    flags = {"momentum": 0.0, **flags}
    cfg = Config.of(mesh=mesh, steps=steps, log_every=1, workdir=str(workdir), **flags)
    jaxpar.train(cfg)
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "train_loss" in x]
    run = setup(cfg)
    ckpts = Checkpoints(workdir)
    state = run.mode.view(ckpts.restore(ckpts.latest(), run.abstract, run.shardings))
    ckpts.close()
    model = {path_str(k): np.asarray(a) for k, a in jax.tree_util.tree_leaves_with_path(state[0])}
    return np.array([x["train_loss"] for x in train_lines]), train_lines[-1], model, workdir


@pytest.fixture(scope="module")
def every_step(tmp_path_factory):
    return train(tmp_path_factory.mktemp("every-step"))


def assert_same(a, b, rtol=1e-6, atol=1e-6):
    np.testing.assert_allclose(a[0], b[0], rtol=rtol)
    for path, value in b[2].items():
        np.testing.assert_allclose(a[2][path], value, atol=atol, err_msg=path)


@pytest.mark.parametrize(
    "flags",
    [
        {"sync": "local:1"},
        {"sync": "diloco:1", "outer_lr": 1.0, "outer_momentum": 0.0},
        {"sync": "stale:0"},
    ],
)
@pytest.mark.slow
def test_each_mode_reduces_to_every_step(flags, every_step, tmp_path):
    assert_same(train(tmp_path, **flags), every_step)


@pytest.fixture(scope="module")
def local4(tmp_path_factory):
    return train(tmp_path_factory.mktemp("local4"), sync="local:4")


def test_local_sgd_drifts_and_diloco_with_plain_outer_sgd_is_local_sgd(
    every_step, local4, tmp_path
):
    diloco = train(tmp_path / "diloco", sync="diloco:4", outer_lr=1.0, outer_momentum=0.0)
    assert not np.allclose(local4[0], every_step[0], rtol=1e-4)  # the replicas did drift apart
    assert_same(diloco, local4)  # outer SGD at rate 1 without momentum takes the replicas' mean


@pytest.mark.slow
def test_same_data_size_other_splits_give_the_same_run(tmp_path):
    """DiLoCo: replica axis, global copy and outer state all placed on the other split."""
    a = train(tmp_path / "a", mesh="data=4", sync="diloco:3")
    b = train(tmp_path / "b", mesh="data=4,model=2", sync="diloco:3")
    assert_same(b, a, rtol=1e-5, atol=1e-5)


def test_comm_bytes_per_step_fall_by_h(every_step, local4):
    every = plan(Config.of(mesh="data=4", steps=8))["sync"]["comm_bytes_per_step"]
    assert local4[1]["comm_bytes_per_step"] == pytest.approx(every / 4, rel=0.05)
    assert "comm_bytes_per_step" not in every_step[1]  # every-step lines keep their schema


def test_the_plan_counts_held_models_apart_from_the_optimizer_state():
    """--dry-run once counted stale SGD's ring and DiLoCo's global copy as optimizer state."""
    base = {"mesh": "data=4", "steps": 8, "momentum": 0.0}
    every = plan(Config.of(**base))["per_device"]
    stale = plan(Config.of(**base, sync="stale:2"))["per_device"]
    diloco = plan(Config.of(**base, sync="diloco:2"))["per_device"]
    assert every.keys() >= {"params", "optimizer"} and "held" not in every
    assert stale["held"] == 2 * every["params"] and stale["optimizer"] == every["optimizer"]
    assert diloco["held"] == every["params"] and diloco["outer_optimizer"] == every["params"]


@pytest.mark.slow
def test_resume_mid_round_on_another_mesh_equals_uninterrupted(tmp_path):
    flags = {"sync": "diloco:4", "momentum": 0.9}  # outer and inner momentum in the checkpoint
    whole = train(tmp_path / "whole", steps=10, **flags)
    cut = tmp_path / "cut"
    train(cut, steps=6, **flags)  # stops in the middle of the second round
    resumed = train(cut, mesh="data=4,fsdp=2", steps=10, **flags)
    assert_same(resumed, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_stale_sgd_updates_batchnorm_statistics(tmp_path):
    """With a learning rate too small to move a float32 weight, stale and every-step SGD hold
    the same parameters, so their BatchNorm statistics must agree too (they once stayed at
    their initial mean 0 / variance 1 under stale SGD)."""
    flags = {"model": "resnet8", "lr": 1e-30, "steps": 4, "batch_size": 32}
    every = train(tmp_path / "every", **flags)
    stale = train(tmp_path / "stale", sync="stale:2", **flags)
    assert any("mean" in path for path in every[2])
    assert_same(stale, every)


def test_diloco_ending_between_syncs_reports_its_last_steps(tmp_path):
    """A 6-step diloco:4 run ends 2 steps after its last sync: evaluation and the model it
    serves are what a sync now gives (with plain outer SGD, the replicas' mean: local SGD's
    view), not the step-4 copy."""
    plain = {"outer_lr": 1.0, "outer_momentum": 0.0}
    diloco = train(tmp_path / "diloco", steps=6, sync="diloco:4", **plain)
    local = train(tmp_path / "local", steps=6, sync="local:4")
    assert_same(diloco, local)
    evals = [read_evals(tmp_path / name)[-1] for name in ("diloco", "local")]
    assert evals[0]["step"] == 6 and evals[0]["eval_loss"] == pytest.approx(evals[1]["eval_loss"])


def test_readers_of_one_model_read_the_model_a_sync_mode_evaluates(local4, tmp_path, capsys):
    """predict, compress, --teacher, --init-from and export read one model (once an 80-line
    Orbax traceback on a model per replica): local SGD's replicas' mean, DiLoCo's global copy;
    a DiLoCo checkpoint between syncs is refused in one line naming the step to continue to."""
    import train as cli
    from jaxpar.run.checkpoint import latest_manifest
    from jaxpar.tools import predict
    from jaxpar.tools.weights import checkpoint_weights

    between = train(tmp_path / "local", steps=6, sync="local:4")  # replicas apart at step 6
    for run in (between, local4):
        step, manifest = latest_manifest(run[3], "it")
        served = checkpoint_weights(run[3], step, manifest)
        assert served.keys() == run[2].keys()
        for path, value in run[2].items():  # the model its evaluation saw
            np.testing.assert_allclose(served[path], value, rtol=1e-6, atol=1e-7, err_msg=path)
    np.save(tmp_path / "x.npy", np.zeros((2, 8, 8, 1), np.float32))
    assert predict.main([str(between[3]), "--input", str(tmp_path / "x.npy")]) == 0
    assert cli.main(["--teacher", str(between[3]), "--steps", "2", "--workdir",
                     str(tmp_path / "t")]) == 0  # fmt: skip
    diloco = train(tmp_path / "diloco", steps=8, sync="diloco:4")
    step, manifest = latest_manifest(diloco[3], "it")
    served = checkpoint_weights(diloco[3], step, manifest)
    for path, value in diloco[2].items():
        np.testing.assert_allclose(served[path], value, rtol=1e-6, atol=1e-7, err_msg=path)
    capsys.readouterr()
    cut = train(tmp_path / "cut", steps=6, sync="diloco:4")[3]
    assert predict.main([str(cut), "--input", str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step 6, lies between syncs" in err and "--steps 8" in err


def test_a_model_per_replica_resumes_only_on_as_many_replicas(local4, capsys):
    """It once said "corrupt" and suggested --restart."""
    cfg = Config.of(mesh="data=2", steps=12, sync="local:4", momentum=0.0, log_every=1,
                 workdir=str(local4[3]))  # fmt: skip
    with pytest.raises(jaxpar.UserError, match=r"holds 4 replicas \(--sync local:4 on data=4\); "
                       r"this mesh has data=2: resume on a mesh with data=4"):  # fmt: skip
        jaxpar.train(cfg)


def read_evals(workdir):
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "eval_loss" in x]


class Linear(nnx.Module):
    """logits = x w, for the NumPy comparison."""

    def __init__(self, features, classes, *, rngs, dtype=None):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (features, classes)) * 0.5)

    def __call__(self, x, train=False, rngs=None):
        return x @ self.w[...]


def test_stale_gradients_match_numpy():
    T, lr, steps = 2, 0.5, 7
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(steps, 8, 4)).astype(np.float32)
    ys = rng.integers(0, 3, size=(steps, 8))
    mesh = make_mesh(parse_mesh("1"))
    tx = make_optimizer("sgd", lr, momentum=0.0)
    graphdef, state, shardings, _ = create_state(partial(Linear, 4, 3), tx, mesh, seed=0)
    mode = Stale(T)
    _, shardings = mode.layout(jax.eval_shape(lambda: state), shardings, mesh, None)
    state = jax.jit(mode.init, out_shardings=shardings)(state)
    step, _ = compile_steps(graphdef, shardings, mesh, 0, 2, step=mode.step, view=mode.view)

    w = [np.asarray(state[0]["w"])]  # NumPy: w_{t+1} = w_t - lr * grad(w_{max(t-T, 0)})
    for t in range(steps):
        x, y = xs[t], ys[t]
        old = w[max(t - T, 0)]
        z = x @ old
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        want_loss = -np.log(p[np.arange(8), y]).mean()
        p[np.arange(8), y] -= 1
        w.append(w[-1] - lr * x.T @ p / 8)
        state, metrics = step(state, {"image": jnp.asarray(x), "label": jnp.asarray(y)})
        assert float(metrics["train_loss"]) == pytest.approx(want_loss, rel=1e-5)
    np.testing.assert_allclose(np.asarray(state[0]["w"]), w[-1], atol=1e-5)


@pytest.fixture
def small_vit():
    """A ViT with 4x4 patches and 64 channels: the shape that XLA's partitioner got wrong as a
    vmapped convolution under FSDP (`jaxpar.models.vit.embed_patches`)."""
    MODELS["vit-synctest"] = partial(ViT, width=64, depth=2, heads=2, mlp_dim=64, patch_size=4)
    yield "vit-synctest"
    del MODELS["vit-synctest"]


@pytest.mark.slow
def test_local_sgd_replicas_of_a_vit_under_fsdp(small_vit):
    losses = {}
    for sync in ("every-step", "local:1"):
        cfg = Config.of(model=small_vit, mesh="data=2,fsdp=2", sync=sync, momentum=0.0, steps=2,
                     batch_size=16, optimizer="sgd")  # fmt: skip
        run = setup(cfg.validate())
        state, out = run.init(), []
        for step, batch in enumerate(train_batches(run.ds, 16, 0, range(2), run.mesh)):
            state, metrics = run.train_step(state, batch)
            state = run.synced(state, step + 1)
            out.append(float(metrics["train_loss"]))
        losses[sync] = out
    np.testing.assert_allclose(losses["local:1"], losses["every-step"], rtol=1e-5)
