"""The Vision Transformer: shapes, logical names, placement, per-example dropout, scan and remat.

Tiny models only (width 32, depth 2): compile time dominates the suite.
"""

import functools
import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BATCH, digits
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxpar
from jaxpar.core.mesh import make_mesh, parse_mesh
from jaxpar.core.optimizers import make_optimizer
from jaxpar.core.sharding import batch_sharding, placed, spec_table, state_shardings
from jaxpar.core.step import abstract_state, compile_steps, init_state
from jaxpar.cost.collectives import collectives
from jaxpar.data import device_batch, train_indices
from jaxpar.models import MODELS
from jaxpar.models.dropout import dropout as drop
from jaxpar.models.vit import ViT, check_patch_size, default_patch_size

IMAGE = (8, 8, 1)  # digits-shaped
TINY = {"width": 32, "depth": 2, "heads": 8, "mlp_dim": 64}  # heads split on every TP mesh
GOLDEN = Path(__file__).parent / "golden" / "vit.json"
STRATEGIES = {  # as in test_sharding.py
    "dp": "8x1",
    "fsdp": "fsdp=8",
    "tp": "1x8",
    "dp_tp": "2x4",
    "fsdp_tp": "fsdp=4,model=2",
}

# Every parameter's logical names: the stacked blocks lead with 'layers'.
NAMES = {
    "blocks/attn_norm/bias": ("layers", "embed"),
    "blocks/attn_norm/scale": ("layers", "embed"),
    "blocks/query/kernel": ("layers", "embed", "heads", "head_dim"),  # column-parallel
    "blocks/query/bias": ("layers", "heads", "head_dim"),
    "blocks/key/kernel": ("layers", "embed", "heads", "head_dim"),
    "blocks/key/bias": ("layers", "heads", "head_dim"),
    "blocks/value/kernel": ("layers", "embed", "heads", "head_dim"),
    "blocks/value/bias": ("layers", "heads", "head_dim"),
    "blocks/attn_out/kernel": ("layers", "heads", "head_dim", "embed"),  # row-parallel
    "blocks/attn_out/bias": ("layers", "embed"),
    "blocks/mlp_norm/bias": ("layers", "embed"),
    "blocks/mlp_norm/scale": ("layers", "embed"),
    "blocks/mlp_in/kernel": ("layers", "embed", "mlp"),  # column-parallel
    "blocks/mlp_in/bias": ("layers", "mlp"),
    "blocks/mlp_out/kernel": ("layers", "mlp", "embed"),  # row-parallel
    "blocks/mlp_out/bias": ("layers", "embed"),
    "cls_token": ("embed",),
    "embed/kernel": (None, None, None, "embed"),  # patch embedding (patch, patch, channels, width)
    "embed/bias": ("embed",),
    "pos_embed": ("seq", "embed"),
    "norm/bias": ("embed",),
    "norm/scale": ("embed",),
    "head/kernel": ("embed", "classes"),
    "head/bias": ("classes",),
}


def vit(**overrides):
    return partial(ViT, IMAGE, 10, **{**TINY, **overrides})


def images(n=8, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, *IMAGE))


def example_keys(n=8):
    """One key per example, as the step makes them: fold_in(step key, position in the batch)."""
    return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(42), jnp.arange(n))


@functools.cache
def applier(train=True, **overrides):
    """``(jitted apply(state, x, keys), state)`` for a tiny ViT built with seed 0."""
    graphdef, state = nnx.split(vit(**overrides)(rngs=nnx.Rngs(0)))
    apply = jax.jit(lambda s, x, k: nnx.merge(graphdef, s)(x, train=train, rngs=k))
    return apply, state


def flat_params(model_fn):
    _, abstract = abstract_state(model_fn, make_optimizer())
    return {"/".join(map(str, p[1:])): v for p, v in nnx.to_flat_state(abstract) if p[0] == 0}


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_forward_shapes_and_float32_logits(pool):
    apply, state = applier(train=False, pool=pool)
    logits = apply(state, images(), None)
    assert logits.shape == (8, 10) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    tokens = 4 + (pool == "cls")  # 8x8 image, default patch 4: 2x2 patches
    assert state["pos_embed"].shape == (tokens, 32)
    assert ("cls_token" in state) == (pool == "cls")


