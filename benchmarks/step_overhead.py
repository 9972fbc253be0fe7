"""jaxpar's train step against a minimal hand-written `jax.jit` step: same model, mesh and data.

The hand-written step is what a user would write without jaxpar: a dict of parameters, a pure
`apply`, optax, and `jax.jit` with shardings and donation. Both run in this process, interleaved
in rounds, on the same pre-built device batch, blocking every few steps (as jaxpar's loop does);
the figure that matters is the ratio, since this machine is shared and noisy. A third contender is
jaxpar with ``--steps-per-dispatch K``: K steps per call (a ``lax.scan`` over K stacked batches).

    python benchmarks/step_overhead.py            # prints a table, then one JSON line
    python benchmarks/step_overhead.py --steps 400 --rounds 7 --meshes 1 4 2x2
"""

import argparse
import json
import time
from functools import partial

import jax

jax.config.update("jax_num_cpu_devices", 4)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxpar.core.mesh import make_mesh, parse_mesh  # noqa: E402
from jaxpar.core.optimizers import make_optimizer  # noqa: E402
from jaxpar.core.sharding import batch_sharding  # noqa: E402
from jaxpar.core.step import compile_steps, create_state  # noqa: E402
from jaxpar.data import device_batch, load_digits, train_indices  # noqa: E402
from jaxpar.models import MLP  # noqa: E402


def hand_written(mesh, din, classes, seed=0):
    """The seed's MLP as plain JAX: the baseline."""
    keys = jax.random.split(jax.random.key(seed), 4)
    lecun = jax.nn.initializers.lecun_normal()

    def init():
        dense = lambda k, i, o: {"kernel": lecun(k, (i, o)), "bias": jnp.zeros((o,))}  # noqa: E731
        return {
            "fc1": dense(keys[0], din, 512),
            "fc2": dense(keys[1], 512, 256),
            "slope": jnp.full((), 0.25),
            "head": dense(keys[2], 256, classes),
        }

    def loss_fn(params, batch, key):
        x = batch["image"].reshape(batch["image"].shape[0], -1)
        x = jax.nn.relu(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
        keep = jax.random.bernoulli(key, 0.5, x.shape)
        x = jnp.where(keep, x / 0.5, 0)
        x = x @ params["fc2"]["kernel"] + params["fc2"]["bias"]
        x = jnp.where(x >= 0, x, params["slope"] * x)
        logits = x @ params["head"]["kernel"] + params["head"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    tx = optax.sgd(0.01, momentum=0.9)

    def step(state, batch):
        params, opt_state, count = state
        key = jax.random.fold_in(keys[3], count)
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, count + 1), {"train_loss": loss}

    # The same placement as jaxpar's rules, written out by hand (size-1 axes are no-ops).
    specs = {
        "fc1": {"kernel": P("fsdp", "model"), "bias": P("model")},
        "fc2": {"kernel": P("model", "fsdp"), "bias": P("fsdp")},
        "slope": P(),
        "head": {"kernel": P("fsdp", None), "bias": P()},
    }
    param_sh = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)
    replicated = NamedSharding(mesh, P())
    params = jax.jit(init, out_shardings=param_sh)()
    state = jax.jit(lambda p: (p, tx.init(p), jnp.zeros((), jnp.int32)))(params)
    state_sh = jax.tree.map(lambda x: x.sharding, state)  # momentum follows its parameter
    batch_sh = {"image": batch_sharding(mesh, 4), "label": batch_sharding(mesh, 1)}
    jitted = jax.jit(
        step,
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, replicated),
        donate_argnums=0,
    )
    return state, jitted


def jaxpar_step(mesh, ds, stacked=False):
    model_fn = partial(MLP, ds.image_shape, ds.num_classes)
    graphdef, state, shardings, _ = create_state(model_fn, make_optimizer(), mesh, seed=0)
    train_step, _ = compile_steps(graphdef, shardings, mesh, 0, image_ndim=4, stacked=stacked)
    return state, train_step


def timed(state, step, batch, steps, per_call=1, block_every=16):
    """Seconds per step; blocks every `block_every` calls to bound the steps in flight."""
    state, m = step(state, batch)  # compile and warm up
    jax.block_until_ready(m)
    start = time.perf_counter()
    for i in range(steps // per_call):
        state, m = step(state, batch)
        if (i + 1) % block_every == 0:
            jax.block_until_ready(m)
    jax.block_until_ready(m)
    return state, (time.perf_counter() - start) / (steps // per_call * per_call)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--meshes", nargs="+", default=["1", "4", "2x2"])
    parser.add_argument("--steps-per-dispatch", type=int, default=8)
    args = parser.parse_args()
    ds = load_digits()
    data = {"image": ds.train_images, "label": ds.train_labels}
    rows, k = [], args.steps_per_dispatch
    for text in args.meshes:
        mesh = make_mesh(parse_mesh(text))
        rows_k = np.stack([train_indices(ds, args.batch_size, 0, s) for s in range(k)])
        batches = {
            "hand": device_batch(data, rows_k[0], mesh),
            "jaxpar": device_batch(data, rows_k[0], mesh),
            "jaxpar_k": device_batch(data, rows_k, mesh),
        }
        din = int(np.prod(ds.image_shape))
        contenders = {
            "hand": hand_written(mesh, din, ds.num_classes),
            "jaxpar": jaxpar_step(mesh, ds),
            "jaxpar_k": jaxpar_step(mesh, ds, stacked=True),
        }
        times = {name: [] for name in contenders}
        for r in range(args.rounds):  # interleaved, order alternating: drift hits all alike
            for name in sorted(contenders, reverse=r % 2 == 1):
                state, step = contenders[name]
                per_call = k if name == "jaxpar_k" else 1
                state, t = timed(state, step, batches[name], args.steps, per_call)
                contenders[name] = (state, step)
                times[name].append(t)
        hand, ours, many = (np.median(times[n]) for n in ("hand", "jaxpar", "jaxpar_k"))
        rows.append(
            {
                "mesh": text,
                "hand_ms": round(hand * 1e3, 3),
                "jaxpar_ms": round(ours * 1e3, 3),
                "ratio": round(ours / hand, 3),
                "jaxpar_k_ms": round(many * 1e3, 3),
                "k_ratio": round(many / hand, 3),
            }
        )
    print(f"{'mesh':>6} {'hand-written ms':>16} {'jaxpar ms':>10} {'jaxpar/hand':>12} "
          f"{f'jaxpar x{k} ms':>14} {f'x{k}/hand':>9}")  # fmt: skip
    for r in rows:
        print(f"{r['mesh']:>6} {r['hand_ms']:>16.3f} {r['jaxpar_ms']:>10.3f} {r['ratio']:>12.3f} "
              f"{r['jaxpar_k_ms']:>14.3f} {r['k_ratio']:>9.3f}")  # fmt: skip
    meta = {
        "jax": jax.__version__,
        "devices": jax.device_count(),
        "platform": jax.default_backend(),
    }
    meta["steps_per_dispatch"] = k
    print(json.dumps({"benchmark": "step_overhead", **meta, "steps": args.steps, "rows": rows}))


if __name__ == "__main__":
    main()
