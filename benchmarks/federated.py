"""Federated learning (issue #14): how fast rounds run, and what FedAvg reaches on digits.

``--part speed``: client updates per second of 100 clients of the FedAvg paper's 2NN (E=1, B=10)
on the embedded digits: jaxpar's round (every client in one program: ``vmap`` over clients of a
``lax.scan`` over local steps) against a plain Python loop over clients calling the same local
training, jitted once (the way most simulators run: each client's data already on the device,
its weight on the host), then averaging. Both in this process, alternating, medians of
``--rounds`` rounds.

``--part accuracy``: 20 clients, 10 per round, E=1, B=10, lr 0.05: FedAvg over IID and over
``shards:2`` (pathological non-IID) clients against centralized SGD (batch 10, lr 0.05) given the
same number of example visits; test accuracy against rounds in ``--png``.

    python benchmarks/federated.py --part speed
    python benchmarks/federated.py --part accuracy --png benchmarks/federated.png
    python benchmarks/federated.py --part at-once --at-once 1 8 100   # slots trained together
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp


def speed(rounds: int) -> dict:
    from functools import partial

    from flax import nnx

    from jaxpar.core.step import _keys
    from jaxpar.data import preprocess
    from jaxpar.run.config import Config
    from jaxpar.run.setup import setup

    cfg = Config.of(model="2nn", clients=100, clients_per_round=100, local_batch=10, lr=0.05,
                 rounds=1, mesh="1").validate()  # fmt: skip
    run = setup(cfg)
    mode, ds, graphdef = run.mode, run.ds, run.compile.args[0]
    keys, prepare = tuple(_keys(0)[1:]), preprocess(ds)
    host = mode.round_rows(0)
    batch = {"image": ds.train_images[host["rows"]], "label": ds.train_labels[host["rows"]],
             **{k: host[k] for k in ("mask", "weight", "client")}}  # fmt: skip
    batch = jax.device_put(batch)
    whole = jax.jit(partial(mode.step, graphdef=graphdef, keys=keys, prepare=prepare))
    state = jax.device_get(run.init())

    @jax.jit
    def one_client(state, client, images, labels, mask):  # the same local training, one client
        model, _ = nnx.merge(graphdef, state)
        graph, start, rest = nnx.split(model, nnx.Param, ...)
        round_keys = tuple(jax.random.fold_in(k, 0) for k in keys)
        params, _, loss = mode.local(graph, start, rest, round_keys, prepare, client, images,
                                     labels, mask)  # fmt: skip
        return jax.tree.map(jnp.subtract, params, start), loss

    # Two loops over clients. "placed": each client's arrays already on the device and its
    # weight on the host. "sliced": each client's rows taken from the round's arrays and its
    # weight read back, per client, as a simulator reading client datasets one by one does.
    clients = [[batch[k][c] for k in ("client", "image", "label", "mask")]
               for c in range(mode.slots)]  # fmt: skip
    weights = host["weight"]

    def loop(sliced: bool):
        summed, total = None, 0.0
        for c in range(mode.slots):
            data = [batch[k][c] for k in ("client", "image", "label", "mask")] if sliced else (
                clients[c])  # fmt: skip
            w = float(batch["weight"][c]) if sliced else weights[c]
            delta, _ = one_client(state, *data)
            weighted = jax.tree.map(partial(jnp.multiply, w), delta)
            summed = weighted if summed is None else jax.tree.map(jnp.add, summed, weighted)
            total += w
        return jax.block_until_ready(jax.tree.map(lambda s: s / total, summed))

    contenders = {"jaxpar": lambda: jax.block_until_ready(whole(state, batch)),
                  "placed": partial(loop, False), "sliced": partial(loop, True)}  # fmt: skip
    times = {k: [] for k in contenders}
    for f in contenders.values():  # compile and warm up
        f()
    for _ in range(rounds):
        for name, f in contenders.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    rate = {k: mode.slots / statistics.median(v) for k, v in times.items()}
    return {"clients": mode.slots, "local_steps": mode.local_steps,
            "client_updates_per_s": rate,
            "ratio_placed": rate["jaxpar"] / rate["placed"],
            "ratio_sliced": rate["jaxpar"] / rate["sliced"]}  # fmt: skip


def at_once(rounds: int, counts: list[int], dataset: str) -> dict:
    """Client updates/s of one round of 100 clients with `count` slots trained together per
    device, for each count: the choice `Federated.sum_over_slots` makes per backend."""
    import dataclasses
    from functools import partial

    from jaxpar.core.step import _keys
    from jaxpar.data import preprocess
    from jaxpar.run.config import Config
    from jaxpar.run.setup import setup

    cfg = Config.of(model="2nn", dataset=dataset, clients=100, clients_per_round=100,
                 local_batch=10, lr=0.05, rounds=1, mesh="1").validate()  # fmt: skip
    run = setup(cfg)
    host = run.mode.round_rows(0)
    batch = jax.device_put({"image": run.ds.train_images[host["rows"]],
                            "label": run.ds.train_labels[host["rows"]],
                            **{k: host[k] for k in ("mask", "weight", "client")}})  # fmt: skip
    state = jax.device_put(jax.device_get(run.init()))
    rates = {}
    for count in counts:
        mode = dataclasses.replace(run.mode, at_once=count)
        step = partial(mode.step, graphdef=run.compile.args[0], keys=tuple(_keys(0)[1:]),
                       prepare=preprocess(run.ds))  # fmt: skip
        compiled = jax.jit(step).lower(state, batch).compile()
        jax.block_until_ready(compiled(state, batch))
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            jax.block_until_ready(compiled(state, batch))
            times.append(time.perf_counter() - start)
        rates[count] = mode.slots / statistics.median(times)
        print(f"at_once {count}: {rates[count]:,.0f} client updates/s "
              f"({mode.local_steps} local steps each)", flush=True)  # fmt: skip
    return {"device": jax.devices()[0].device_kind, "rates": rates}


def accuracy(rounds: int, png: str | None) -> dict:
    import train as cli

    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--model", "2nn", "--lr", "0.05", "--log-every", "1000"]
        fed = [*common, "--clients", "20", "--clients-per-round", "10", "--local-epochs", "1",
               "--local-batch", "10", "--rounds", str(rounds), "--eval-every", "5"]  # fmt: skip
        # a round visits half the examples once: centralized SGD gets as many (batch 10)
        per_round = 1437 // 2 // 10
        central = [*common, "--batch-size", "10", "--momentum", "0", "--steps",
                   str(rounds * per_round), "--eval-every", str(5 * per_round)]  # fmt: skip
        for name, args in (("centralized", central), ("fedavg iid", [*fed, "--partition", "iid"]),
                           ("fedavg shards:2", [*fed, "--partition", "shards:2"])):  # fmt: skip
            workdir = Path(tmp) / name.replace(" ", "-").replace(":", "")
            assert cli.main([*args, "--workdir", str(workdir)]) == 0
            lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
            evals = [x for x in lines if "eval_accuracy" in x]
            scale = per_round if name == "centralized" else 1
            curves[name] = [(x["step"] / scale, x["eval_accuracy"]) for x in evals]
    if png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, points in curves.items():
            ax.plot(*zip(*points, strict=True), label=name, marker=".")
        ax.set_xlabel("round (centralized: the same example visits)")
        ax.set_ylabel("test accuracy")
        ax.set_title("2NN on digits, 20 clients, 10 per round, E=1, B=10")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(png, dpi=100)
    return {name: {"final": points[-1][1], "curve": points} for name, points in curves.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["speed", "accuracy", "at-once"], default="speed")
    parser.add_argument("--at-once", type=int, nargs="+", default=[1, 2, 8, 25, 100])
    parser.add_argument("--dataset", default="digits", help="the at-once part's data")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--png")
    a = parser.parse_args()
    if a.part == "speed":
        r = speed(a.rounds or 5)
        rate = r["client_updates_per_s"]
        print(f"{r['clients']} clients x {r['local_steps']} local steps, client updates/s: "
              f"jaxpar {rate['jaxpar']:,.0f}; a loop over clients, data placed "
              f"{rate['placed']:,.0f} ({r['ratio_placed']:.1f}x), data sliced per client "
              f"{rate['sliced']:,.0f} ({r['ratio_sliced']:.1f}x)")  # fmt: skip
    elif a.part == "at-once":
        r = at_once(a.rounds or 5, a.at_once, a.dataset)
    else:
        r = accuracy(a.rounds or 60, a.png)
        for name, v in r.items():
            print(
                f"{name:16} final test accuracy {v['final']:.4f}  "
                + " ".join(f"{s:g}:{acc:.3f}" for s, acc in v["curve"])
            )
    print(json.dumps({"benchmark": "federated", "part": a.part, "jax": jax.__version__,
                      "result": r}, default=float))  # fmt: skip


if __name__ == "__main__":
    main()