@pytest.mark.slow
def test_bf16_computes_in_bf16_with_float32_parameters_and_logits():
    model = vit(dtype=jnp.bfloat16)(rngs=nnx.Rngs(0))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.float32)}
    x = images()
    assert "bf16[8,5,32]" in str(jax.make_jaxpr(lambda x: model(x))(x))  # the residual stream
    apply, state = applier(train=False)
    graphdef, bf16_state = nnx.split(model)
    logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(bf16_state, x)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, apply(state, x, None), atol=0.1)  # same seed, same params


def test_stacked_parameters_and_their_logical_names():
    params = flat_params(vit())
    assert {k: v.get_metadata()["out_sharding"] for k, v in params.items()} == NAMES
    for path, var in params.items():
        if path.startswith("blocks/"):
            assert var.shape[0] == TINY["depth"], path
    assert params["blocks/query/kernel"].shape == (2, 32, 8, 4)
    assert params["blocks/attn_out/kernel"].shape == (2, 8, 4, 32)
    assert params["blocks/mlp_in/kernel"].shape == (2, 32, 64)


@pytest.mark.parametrize(
    "name, width, depth, heads, mlp",
    [("tiny", 192, 12, 3, 768), ("lite", 256, 7, 4, 512), ("small", 384, 12, 6, 1536)],
)
def test_presets(name, width, depth, heads, mlp):
    params = flat_params(partial(MODELS[f"vit-{name}"], (32, 32, 3), 10))
    assert params["blocks/query/kernel"].shape == (depth, width, heads, width // heads)
    assert params["blocks/mlp_in/kernel"].shape == (depth, width, mlp)
    assert params["pos_embed"].shape == (65, width)  # patch 4: 8x8 patches + class token


def test_base_preset_takes_overrides():
    params = flat_params(partial(MODELS["vit-base"], (224, 224, 3), 1000, depth=1, pool="mean"))
    assert params["blocks/query/kernel"].shape == (1, 768, 12, 64)
    assert params["embed/kernel"].shape == (16, 16, 3, 768)  # ViT-B/16
    assert params["pos_embed"].shape == (196, 768)


def param_specs(mesh_text, **overrides):
    _, abstract = abstract_state(vit(**overrides), make_optimizer())
    shardings, replicated = state_shardings(abstract, make_mesh(parse_mesh(mesh_text)))
    return spec_table(shardings, "0/"), replicated


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_golden_table(strategy):
    golden = json.loads(GOLDEN.read_text())[strategy]
    table, replicated = param_specs(STRATEGIES[strategy])
    assert {k: list(v) for k, v in table.items()} == golden
    assert replicated == []


def test_golden_tables_shard_what_they_should():
    """Spot checks that the golden file says what the rules mean (it was reviewed once)."""
    golden = json.loads(GOLDEN.read_text())
    assert golden["tp"]["blocks/query/kernel"] == [None, None, "model", None]
    assert golden["tp"]["blocks/attn_out/kernel"] == [None, "model", None, None]
    assert golden["tp"]["blocks/mlp_out/kernel"] == [None, "model", None]
    assert golden["fsdp"]["blocks/query/kernel"] == [None, "fsdp", None, None]
    assert golden["fsdp_tp"]["blocks/mlp_in/kernel"] == [None, "fsdp", "model"]
    assert not any(any(spec) for spec in golden["dp"].values())
    assert golden["dp_tp"] == golden["tp"]  # the data axis never shards parameters
    for table in golden.values():  # the layers axis has no mesh axis yet
        assert all(spec[0] is None for k, spec in table.items() if k.startswith("blocks/"))


def test_undivisible_head_count_is_replicated_and_reported():
    table, replicated = param_specs("4x2", width=48, heads=3)
    assert table["blocks/query/kernel"] == P(None, None, None, None)
    assert table["blocks/attn_out/kernel"] == P(None, None, None, None)
    assert table["blocks/mlp_in/kernel"] == P(None, None, "model")  # the MLP still splits
    expected = [f"0/blocks/{m}/kernel dim 2" for m in ("key", "query", "value")]
    expected += [f"0/blocks/{m}/bias dim 1" for m in ("key", "query", "value")]
    expected += ["0/blocks/attn_out/kernel dim 1"]
    assert sorted(str(r) for r in replicated) == sorted(
        f"{e} (heads=3) is replicated: not divisible by model=2" for e in expected
    )


def vit_step(mesh, dropout=0.0, accum=1):
    """``(train_step, state_shardings, graphdef)`` for a tiny ViT on the digits
    (`jaxpar.core.step`)."""
    ds = digits()
    model_fn = partial(ViT, ds.image_shape, ds.num_classes, **TINY, dropout=dropout)
    graphdef, abstract = abstract_state(model_fn, make_optimizer())
    shardings, replicated = state_shardings(abstract, mesh)
    assert replicated == []
    train_step, _ = compile_steps(graphdef, shardings, mesh, 0, image_ndim=4, accum=accum)
    return model_fn, train_step, shardings, abstract


@functools.cache
def trained_vit(mesh_text, steps=3, dropout=0.1, accum=1):
    """A few real train steps of a tiny ViT with dropout (`compile_steps` traces under the mesh)."""
    ds, seed = digits(), 0
    mesh = make_mesh(parse_mesh(mesh_text))
    model_fn, train_step, shardings, _ = vit_step(mesh, dropout, accum)
    state = init_state(model_fn, make_optimizer(), shardings, seed)
    data = {"image": ds.train_images, "label": ds.train_labels}
    losses = []
    with jax.set_mesh(mesh):
        for step in range(steps):
            batch = device_batch(data, train_indices(ds, BATCH, seed, step), mesh)
            state, metrics = train_step(state, batch)
            losses.append(float(metrics["train_loss"]))
    return np.array(losses), state


@pytest.mark.slow
def test_heads_are_split_over_model():
    _, state = trained_vit("fsdp=4,model=2")
    blocks = state[0]["blocks"]
    for name in ("query", "key", "value"):
        kernel = blocks[name]["kernel"]  # (layers, embed, heads, head_dim)
        assert kernel.shape == (2, 32, 8, 4)
        assert {s.data.shape for s in kernel.addressable_shards} == {(2, 8, 4, 4)}
        assert {s.data.shape for s in blocks[name]["bias"].addressable_shards} == {(2, 4, 4)}
    out = blocks["attn_out"]["kernel"]  # (layers, heads, head_dim, embed)
    assert {s.data.shape for s in out.addressable_shards} == {(2, 4, 4, 8)}


# 2x4 splits the batch over data and the heads over model at once; the FSDP meshes gather
# weights. (8x1 and 1x8 alone added 22 s to the suite and nothing these do not cover.)
@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["2x4", "fsdp=8", "fsdp=4,model=2"])
def test_sharded_training_with_dropout_matches_one_device(mesh):
    """Per-example dropout keys: the masks, hence the losses, do not depend on the mesh."""
    reference, ref_state = trained_vit("1")
    losses, state = trained_vit(mesh)
    assert np.ptp(reference) > 1e-3, "the loss must move, or the comparison proves nothing"
    np.testing.assert_allclose(losses, reference, rtol=2e-5, atol=2e-5)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["1", "2x4"])
