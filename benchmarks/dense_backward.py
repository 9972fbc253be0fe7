"""The MLP's backward pass in other layouts: which CPU dot library runs each product, at what cost.

XLA's CPU backend gives a dot to YNNPACK only when the dot's left operand contracts its minor
(last) dimension (`xla/backends/cpu/ynn_support.cc`); the right operand may contract either. A
dense layer's three products are ``y = x w`` (contracting ``in``), ``dx = g w^T`` (``out``) and
``dw = x^T g`` (the batch). With batch-major ``x`` and ``g``, as autodiff has them, no operand of
``dw`` has the batch as its minor dimension, so the weight gradients run on Eigen's slower path.
Choosing other layouts cannot avoid one transpose per layer: ``dw`` needs an operand with the
batch minor (``x`` or ``g`` kept ``[features, batch]``), and then either ``y = x w`` or ``dx``
has no left operand contracting its minor dimension, or ``dw`` comes out ``[out, in]``, the
weight's transpose. So each layer pays a transposed activation (``x^T``, smallest) or a
transposed weight gradient. The programs below are the seed MLP's step (batch 128, dropout,
SGD with momentum) in pure JAX, gradients checked against autodiff's:

- ``autodiff``: ``jax.grad``, as `jaxpar.models.mlp` trains (the baseline);
- ``sequenced``: custom-VJP dense layers computing the weight gradient before the input
  gradient (XLA otherwise runs the two products at once, each asking for both cores);
- ``x^T kept, sequenced``: the forward also keeps ``x^T`` (behind an optimisation barrier, or
  XLA folds it back into the dot), so all eight products run on YNNPACK;
- ``x^T kept``: the same, the two gradient products free to run at once;
- ``gradients [features, batch]``: the backward carries ``g^T``; weight gradients come out
  ``[out, in]`` and are transposed for the update.

Windows of 50 steps over the programs in an order rotated every round; "paired" is the median
over rounds of a window over the baseline's window of the same round, "of medians" the ratio of
median times (this machine is shared and noisy: trust a ratio only where both agree).

    python benchmarks/dense_backward.py              # 40 rounds
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpar.core.mesh import set_xla_flags
from jaxpar.models.dropout import dropout

set_xla_flags()  # as train.py, before JAX starts

B, SIZES, RATE = 128, (784, 512, 256, 10), 0.5
barrier = jax.lax.optimization_barrier


def init(key):
    k = jax.random.split(key, 6)
    shapes = zip(SIZES, SIZES[1:], strict=False)
    p = {f"W{i + 1}": jax.random.normal(k[i], s) / np.sqrt(s[0]) for i, s in enumerate(shapes)}
    p |= {f"b{i}": jnp.zeros(n) for i, n in enumerate(SIZES[1:], 1)} | {"alpha": jnp.float32(0.25)}
    x = jax.random.normal(k[4], (B, SIZES[0]))
    y = jax.random.randint(k[5], (B,), 0, SIZES[-1])
    return p, x, y, jax.random.split(k[3], B)


def dense_layer(keep_xt: bool, sequenced: bool, first: bool):
    """``x @ w + b`` with a custom VJP (the first layer's input gradient is not needed)."""

    @jax.custom_vjp
    def dense(x, w, b):
        return x @ w + b

    def fwd(x, w, b):
        return x @ w + b, (barrier(x.T) if keep_xt else x, w)

    def bwd(res, g):
        x, w = res
        dw = x @ g if keep_xt else x.T @ g  # x here is x^T when kept
        if first:
            return None, dw, g.sum(0)
        if sequenced:  # the input gradient waits for the weight gradient
            dw, g = barrier((dw, g))
        return g @ w.T, dw, g.sum(0)

    dense.defvjp(fwd, bwd)
    return dense


def plain(x, w, b):
    return x @ w + b


def loss(p, x, y, keys, first=plain, dense=plain):
    h1 = dropout(jax.nn.relu(first(x, p["W1"], p["b1"])), RATE, keys)
    z2 = dense(h1, p["W2"], p["b2"])
    logits = dense(jnp.where(z2 >= 0, z2, p["alpha"] * z2), p["W3"], p["b3"])
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0]
    return nll.mean()


def custom(keep_xt: bool, sequenced: bool):
    layers = tuple(dense_layer(keep_xt, sequenced, first) for first in (True, False))
    return jax.value_and_grad(lambda *a: loss(*a, *layers))


