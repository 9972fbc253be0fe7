"""Federated learning (``--clients N``): FedAvg and its kin, every client of a round in one program.

The training set is cut into `clients` parts (`partition`); that part is all a client ever
sees. A round (one step of the loop: ``step`` counts rounds) samples `per_round` clients from
(seed, round) alone, sends them the global model, and each runs `local_epochs` epochs of plain
SGD (``--lr``, batches of `local_batch`, its own shuffle per epoch) on its own examples: a
``lax.scan`` over local steps, the clients batched by ``vmap`` and sharded over ``data`` (several
per device when there are more clients than devices). The server averages the clients' updates
weighted by their example counts and applies the average through a server optimizer (FedAvg: SGD
of learning rate 1, which lands on the clients' weighted mean; FedAvgM, FedAdam and FedYogi as
in Reddi et al. 2021, "Adaptive Federated Optimization").

Clients differ in size: each is padded to the largest client's rows per epoch and padded rows
are masked, so every round runs the same program. A client's batches are its examples in its own
order, then padding: its steps past its last example do nothing, as if it had stopped.

Options: FedProx's proximal term ``mu / 2 * ||w - w_round||^2`` in each local loss (``--prox-mu``);
DP-FedAvg (``--dp-clip S --dp-noise Z``, McMahan et al. 2018): each client's update clipped to
norm S, the round's clients weighted equally, Gaussian noise of standard deviation Z * S / m on
the mean of m clients; a simulation of secure aggregation's fixed-point arithmetic
(``--secure-agg``): weighted updates, in units of a round's expected total weight, in 32-bit
integers with 16 fractional bits (so a round's mean update must stay within +-32,768 and is
exact to about 2**-16), summed modulo 2**32 as a real protocol would, their result used in place
of the float sum, and the largest difference between the two returned as ``secure_agg_error``.

Reductions (tests/test_federated.py): one client holding all the data with one local step is
centralized SGD; ``--prox-mu 0`` is FedAvg; a client twice is a client of twice the weight;
``--dp-clip inf --dp-noise 0`` over equal clients is FedAvg.
"""

import dataclasses
import json
import math
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxpar.core.errors import UserError
from jaxpar.core.sharding import batch_sharding, mapped_over
from jaxpar.core.step import cross_entropy
from jaxpar.data import device_batch
from jaxpar.modes.mode import Mode

SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
CLIENTS = "data"  # the mesh axis the clients of a round are spread over
FRACTION_BITS = 16  # secure aggregation's fixed point


def server_optimizer(name: str, lr: float | None) -> optax.GradientTransformation:
    """The server's optimizer; its "gradient" is minus the clients' mean update.

    `lr` None takes each one's usual server learning rate: 1 for FedAvg (the mean itself) and
    FedAvgM, 0.01 for FedAdam and FedYogi (whose adaptivity eps is 1e-3, as Reddi et al.)."""
    if name not in SERVER_OPTIMIZERS:
        raise UserError(f"unknown --server-optimizer {name!r}; choose from "
                        f"{', '.join(SERVER_OPTIMIZERS)}")  # fmt: skip
    if name == "fedavg":
        return optax.sgd(1.0 if lr is None else lr)
    if name == "fedavgm":
        return optax.sgd(1.0 if lr is None else lr, momentum=0.9)
    make = optax.adam if name == "fedadam" else optax.yogi
    return make(0.01 if lr is None else lr, b1=0.9, b2=0.99, eps=1e-3)


def parse_partition(text: str) -> tuple[str, float]:
    """``iid``, ``shards:K`` or ``dirichlet:ALPHA`` as ``(kind, value)``.

    >>> parse_partition("iid"), parse_partition("shards:2"), parse_partition("dirichlet:0.5")
    (('iid', 0), ('shards', 2), ('dirichlet', 0.5))
    """
    if text == "iid":
        return "iid", 0
    m = re.fullmatch(r"(shards|dirichlet):([-+\d.e]+)", text)
    value = None
    if m:
        try:
            value = int(m[2]) if m[1] == "shards" else float(m[2])
        except ValueError:
            value = None
    if value is None or not value > 0 or not math.isfinite(value):
        raise UserError(
            f"--partition {text}: use iid, shards:K (K >= 1 label-sorted shards per client) or "
            "dirichlet:ALPHA (ALPHA > 0)"
        )
    return m[1], value


