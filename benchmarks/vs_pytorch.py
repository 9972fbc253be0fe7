"""jaxpar against the seed's PyTorch program: training samples per second and test accuracy.

The PyTorch side is the seed program: its MLP (Linear 512 + ReLU, Dropout 0.5, Linear 256 +
PReLU, Linear to the classes) wrapped in `nn.DataParallel`, SGD lr 0.01 momentum 0.9, batch 128,
a shuffling DataLoader. Both train the same epochs on the same data (the embedded digits set) in
this process, one after the other, in alternating order over rounds. Throughput counts training
steps only (not evaluation); jaxpar's first epoch, which includes compilation, is reported apart.
Needs PyTorch (CPU build): ``pip install torch``.

    python benchmarks/vs_pytorch.py                  # 20 epochs, 3 rounds, 1 device
    python benchmarks/vs_pytorch.py --mesh 2 --epochs 30
    python benchmarks/vs_pytorch.py --steps-per-dispatch 8   # jaxpar runs 8 steps per call
"""

import argparse
import dataclasses
import json
import time
from functools import partial

import jax
import numpy as np
import torch
from torch import nn

from jaxpar.core.mesh import make_mesh, parse_mesh, request_devices, set_xla_flags
from jaxpar.core.optimizers import make_optimizer
from jaxpar.core.step import compile_steps, create_state
from jaxpar.data import eval_batches, load_dataset, prefetch, train_batches
from jaxpar.models import MLP
from jaxpar.run.evaluation import evaluate
from jaxpar.run.loop import dispatches

set_xla_flags()  # as train.py, before JAX starts

BATCH = 128


def as_float(ds):
    """Materialise and normalise stored uint8 images once: both programs read the same floats."""
    rows = lambda a: a[np.arange(len(a))]  # noqa: E731 - synthetic sets are views of a pool
    norm = lambda a: ((rows(a) / 255.0 - 0.5) / 0.25).astype(np.float32)  # noqa: E731
    return dataclasses.replace(
        ds, train_images=norm(ds.train_images), test_images=norm(ds.test_images),
        train_labels=rows(ds.train_labels), test_labels=rows(ds.test_labels), mean=(0.0,),
        std=(1.0,),
    )  # fmt: skip


def torch_run(ds, epochs: int, seed: int) -> dict:
    torch.manual_seed(seed)
    din = int(np.prod(ds.image_shape))
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(din, 512), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(512, 256), nn.PReLU(), nn.Linear(256, ds.num_classes),
    )  # fmt: skip
    model = nn.DataParallel(net)  # as the seed; on a CPU-only machine it runs the module as is
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.from_numpy(np.ascontiguousarray(ds.train_images.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(ds.train_labels.astype(np.int64))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=True, drop_last=True
    )
    loss_fn, steps = nn.CrossEntropyLoss(), 0
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
            steps += 1
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        tx = torch.from_numpy(np.ascontiguousarray(ds.test_images.transpose(0, 3, 1, 2)))
        pred = model(tx).argmax(1).numpy()
    return {"samples_per_s": steps * BATCH / seconds, "test_accuracy": float(
        (pred == ds.test_labels).mean())}  # fmt: skip


def jaxpar_run(ds, epochs: int, seed: int, mesh, k: int = 1) -> dict:
    model_fn = partial(MLP, ds.image_shape, ds.num_classes)
    graphdef, state, shardings, _ = create_state(model_fn, make_optimizer(), mesh, seed)
    train_step, eval_step = compile_steps(graphdef, shardings, mesh, seed, 4)
    train_steps, _ = compile_steps(graphdef, shardings, mesh, seed, 4, stacked=True)
    per_epoch = len(ds.train_labels) // BATCH
    epoch_times, previous = [], None
    for epoch in range(epochs):
        start = time.perf_counter()
        plan = dispatches(epoch * per_epoch, (epoch + 1) * per_epoch, k)  # as jaxpar's loop
        for steps, batch in zip(
            plan, prefetch(train_batches(ds, BATCH, seed, plan, mesh)), strict=True
        ):
            step = train_steps if len(steps) > 1 else train_step
            state, metrics = step(state, batch)
            if previous is not None:  # as jaxpar's loop: read the previous dispatch's losses
                np.asarray(previous["train_loss"])
            previous = metrics
        np.asarray(previous["train_loss"])
        epoch_times.append(time.perf_counter() - start)
    accuracy = evaluate(eval_step, state, eval_batches(ds, BATCH, mesh))["eval_accuracy"]
    return {
        "samples_per_s": (epochs - 1) * per_epoch * BATCH / sum(epoch_times[1:]),
        "first_epoch_s": epoch_times[0],
        "test_accuracy": accuracy,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mesh", default="1")
    parser.add_argument("--steps-per-dispatch", type=int, default=1, help="jaxpar's K")
    parser.add_argument(
        "--dataset", default="digits", help="e.g. synthetic:28x28x1:10 (MNIST size)"
    )
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first one includes compilation")
    spec = parse_mesh(args.mesh)
    # As train.py: emulate the mesh's devices only (4 made a 1-device step 6-34% slower)
    request_devices(spec.size)
    ds, mesh = load_dataset(args.dataset), make_mesh(spec)
    ds = as_float(ds) if ds.train_images.dtype == np.uint8 else ds
    results = {"pytorch": [], "jaxpar": []}
    for r in range(args.rounds):
        for name in sorted(results, reverse=r % 2 == 1):
            run = torch_run(ds, args.epochs, r) if name == "pytorch" else jaxpar_run(
                ds, args.epochs, r, mesh, args.steps_per_dispatch)  # fmt: skip
            results[name].append(run)
    summary = {
        name: {k: float(np.median([x[k] for x in runs])) for k in runs[0]}
        for name, runs in results.items()
    }
    ratio = summary["jaxpar"]["samples_per_s"] / summary["pytorch"]["samples_per_s"]
    print(f"{'':>8} {'samples/s':>10} {'test acc':>9}")
    for name, s in summary.items():
        print(f"{name:>8} {s['samples_per_s']:>10.0f} {s['test_accuracy']:>9.4f}")
    print(f"jaxpar / pytorch throughput: {ratio:.2f}x; jaxpar's first epoch (with compilation) "
          f"{summary['jaxpar']['first_epoch_s']:.2f} s")  # fmt: skip
    meta = {"jax": jax.__version__, "torch": torch.__version__, "torch_threads":
            torch.get_num_threads(), "mesh": args.mesh, "epochs": args.epochs,
            "dataset": args.dataset, "steps_per_dispatch": args.steps_per_dispatch}  # fmt: skip
    print(json.dumps({"benchmark": "vs_pytorch", **meta, "summary": summary, "ratio": ratio}))


if __name__ == "__main__":
    main()