def test_gradient_accumulation_gives_the_same_run(mesh):
    """4 microbatches of 16 (rows j, j+4, ...): same losses and parameters, dropout included."""
    reference, ref_state = trained_vit("1")
    losses, state = trained_vit(mesh, accum=4)
    np.testing.assert_allclose(losses, reference, rtol=2e-5, atol=2e-5)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_residual_stream_is_pinned_to_the_batch_sharding_under_a_mesh():
    model, x = vit()(rngs=nnx.Rngs(0)), images()
    assert "sharding_constraint" not in str(jax.make_jaxpr(lambda x: model(x))(x))  # no mesh
    with jax.set_mesh(make_mesh(parse_mesh("fsdp=8"))):
        assert "sharding_constraint" in str(jax.make_jaxpr(lambda x: model(x))(x))


def compiled_step(mesh_text):
    mesh = make_mesh(parse_mesh(mesh_text))
    _, train_step, shardings, abstract = vit_step(mesh)
    args = placed(nnx.to_pure_dict(abstract), shardings)
    batch = {
        "image": jax.ShapeDtypeStruct(
            (BATCH, *IMAGE), jnp.float32, sharding=batch_sharding(mesh, 4)
        ),
        "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=batch_sharding(mesh)),
    }
    with jax.set_mesh(mesh):
        return train_step.lower(args, batch).compile()


@pytest.mark.slow
def test_fsdp_gathers_weights_inside_the_scan_and_keeps_the_batch_split():
    """Under FSDP each device holds its share of the batch, as under data parallelism (without
    the constraint XLA moved activations instead and needed ~6x the temporaries)."""
    fsdp, dp = compiled_step("fsdp=8"), compiled_step("8x1")
    assert collectives(fsdp.as_text())["all-gather"]["count"] > 0
    temporaries = [c.memory_analysis().temp_size_in_bytes for c in (fsdp, dp)]
    assert temporaries[0] <= temporaries[1], temporaries