def feature_major(p, x, y, keys):
    """Loss and gradients with the backward pass carrying ``g^T``, written out."""
    z1 = x @ p["W1"] + p["b1"]
    scale = dropout(jnp.ones_like(z1), RATE, keys)  # 0 or 1 / (1 - RATE): the same masks
    h1 = jax.nn.relu(z1) * scale
    z2 = h1 @ p["W2"] + p["b2"]
    a2 = jnp.where(z2 >= 0, z2, p["alpha"] * z2)
    logits = a2 @ p["W3"] + p["b3"]
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0]
    g3t = ((jax.nn.softmax(logits) - jax.nn.one_hot(y, SIZES[-1])) / B).T
    da2t = p["W3"] @ g3t  # [256, B]: the left operand contracts its minor dimension
    g2t = da2t * jnp.where(z2 >= 0, 1.0, p["alpha"]).T
    g1t = (p["W2"] @ g2t) * (scale * (z1 > 0)).T
    # Barriers: without them XLA folds the transposes back into the dots (x^T g again)
    dws = [barrier(g @ a).T for g, a in ((g1t, x), (g2t, h1), (g3t, a2))]
    grads = {f"W{i}": dw for i, dw in enumerate(dws, 1)}
    grads |= {f"b{i}": g.sum(1) for i, g in enumerate((g1t, g2t, g3t), 1)}
    grads["alpha"] = jnp.sum(da2t * jnp.minimum(z2, 0).T)
    return nll.mean(), grads


def sgd_step(grad_fn):
    def step(state, x, y, keys):
        p, m = state
        loss, g = grad_fn(p, x, y, keys)
        m = jax.tree.map(lambda m, g: 0.9 * m + g, m, g)
        return (jax.tree.map(lambda p, m: p - 0.01 * m, p, m), m), loss

    return jax.jit(step, donate_argnums=0)


PROGRAMS = {
    "autodiff": jax.value_and_grad(loss),
    "sequenced": custom(keep_xt=False, sequenced=True),
    "x^T kept, sequenced": custom(keep_xt=True, sequenced=True),
    "x^T kept": custom(keep_xt=True, sequenced=False),
    "gradients [features, batch]": feature_major,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--steps", type=int, default=50, help="steps per window")
    args = parser.parse_args()
    p, x, y, keys = init(jax.random.key(0))
    _, reference = jax.jit(PROGRAMS["autodiff"])(p, x, y, keys)
    error = {}
    for name, fn in PROGRAMS.items():
        _, g = jax.jit(fn)(p, x, y, keys)
        error[name] = max(float(jnp.abs(g[k] - reference[k]).max()) for k in g)
    steps = {name: sgd_step(fn) for name, fn in PROGRAMS.items()}
    states = {name: (p, jax.tree.map(jnp.zeros_like, p)) for name in steps}
    for name, step in steps.items():
        states[name] = jax.tree.map(jnp.copy, states[name])  # each its own donated buffers
        for _ in range(10):
            states[name], _ = step(states[name], x, y, keys)
    times, names = {name: [] for name in steps}, list(steps)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            for _ in range(args.steps):
                states[name], out = steps[name](states[name], x, y, keys)
            out.block_until_ready()
            times[name].append((time.perf_counter() - start) / args.steps * 1e3)
    base = np.array(times[names[0]])
    rows = [
        {"program": name, "median_ms": float(np.median(t)), "paired": float(np.median(t / base)),
         "of_medians": float(np.median(t) / np.median(base)), "max_grad_error": error[name]}
        for name, t in ((name, np.array(t)) for name, t in times.items())
    ]  # fmt: skip
    print(f"{'program':>28} {'median ms':>10} {'paired':>7} {'of medians':>11} {'grad err':>9}")
    for r in rows:
        print(f"{r['program']:>28} {r['median_ms']:>10.3f} {r['paired']:>7.3f} "
              f"{r['of_medians']:>11.3f} {r['max_grad_error']:>9.1e}")  # fmt: skip
    meta = {"jax": jax.__version__, "platform": jax.default_backend(), "batch": B}
    print(json.dumps({"benchmark": "dense_backward", **meta, "rows": rows}))


if __name__ == "__main__":
    main()