def partition(labels: np.ndarray, clients: int, text: str, seed: int) -> list[np.ndarray]:
    """The example indices of each client, a function of (labels, clients, text, seed).

    - ``iid``: a shuffle cut into `clients` parts of equal size (within one example).
    - ``shards:K``: McMahan et al.'s pathological non-IID split: examples sorted by label, cut
      into ``clients * K`` shards of equal size, K random shards per client.
    - ``dirichlet:ALPHA``: for each class, its examples are divided among the clients in
      proportions drawn from a symmetric Dirichlet(ALPHA) over the clients (the per-class
      convention of Yurochkin et al. 2019 and Wang et al. 2020; small ALPHA: few classes per
      client, and unequal sizes).

    >>> labels = np.repeat(np.arange(4), 5)
    >>> [sorted(set(labels[p].tolist())) for p in partition(labels, 4, "shards:1", 0)]
    [[3], [0], [2], [1]]
    """
    kind, value = parse_partition(text)
    rng = np.random.default_rng([seed, 7919])  # the partition's own stream
    n = len(labels)
    if kind == "iid":
        parts = np.array_split(rng.permutation(n), clients)
    elif kind == "shards":
        shards = clients * int(value)
        if shards > n:
            raise UserError(f"--partition {text} with {clients} clients makes {shards} shards "
                            f"of {n} examples; use fewer shards or clients")  # fmt: skip
        order = np.argsort(labels, kind="stable")
        cut = np.array_split(order, shards)
        picks = rng.permutation(shards).reshape(clients, int(value))
        parts = [np.concatenate([cut[s] for s in row]) for row in picks]
    else:
        parts = [[] for _ in range(clients)]
        for label in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == label))
            share = rng.dirichlet(np.full(clients, value))
            ends = np.round(np.cumsum(share) * len(rows)).astype(int)
            for c, part in enumerate(np.split(rows, ends[:-1])):
                parts[c].extend(part)
        parts = [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    if empty := [c for c, p in enumerate(parts) if len(p) == 0]:
        raise UserError(
            f"--partition {text} leaves client {empty[0]} ({len(empty)} in all) with no example "
            f"of the {n}; use fewer --clients{' or a larger ALPHA' if kind == 'dirichlet' else ''}"
        )
    return [np.asarray(p, dtype=np.int64) for p in parts]


def summary(parts: list[np.ndarray], labels: np.ndarray) -> dict:
    """Examples and distinct labels per client: min, median and max, and every client's count."""
    sizes = np.array([len(p) for p in parts])
    kinds = np.array([len(np.unique(labels[p])) for p in parts])
    stat = lambda a: {"min": int(a.min()), "median": float(np.median(a)), "max": int(a.max())}  # noqa: E731
    return {"clients": len(parts), "examples": stat(sizes), "labels": stat(kinds),
            "examples_per_client": sizes.tolist()}  # fmt: skip


@dataclasses.dataclass
class Federated(Mode):
    """``--clients N``: a `jaxpar.modes.sync`-style mode whose step is a federated round."""

    parts: list  # example indices of each client (`partition`)
    per_round: int
    local_epochs: int
    local_batch: int
    lr: float  # the clients' SGD learning rate
    seed: int
    shards: int  # devices along the clients' axis: a round's clients are padded to a multiple
    prox_mu: float = 0.0
    dp_clip: float | None = None
    dp_noise: float = 0.0
    secure_agg: bool = False
    about: dict = dataclasses.field(default_factory=dict)  # the partition's summary
    at_once: int | None = None  # slots a device trains together (None: 1 on CPUs, all else)
    rounds: int = 0  # of the run (for the privacy budget)

    period = 0  # no sync program: the round is the step
    unit = "round"  # what the printed progress counts
    sync = None

    @property
    def clients(self) -> int:
        return len(self.parts)

    @property
    def slots(self) -> int:
        """Clients per round, padded with empty ones to a multiple of the devices holding them."""
        return -(-self.per_round // self.shards) * self.shards

    @property
    def local_steps(self) -> int:
        """Local steps of every client in a round: epochs x the largest client's batches."""
        largest = max(len(p) for p in self.parts)
        return self.local_epochs * -(-largest // self.local_batch)

    def steps_per_epoch(self, ds, batch_size: int) -> int:
        """Rounds per pass over the clients (the "epoch" of ``--eval-every 0``)."""
        return max(1, self.clients // self.per_round)

    def layout(self, abstract, shardings, mesh, params):
        return abstract, shardings

    @staticmethod
    def init(state):
        return state

    @staticmethod
    def view(state):
        return state

    def optimizer(self, cfg, total: int) -> optax.GradientTransformation:
        return server_optimizer(cfg.federated.server_optimizer, cfg.federated.server_lr)

    def check(self, cfg, mesh) -> None:
        """Nothing: a round has no global batch to split."""

    def examples_per_step(self, batch_size: int) -> float:
        """Client examples a round trains on, on average: its clients' mean size x epochs."""
        return self.per_round * np.mean([len(p) for p in self.parts]) * self.local_epochs

    def stamp(self, step: int) -> dict:
        return {"round": step}

    def announce(self, workdir) -> list[str]:
        """The partition's summary (also written to ``WORKDIR/partition.json``) and, with DP,
        the privacy budget of the run's rounds."""
        if jax.process_index() == 0:
            (workdir / "partition.json").write_text(json.dumps(self.about, indent=1))
        s, lines = self.about, []
        if self.dp_noise:
            q = self.per_round / self.clients
            eps = privacy_budget(q, self.dp_noise, self.rounds, DELTA)
            lines.append(f"privacy: epsilon {eps:.3g} at delta {DELTA:g} after {self.rounds} "
                         f"rounds (noise multiplier {self.dp_noise:g}, clients sampled at rate "
                         f"{q:.3g}; dp-accounting's RDP accountant)")  # fmt: skip
        examples, labels = s["examples"], s["labels"]
        lines.append(f"partition: {s['clients']} clients; examples per client min "
                     f"{examples['min']} / median {examples['median']:g} / max {examples['max']}; "
                     f"labels per client min {labels['min']} / median {labels['median']:g} / max "
                     f"{labels['max']}")  # fmt: skip
        return lines

    def traffic(self, param_bytes: int) -> dict:
        """Bytes a real deployment sends per round: the model down and an update up, per client
        and over the round's clients."""
        return {"bytes_down_per_client": param_bytes, "bytes_up_per_client": param_bytes,
                "bytes_per_round": 2 * param_bytes * self.per_round}  # fmt: skip

    def chosen(self, rnd: int) -> np.ndarray:
        """The clients of round `rnd`: a function of (seed, round) alone."""
        rng = np.random.default_rng([self.seed, rnd, 104729])
        return np.sort(rng.choice(self.clients, self.per_round, replace=False))

    def round_rows(self, rnd: int) -> dict[str, np.ndarray]:
        """Host arrays of round `rnd`: each slot's example rows ``(slots, steps, batch)``, their
        mask, the slot's weight (examples; 0 for padding) and client id."""
        per_epoch = self.local_steps // self.local_epochs * self.local_batch
        rows = np.zeros((self.slots, self.local_epochs, per_epoch), np.int64)
        mask = np.zeros(rows.shape, np.float32)
        weight = np.zeros(self.slots, np.float32)
        client = self.clients + np.arange(self.slots, dtype=np.int32)  # padding: unused ids
        for slot, c in enumerate(self.chosen(rnd)):
            part = self.parts[c]
            for e in range(self.local_epochs):  # the client's own shuffle, per round and epoch
                order = np.random.default_rng([self.seed, rnd, int(c), e]).permutation(len(part))
                rows[slot, e, : len(part)] = part[order]
                mask[slot, e, : len(part)] = 1
            weight[slot], client[slot] = len(part), c
        shape = (self.slots, self.local_steps, self.local_batch)
        return {"rows": rows.reshape(shape), "mask": mask.reshape(shape), "weight": weight,
                "client": client}  # fmt: skip

    def batch_ndims(self, image_ndim: int) -> dict[str, int]:
        return {"image": image_ndim + 2, "label": 3, "mask": 3, "weight": 1, "client": 1}

    def batches(self, ds, batch_size: int, seed: int, plan, mesh, workers: int = 0):
        """The device arrays of each round in `plan` (ranges of one round). Read in this
        process: the config refuses --data-workers with --clients."""
        arrays = {"image": ds.train_images, "label": ds.train_labels}
        for steps in plan:
            host = self.round_rows(steps.start)
            batch = device_batch(arrays, host.pop("rows"), mesh)
            for k, a in host.items():
                sharding = batch_sharding(mesh, a.ndim)
                batch[k] = jax.make_array_from_callback(a.shape, sharding, lambda i, a=a: a[i])
            yield batch

    def abstract_batch(self, ds, batch_size: int, mesh) -> dict:
        shapes = {"image": (self.slots, self.local_steps, self.local_batch, *ds.image_shape),
                  "label": (self.slots, self.local_steps, self.local_batch),
                  "mask": (self.slots, self.local_steps, self.local_batch),
                  "weight": (self.slots,), "client": (self.slots,)}  # fmt: skip
        dtypes = {"image": ds.train_images.dtype, "label": np.int32, "mask": np.float32,
                  "weight": np.float32, "client": np.int32}  # fmt: skip
        return {k: jax.ShapeDtypeStruct(s, dtypes[k], sharding=batch_sharding(mesh, len(s)))
                for k, s in shapes.items()}  # fmt: skip

    def step(self, state, batch, *, graphdef, keys, prepare, accum=1, loss=None):
        """One round: every slot trains locally from the global model, the server sums what
        they send (`sum_over_slots`), takes the mean (`finish`) and applies it through its
        optimizer. The clients' loss is their own (`loss` unused: the config refuses
        --label-smoothing for federated runs)."""
        model, server = nnx.merge(graphdef, state)
        rnd = server.step[...]
        graph, start, rest = nnx.split(model, nnx.Param, ...)
        round_keys = tuple(jax.random.fold_in(k, rnd) for k in keys)  # dropout, augmentation
        local = partial(self.local, graph, start, rest, round_keys, prepare)
        sums = self.sum_over_slots(local, start, batch)
        mean, metrics = self.finish(sums, round_keys[0])
        examples = sums["examples"]
        nnx.update(model, jax.tree.map(lambda r: r / examples, sums["rest"]))  # BatchNorm stats
        server.update(model, jax.tree.map(jnp.negative, mean))  # descend on -mean: add it
        metrics = {**metrics, "train_loss": sums["loss"] / examples,
                   "grad_norm": optax.tree.norm(mean)}  # fmt: skip
        return nnx.to_pure_dict(nnx.state((model, server))), metrics

    def sum_over_slots(self, local, start, batch) -> dict:
        """The round's sums over its slots (`contribution`s, and by examples the clients'
        BatchNorm statistics and losses): the slots split over the devices along ``data`` (a
        ``vmap`` sharded over it), each device adding up its own, then one sum over devices.

        Performance is decided here. Each device runs its slots one after another on a CPU and
        all at once on an accelerator. A CPU computes a batch of small matrix products (one per
        client) far slower than one at a time (100 clients of the 2NN on digits: 460-540 client
        updates/s all at once, 3,200-4,400 one at a time); an H200 the other way round (100
        clients of the 2NN, 50 local steps each: 7,956 client updates/s all at once, 2,330 8 at
        a time, 676 one at a time; benchmarks/federated.py --part at-once). One at a time, a
        device holds a few copies of the model whatever its number of clients; all at once, a
        copy per client."""
        per_device = self.slots // self.shards
        at_once = self.at_once or (1 if jax.default_backend() == "cpu" else per_device)
        at_once = max(d for d in range(1, min(at_once, per_device) + 1) if per_device % d == 0)

        def slot(client, images, labels, mask, weight):
            params, rest, loss = local(client, images, labels, mask)
            sent = self.contribution(jax.tree.map(jnp.subtract, params, start), weight)
            return {**sent, "rest": jax.tree.map(lambda r: weight * r, rest),
                    "loss": weight * loss, "examples": weight}  # fmt: skip

        def on_device(*xs):  # this device's slots, `at_once` at a time
            chunks = [x.reshape(per_device // at_once, at_once, *x.shape[1:]) for x in xs]

            def add(total, chunk):
                return jax.tree.map(lambda t, c: t + c.sum(0), total, jax.vmap(slot)(*chunk)), None

            shapes = jax.eval_shape(jax.vmap(slot), *[c[0] for c in chunks])
            zero = jax.tree.map(lambda a: jnp.zeros(a.shape[1:], a.dtype), shapes)
            return jax.lax.scan(add, zero, chunks)[0]

        names = ("client", "image", "label", "mask", "weight")
        split = [batch[k].reshape(self.shards, per_device, *batch[k].shape[1:]) for k in names]
        with mapped_over(CLIENTS):
            per_device_sums = jax.vmap(on_device, spmd_axis_name=CLIENTS)(*split)
        return jax.tree.map(lambda a: a.sum(0), per_device_sums)  # uint32 sums wrap: mod 2**32

    def contribution(self, delta, weight) -> dict:
        """What one client sends: its update times its weight (its examples; with DP-FedAvg
        clipped to norm ``--dp-clip`` and weighted 1), the weight, and with secure aggregation
        the weighted update in 32-bit fixed point."""
        if self.dp_clip is not None:
            scale = jnp.minimum(1.0, self.dp_clip / jnp.maximum(optax.tree.norm(delta), 1e-12))
            delta, weight = jax.tree.map(lambda d: d * scale, delta), (weight > 0) * 1.0
        sent = {"update": jax.tree.map(lambda d: weight * d, delta), "weight": weight}
        if self.secure_agg:  # in units of the round's expected total weight: values near 1
            sent["fixed"] = jax.tree.map(
                lambda u: to_fixed(u / self.expected_weight), sent["update"]
            )
        return sent

    @property
    def expected_weight(self) -> float:
        """A round's total weight on average, which every client knows (the fixed point's unit
        for secure aggregation): the round's clients, each of its mean examples (1 under DP)."""
        mean = 1.0 if self.dp_clip is not None else float(np.mean([len(p) for p in self.parts]))
        return self.per_round * mean

    def finish(self, sums, key):
        """The mean update from the round's sums: with secure aggregation the fixed-point sum
        (its largest difference from the float one as ``secure_agg_error``), with DP-FedAvg
        plus Gaussian noise of std z * S / m for the m clients of the round."""
        metrics, total, summed = {}, sums["weight"], sums["update"]
        if self.secure_agg:
            secure = jax.tree.map(lambda x: from_fixed(x) * self.expected_weight, sums["fixed"])
            gaps = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), secure, summed)
            metrics["secure_agg_error"] = jnp.max(jnp.stack(jax.tree.leaves(gaps))) / total
            summed = secure
        mean = jax.tree.map(lambda x: x / total, summed)
        if self.dp_noise:
            leaves, tree = jax.tree.flatten(mean)
            keys = jax.random.split(jax.random.fold_in(key, 2**31 - 1), len(leaves))
            std = self.dp_noise * self.dp_clip / total
            noisy = [x + std * jax.random.normal(k, x.shape, x.dtype)
                     for x, k in zip(leaves, keys, strict=True)]  # fmt: skip
            mean = jax.tree.unflatten(tree, noisy)
        return mean, metrics

    def aggregate(self, deltas, weight, key):
        """`finish` of the `contribution`s of a stack of updates (leading axis: clients)."""
        sent = jax.vmap(self.contribution)(deltas, weight)
        return self.finish(jax.tree.map(lambda a: a.sum(0), sent), key)

    def local(self, graph, start, rest, round_keys, prepare, client, images, labels, mask):
        """One client's local epochs of SGD from the global parameters `start`: its parameters,
        other variables (BatchNorm statistics) and mean training loss."""

        def one(carry, xs):
            params, rest = carry
            i, x, y, m = xs
            dk, ak = (jax.random.fold_in(jax.random.fold_in(k, client), i) for k in round_keys)
            x, example_keys, count = prepare(x, ak), jax.vmap(partial(jax.random.fold_in, dk))(
                jnp.arange(len(y))), m.sum()  # fmt: skip

            def loss_fn(params):
                net = nnx.merge(graph, params, rest)
                ce = cross_entropy(net(x, train=True, rngs=example_keys), y)
                loss = (ce * m).sum() / jnp.maximum(count, 1)
                aux = (loss, nnx.state(net, nnx.Not(nnx.Param)))
                if not self.prox_mu:  # FedAvg: no pass over the parameters for nothing
                    return loss, aux
                prox = optax.tree.norm(jax.tree.map(jnp.subtract, params, start), squared=True)
                return loss + self.prox_mu / 2 * prox, aux

            (_, (loss, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            lr = jnp.where(count > 0, self.lr, 0.0)  # a batch of padding: the client has stopped
            params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
            rest = jax.tree.map(lambda new, old: jnp.where(count > 0, new, old), new_rest, rest)
            return (params, rest), loss * count

        steps = jnp.arange(images.shape[0])
        (params, rest), losses = jax.lax.scan(one, (start, rest), (steps, images, labels, mask))
        return params, rest, losses.sum() / jnp.maximum(mask.sum(), 1)


def _along(v: jax.Array, like: jax.Array) -> jax.Array:
    """`v` (one value per slot) shaped to broadcast over `like`'s leading axis."""
    return v.reshape(-1, *[1] * (like.ndim - 1))


def to_fixed(x: jax.Array) -> jax.Array:
    """`x` in 32-bit fixed point (`FRACTION_BITS`), as the unsigned integers secure aggregation
    adds modulo 2**32."""
    return jnp.round(x * 2.0**FRACTION_BITS).astype(jnp.int32).astype(jnp.uint32)


def from_fixed(x: jax.Array) -> jax.Array:
    """A sum of `to_fixed` values (wrapped modulo 2**32) read back as a signed number."""
    return x.astype(jnp.int32).astype(jnp.float32) / 2.0**FRACTION_BITS


def secure_sum(d: jax.Array, weight: jax.Array) -> jax.Array:
    """``sum_c weight[c] * d[c]`` as secure aggregation computes it: each term in fixed point,
    summed modulo 2**32."""
    return from_fixed(jnp.sum(to_fixed(d * _along(weight, d)), axis=0, dtype=jnp.uint32))


DELTA = 1e-5  # the delta at which the privacy budget is reported


def privacy_budget(q: float, noise: float, rounds: int, delta: float) -> float:
    """Client-level epsilon of `rounds` rounds of DP-FedAvg sampling a fraction `q` of the
    clients with noise multiplier `noise`, by Google's dp-accounting (RDP; it assumes Poisson
    sampling, where jaxpar samples a fixed number: the usual approximation).

    >>> round(privacy_budget(0.1, 1.0, 100, 1e-5), 2)
    7.9
    """
    import logging

    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(noise))
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_event.SelfComposedDpEvent(event, rounds))
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # orders it cannot evaluate are skipped, each warned of
    try:
        return float(accountant.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def make_mode(cfg, spec, ds) -> Federated:
    """The federated mode of `cfg` on the mesh sizes `spec`, its partition of `ds` made."""
    if spec.stage > 1 or spec.fsdp > 1 or spec.model > 1:
        raise UserError(f"--clients spreads clients over the data axis only; mesh {spec} also "
                        "uses stage, fsdp or model: use --mesh data=N")  # fmt: skip
    labels = np.asarray(ds.train_labels[np.arange(len(ds.train_labels))])  # also from a `Tiled`
    f, o = cfg.federated, cfg.optimization
    parts = partition(labels, f.clients, f.partition, o.seed)
    return Federated(
        parts=parts, per_round=f.clients_per_round, local_epochs=f.local_epochs,
        local_batch=f.local_batch, lr=o.lr, seed=o.seed, shards=spec.data,
        prox_mu=f.prox_mu, dp_clip=f.dp_clip, dp_noise=f.dp_noise,
        secure_agg=f.secure_agg, about=summary(parts, labels),
        rounds=o.steps or o.epochs * max(1, f.clients // f.clients_per_round),  # setup's
    )  # fmt: skip


__all__ = ["Federated", "make_mode", "parse_partition", "partition", "server_optimizer",
           "summary"]  # fmt: skip