@pytest.mark.slow
def test_dropout_masks_are_per_example():
    """Each example's masks depend on its own key alone: compared exactly. The logits of a batch
    and of its halves only to a tolerance: XLA's CPU matrix products round differently by batch
    size, and differently on Intel and AMD (1.1e-6 apart on an Intel Xeon)."""
    from jaxpar.models.dropout import dropout

    x, keys = images(), example_keys()
    ones = jnp.ones((8, 5, 16))
    for rate, salt in ((0.2, ()), (0.1, (3, 1))):
        full = np.asarray(dropout(ones, rate, keys, *salt))
        assert 0 < (full == 0).mean() < 0.5
        for part in (slice(0, 4), slice(4, 8)):
            np.testing.assert_array_equal(dropout(ones[part], rate, keys[part], *salt), full[part])
    apply, state = applier(dropout=0.2, attention_dropout=0.1)
    full = apply(state, x, keys)
    np.testing.assert_allclose(apply(state, x[:4], keys[:4]), full[:4], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(apply(state, x[4:], keys[4:]), full[4:], rtol=1e-4, atol=1e-5)
    # Dropout is on: other keys give other outputs.
    assert not np.allclose(apply(state, x, jax.random.split(jax.random.key(1), 8)), full)


def jax_random_reference(x, rate, keys, salt):
    def one(key, row):
        for s in salt:
            key = jax.random.fold_in(key, s)
        return jnp.where(jax.random.bernoulli(key, 1.0 - rate, row.shape), row / (1 - rate), 0.0)

    # jitted as `drop` is: compiled, x / 0.75 is x * 1.3333334 (eagerly JAX 0.12 divides exactly)
    return jax.jit(jax.vmap(one))(keys, x)


@pytest.mark.parametrize(
    "shape,rate,salt,dtype",
    [
        ((512,), 0.5, (), "float32"),
        ((7, 33), 0.1, (5, 2), "bfloat16"),
        ((2, 3, 4), 0.25, (3,), "float32"),
        ((), 0.5, (1,), "float32"),
    ],
)
@pytest.mark.slow
def test_dropout_draws_jax_randoms_bits(shape, rate, salt, dtype):
    """`jaxpar.models.dropout` hashes its masks itself (fused, see there): they must stay the ones
    `jax.random` gives each example's key, so recorded runs keep their losses. Salts are traced
    (as a scanned layer index is)."""
    keys = jax.random.split(jax.random.key(3), 6)
    x = jax.random.normal(jax.random.key(1), (6, *shape)).astype(dtype)
    salt = tuple(jnp.int32(s) for s in salt)
    ours = jax.jit(lambda x, keys, *salt: drop(x, rate, keys, *salt))(x, keys, *salt)
    assert ours.dtype == x.dtype
    np.testing.assert_array_equal(ours, jax_random_reference(x, rate, keys, salt))
    assert 0 < float((ours == 0).mean()) < 2 * rate


@pytest.mark.slow
def test_dropout_leaves_other_keys_and_settings_to_jax_random():
    """Where its own hash would not give `jax.random`'s bits it uses `jax.random`: other key
    implementations, JAX's original (non-partitionable) counters. Bad shapes are refused."""
    x = jnp.ones((4, 50))
    rbg = jax.random.split(jax.random.key(0, impl="rbg"), 4)
    np.testing.assert_array_equal(drop(x, 0.5, rbg, 1), jax_random_reference(x, 0.5, rbg, (1,)))
    keys = jax.random.split(jax.random.key(0), 4)
    jax.config.update("jax_threefry_partitionable", False)
    try:
        np.testing.assert_array_equal(drop(x, 0.5, keys), jax_random_reference(x, 0.5, keys, ()))
    finally:
        jax.config.update("jax_threefry_partitionable", True)
    with pytest.raises(ValueError, match="one key per example"):
        drop(x, 0.5, keys[:1])
    with pytest.raises(ValueError, match="scalar salts"):
        drop(x, 0.5, keys, jnp.arange(2))


def loss_and_grads(remat):
    graphdef, state = nnx.split(vit(dropout=0.1, remat=remat)(rngs=nnx.Rngs(0)))
    x, labels, keys = images(), jnp.arange(8) % 10, example_keys()

    def loss(state):
        logits = nnx.merge(graphdef, state)(x, train=True, rngs=keys)
        return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), labels])

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(state))
    return jax.jit(jax.value_and_grad(loss))(state), jaxpr


@pytest.mark.slow
def test_remat_gives_the_same_loss_and_gradients():
    (loss, grads), jaxpr = loss_and_grads(remat=False)
    (remat_loss, remat_grads), remat_jaxpr = loss_and_grads(remat=True)
    assert "remat" in remat_jaxpr and "remat" not in jaxpr  # the block is rematerialised
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    flat, remat_flat = nnx.to_flat_state(grads), nnx.to_flat_state(remat_grads)
    assert [p for p, _ in flat] == [p for p, _ in remat_flat]
    for (path, g), (_, h) in zip(flat, remat_flat, strict=True):
        assert np.any(g[...] != 0), path  # every parameter takes part
        # recomputed activations round otherwise (by 1.7e-6 on a gradient of 0.15 at XLA's
        # optimisation level 0, the tests'): a rounding's worth, not a missing term
        np.testing.assert_allclose(h[...], g[...], rtol=1e-5, atol=5e-6, err_msg=str(path))


@pytest.mark.slow
def test_blocks_are_scanned_so_tracing_does_not_grow_with_depth():
    def program(depth):
        model = vit(depth=depth)(rngs=nnx.Rngs(0))
        return jax.make_jaxpr(lambda x: model(x))(images()).jaxpr

    shallow, deep = program(2), program(6)
    assert len(shallow.eqns) == len(deep.eqns)
    assert [e.primitive.name for e in deep.eqns].count("scan") == 1


def test_default_patch_sizes():
    sides = (8, 16, 28, 32, 64, 96, 224)
    assert [default_patch_size((s, s, 3)) for s in sides] == [4, 4, 4, 4, 4, 16, 16]
    assert check_patch_size((28, 28, 1), 7) == 7


def test_patch_size_that_does_not_divide_is_a_user_error():
    message = "--patch-size 5 does not divide the 28x28 image; use one of 1, 2, 4, 7, 14, 28"
    with pytest.raises(jaxpar.UserError) as error:
        ViT((28, 28, 1), 10, **TINY, patch_size=5, rngs=nnx.Rngs(0))
    assert str(error.value) == message
    with pytest.raises(jaxpar.UserError) as error:
        nnx.eval_shape(lambda: ViT((30, 30, 1), 10, **TINY, rngs=nnx.Rngs(0)))
    assert str(error.value) == (
        "the default patch size 4 does not divide the 30x30 image; "
        "pass --patch-size one of 1, 2, 3, 5, 6, 10, 15, 30"
    )


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"pool": "max"}, "pooling must be 'cls' or 'mean'"),
        ({"heads": 3}, "3 attention heads do not divide the width 32"),
        ({"dropout": 1.0}, r"dropout rate must be in \[0, 1\)"),
    ],
)
def test_bad_model_arguments_are_user_errors(overrides, match):
    with pytest.raises(jaxpar.UserError, match=match):
        nnx.eval_shape(lambda: vit(**overrides)(rngs=nnx.Rngs(0)))


def test_fused_attention_only_where_cudnn_runs():
    from jaxpar.models.vit import fused_attention

    # auto: cuDNN's kernel on GPUs in half precision without probability dropout, else XLA's
    assert not fused_attention("auto", jnp.bfloat16, False)  # traced for the CPU here
    assert not fused_attention("auto", jnp.float32, False)
    assert fused_attention("cudnn", jnp.float32, False) and not fused_attention("xla", None, 0)
    with pytest.raises(jaxpar.UserError, match="attention must be auto, xla or cudnn"):
        fused_attention("flash", jnp.bfloat16, False)


@pytest.mark.slow
@pytest.mark.parametrize("patch, channels", [(2, 1), (4, 3), (16, 3)])
def test_patch_embedding_is_the_strided_convolution(patch, channels):
    from jaxpar.models.vit import embed_patches

    conv = nnx.Conv(channels, 8, (patch, patch), strides=(patch, patch), padding="VALID",
                    rngs=nnx.Rngs(0))  # fmt: skip
    x = jax.random.normal(jax.random.key(1), (2, 4 * patch, 2 * patch, channels))
    np.testing.assert_allclose(embed_patches(conv, x, patch), conv(x), atol=1e-5)
