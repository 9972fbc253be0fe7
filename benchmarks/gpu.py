"""The GPU benchmark: ResNet-50 and ViT-B/16 in bf16 and the seed's MLP, jaxpar beside PyTorch.

Meant for one GPU with JAX, Flax and Optax installed and no network (run from the repository root
with ``PYTHONPATH=.``); it needs neither tensorflow-datasets nor TensorBoard. Each part
runs in its own process (so one framework's memory pool or failure does not touch the next), in
this order, while time is left before ``--deadline``:

- ``resnet50``: jaxpar's ResNet-50, ``--precision bf16``, synthetic ImageNet-size data (224x224x3,
  1000 classes), SGD with momentum, on one pre-built device batch: images/s (median of rounds),
  and model FLOPs utilisation = FLOPs per step (XLA's cost analysis of the same program on the
  CPU backend) / step time / the card's peak dense bf16 FLOP/s (vendor figure).
- ``torchvision``: torchvision's ResNet-50, bf16 autocast, channels_last, ``torch.compile``d,
  cuDNN autotuning, same batch and optimizer. Its MFU in the table is from jaxpar's FLOP count of
  the same network (jaxpar's MFU x the images/s ratio), as for ``torchvision_vit``.
- ``vit``: jaxpar's ``vit-base`` (ViT-B/16: width 768, depth 12, 12 heads, MLP 3072, patch 16),
  ``--precision bf16``, on the same data and optimizer as ``resnet50``, batch ``--vit-batch``
  (128: 25,000 tokens a step; XLA's CPU analysis puts batch 256 at 79 GiB, an H100's whole
  memory): images/s and MFU counted the same way (the step's scanned blocks unrolled for the
  count: XLA's cost analysis counts a loop body once, 1/12 of the blocks' FLOPs).
- ``torchvision_vit``: torchvision's ``vit_b_16`` (no weights), bf16 autocast, ``torch.compile``d,
  same batch and optimizer (its attention is PyTorch's fused scaled-dot-product kernel).
- ``mlp`` and ``torch_mlp``: one epoch of the seed's MLP on MNIST-size synthetic data (50,000 rows,
  batch 128): jaxpar through its input pipeline, and the seed's PyTorch program (DataLoader,
  ``nn.DataParallel``, batches copied to the GPU), compilation and warm-up excluded.
- ``mlp_k8``: ``mlp`` with 8 steps per dispatch (``--steps-per-dispatch 8``).
- ``resnet50_bn_fp32``: ``resnet50`` with BatchNorm outputs in float32 (jaxpar's choice before
  this benchmark first ran), to measure what bf16 activations are worth.
- ``resnet50_batch_x2``: ``resnet50`` at twice the batch.
- ``vit_pipeline``: ``vit`` through the pipeline schedule on one device (`jaxpar.modes.pipeline`,
  1 stage, ``--pipeline-microbatches`` microbatches): one GPU cannot show a pipeline's speed-up,
  but it shows what the schedule's code path costs against the plain step (``vit``).

    PYTHONPATH=. python benchmarks/gpu.py            # all parts, batch 256, about 7 minutes
    python benchmarks/gpu.py --parts resnet50,torchvision --out gpu.json
    python benchmarks/gpu.py --parts vit,torchvision_vit --out gpu-vit.json
    python benchmarks/gpu.py --smoke                 # tiny sizes, any machine: checks the code
"""

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from functools import partial

PARTS = ("resnet50", "torchvision", "vit", "vit_xla", "torchvision_vit", "mlp", "mlp_k8",
         "torch_mlp", "resnet50_bn_fp32", "resnet50_batch_x2", "vit_pipeline")  # fmt: skip
TORCH_MODELS = {"torchvision": "resnet50", "torchvision_vit": "vit_b_16"}  # part: torchvision model
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s, vendor specs
MLP_BATCH = 128  # the seed's; 50,000 synthetic rows per epoch


def median_step_s(step, rounds: int, steps: int, sync) -> tuple[float, float]:
    """Median and spread (max/min) of the mean step time over `rounds` of `steps` steps."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times), max(times) / min(times)


@contextlib.contextmanager
def unrolled_scans():
    """Trace with every ``jax.lax.scan`` fully unrolled: XLA's cost analysis counts a loop body
    once, whatever its trip count (a scanned ViT's count would hold one block of 12)."""
    import jax

    scan = jax.lax.scan
    jax.lax.scan = partial(scan, unroll=True)
    try:
        yield
    finally:
        jax.lax.scan = scan


def step_flops(graphdef, state, data, prepare) -> float:
    """FLOPs of one train step as XLA's CPU backend counts them (the program is the same anywhere).

    On a GPU neither count works: the compiled program's hides convolutions inside cuDNN calls
    (0.4 GFLOP per ResNet-50 image, not ~24) and the lowered program's is not offered. Scans are
    unrolled for the count (`unrolled_scans`); a step without one is unchanged.
    """
    import jax
    import numpy as np
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

    from jaxpar.core.mesh import AXES
    from jaxpar.core.step import compile_steps

    cpu = np.array(jax.devices("cpu")[:1]).reshape((1,) * len(AXES))
    mesh = Mesh(cpu, AXES, axis_types=(AxisType.Auto,) * len(AXES))
    one = NamedSharding(mesh, PartitionSpec())
    train_step, _ = compile_steps(graphdef, jax.tree.map(lambda _: one, state), mesh, 0, 4, prepare)
    like = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one)  # noqa: E731
    with unrolled_scans():
        lowered = train_step.lower(jax.tree.map(like, state), jax.tree.map(like, data))
    return lowered.cost_analysis()["flops"]


def jax_model(a, model: str, batch: int, bn_fp32: bool = False, **model_kw) -> dict:
    """jaxpar's `model` in bf16 on synthetic ImageNet-size data; `model_kw` go to the model."""
    import jax
    import jax.numpy as jnp

    import jaxpar.models.resnet as resnet_module
    from jaxpar.core.mesh import make_mesh, parse_mesh
    from jaxpar.core.optimizers import make_optimizer
    from jaxpar.core.step import compile_steps, create_state
    from jaxpar.data import load_dataset, preprocess, train_batches
    from jaxpar.models import MODELS

    if bn_fp32:  # the variant measured against: BatchNorm outputs (activations) in float32
        norm = resnet_module._norm
        resnet_module._norm = lambda c, dtype, *rest, **kw: norm(c, jnp.float32, *rest, **kw)
    ds = load_dataset(f"synthetic:{a.image}x{a.image}x3:{a.classes}")
    mesh = make_mesh(parse_mesh("1"))
    model_fn = partial(
        MODELS[model], ds.image_shape, ds.num_classes, dtype=jnp.bfloat16, **model_kw
    )
    graphdef, state, shardings, _ = create_state(model_fn, make_optimizer(lr=0.1), mesh, seed=0)
    train_step, _ = compile_steps(graphdef, shardings, mesh, 0, 4, preprocess(ds))
    data = next(train_batches(ds, batch, 0, range(1), mesh))
    start = time.perf_counter()
    compiled = train_step.lower(state, data).compile()
    compile_s = time.perf_counter() - start
    if model_kw.get("attention", "xla") != "xla":  # cuDNN's attention has no CPU lowering
        from flax import nnx

        from jaxpar.core.step import abstract_state

        xla_fn = partial(model_fn, attention="xla")
        graphdef, abstract = abstract_state(xla_fn, make_optimizer(lr=0.1))
        flops = step_flops(graphdef, nnx.to_pure_dict(abstract), data, preprocess(ds))
    else:
        flops = step_flops(graphdef, state, data, preprocess(ds))
    box = {"state": state}

    def step():
        box["state"], box["metrics"] = compiled(box["state"], data)

    for _ in range(3):  # warm up
        step()
    jax.block_until_ready(box)
    seconds, spread = median_step_s(step, a.rounds, a.steps, lambda: jax.block_until_ready(box))
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_BF16.items() if k in kind), None)
    return {
        "images_per_s": batch / seconds,
        "step_ms": seconds * 1e3,
        "spread": spread,
        "compile_s": compile_s,
        "gflops_per_image": flops / batch / 1e9 if flops else None,
        "mfu": flops / seconds / peak if flops and peak else None,
        "loss": float(box["metrics"]["train_loss"]),
    }


def jax_mlp(a, k: int = 1) -> dict:
    """The seed MLP's epoch as jaxpar's loop runs it, with `k` steps per dispatch."""
    import jax
    import numpy as np

    from jaxpar.core.mesh import make_mesh, parse_mesh
    from jaxpar.core.optimizers import make_optimizer
    from jaxpar.core.step import compile_steps, create_state
    from jaxpar.data import load_dataset, prefetch, preprocess, train_batches
    from jaxpar.models import MODELS
    from jaxpar.run.loop import dispatches

    ds = load_dataset("synthetic:28x28x1:10")
    mesh = make_mesh(parse_mesh("1"))
    model_fn = partial(MODELS["mlp"], ds.image_shape, ds.num_classes)
    graphdef, state, shardings, _ = create_state(model_fn, make_optimizer(), mesh, seed=0)
    compile = partial(compile_steps, graphdef, shardings, mesh, 0, 4, preprocess(ds))
    one, many = compile()[0], compile(stacked=True)[0]
    per_epoch = len(ds.train_labels) // MLP_BATCH
    times = []
    for epoch in range(1 + a.rounds):  # the first epoch compiles
        start, previous = time.perf_counter(), None
        plan = dispatches(epoch * per_epoch, (epoch + 1) * per_epoch, k)
        for steps, data in zip(plan, prefetch(train_batches(ds, MLP_BATCH, 0, plan, mesh)),
                               strict=True):  # fmt: skip
            state, m = (many if len(steps) > 1 else one)(state, data)
            if previous is not None:
                np.asarray(previous["train_loss"])  # as jaxpar's loop: 2 dispatches in flight
            previous = m
        np.asarray(previous["train_loss"])
        times.append(time.perf_counter() - start)
    jax.block_until_ready(state)
    return {"epoch_s": statistics.median(times[1:]), "first_epoch_s": times[0],
            "steps_per_epoch": per_epoch}  # fmt: skip


def torch_model(a, batch: int, name: str) -> dict:
    """torchvision's `name` (``resnet50``: channels_last; ``vit_b_16``), bf16 autocast, compiled."""
    import torch
    import torchvision

    torch.backends.cudnn.benchmark = True
    if name == "vit_b_16":
        model = torchvision.models.vit_b_16(
            weights=None, num_classes=a.classes, image_size=a.image
        ).to(a.torch_device)
        model, layout = torch.compile(model), torch.contiguous_format
    else:
        model = torchvision.models.resnet50(num_classes=a.classes).to(a.torch_device)
        model = torch.compile(model.to(memory_format=torch.channels_last))
        layout = torch.channels_last
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.randn(batch, 3, a.image, a.image, device=a.torch_device)
    x = x.to(memory_format=layout)
    y = torch.randint(0, a.classes, (batch,), device=a.torch_device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(a.torch_device, dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if a.torch_device == "cuda" else lambda: None
    start = time.perf_counter()
    for _ in range(3):  # compile and warm up
        step()
    sync()
    compile_s = time.perf_counter() - start
    seconds, spread = median_step_s(step, a.rounds, a.steps, sync)
    return {"images_per_s": batch / seconds, "step_ms": seconds * 1e3, "spread": spread,
            "compile_s": compile_s, "torch": torch.__version__}  # fmt: skip


def torch_mlp(a) -> dict:
    """The seed's program: its MLP in nn.DataParallel, a shuffling DataLoader, SGD 0.01/0.9."""
    import numpy as np
    import torch
    from torch import nn

    from jaxpar.data import load_dataset

    ds = load_dataset("synthetic:28x28x1:10")
    rows = np.arange(len(ds.train_labels))
    x = torch.from_numpy(((ds.train_images[rows] / 255.0 - 0.5) / 0.25).astype(np.float32))
    y = torch.from_numpy(ds.train_labels[rows].astype(np.int64))
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(512, 256), nn.PReLU(), nn.Linear(256, 10),
    )  # fmt: skip
    model = nn.DataParallel(net.to(a.torch_device))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x.permute(0, 3, 1, 2), y), batch_size=MLP_BATCH,
        shuffle=True, drop_last=True,
    )  # fmt: skip
    loss_fn, times = nn.CrossEntropyLoss(), []
    for _ in range(1 + a.rounds):  # the first epoch warms up
        start = time.perf_counter()
        for xb, yb in loader:
            opt.zero_grad()
            loss = loss_fn(model(xb.to(a.torch_device)), yb.to(a.torch_device))
            loss.backward()
            opt.step()
        loss.item()
        times.append(time.perf_counter() - start)
    return {"epoch_s": statistics.median(times[1:]), "first_epoch_s": times[0],
            "torch": torch.__version__}  # fmt: skip


def run_part(a) -> dict:
    if a.part.startswith("torch"):
        try:
            import torch

            if a.part in TORCH_MODELS:
                import torchvision  # noqa: F401
        except ImportError as e:
            return {"skipped": f"{e.name} is not installed"}
        a.torch_device = "cuda" if torch.cuda.is_available() else "cpu"
        if a.torch_device == "cpu" and not a.smoke:
            return {"skipped": "PyTorch sees no GPU"}
        if a.part in TORCH_MODELS:
            batch = a.vit_batch if a.part == "torchvision_vit" else a.batch
            return {"batch": batch, **torch_model(a, batch, TORCH_MODELS[a.part])}
        return torch_mlp(a)
    from jaxpar.core.mesh import set_xla_flags

    set_xla_flags()
    import jax

    about = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    if a.part.startswith("mlp"):
        return {**about, **jax_mlp(a, 8 if a.part == "mlp_k8" else 1)}
    if a.part.startswith("vit"):  # vit_xla: attention as plain XLA einsums, not cuDNN's
        batch, attention = a.vit_batch, "xla" if a.part == "vit_xla" else "auto"
        options = dict(patch_size=16, attention=attention)
        if a.part == "vit_pipeline":
            from jaxpar.modes.pipeline import Schedule

            options["stack"] = Schedule(stages=1, microbatches=a.pipeline_microbatches)
        return {**about, "batch": batch, **jax_model(a, "vit-base", batch, **options)}
    batch = a.batch * (2 if a.part == "resnet50_batch_x2" else 1)
    bn_fp32 = a.part == "resnet50_bn_fp32"
    return {**about, "batch": batch, **jax_model(a, "resnet50", batch, bn_fp32)}


def table(results: dict, batch: int, vit_batch: int) -> str:
    def line(name, r, unit="images/s"):
        if "error" in r or "skipped" in r:
            return f"{name:<34} {r.get('skipped') or r['error']}"
        if "epoch_s" in r:
            first = r["first_epoch_s"]
            return f"{name:<34} {r['epoch_s']:8.2f} s/epoch  (first epoch {first:.1f} s)"
        mfu = f"  MFU {r['mfu']:.1%}" if r.get("mfu") else ""
        return (f"{name:<34} {r['images_per_s']:8.0f} {unit}  step {r['step_ms']:.1f} ms "
                f"(spread {r['spread']:.3f}){mfu}  compile {r['compile_s']:.0f} s")  # fmt: skip

    names = {
        "resnet50": f"jaxpar ResNet-50 bf16, batch {batch}",
        "torchvision": f"torchvision ResNet-50 bf16, batch {batch}",
        "vit": f"jaxpar ViT-B/16 bf16, batch {vit_batch}",
        "vit_xla": f"jaxpar ViT-B/16, XLA attention, {vit_batch}",
        "torchvision_vit": f"torchvision ViT-B/16 bf16, batch {vit_batch}",
        "mlp": "jaxpar seed MLP, 50k rows",
        "mlp_k8": "jaxpar seed MLP, 8 steps/dispatch",
        "torch_mlp": "PyTorch seed program, 50k rows",
        "resnet50_bn_fp32": "jaxpar ResNet-50, fp32 BN outputs",
        "resnet50_batch_x2": f"jaxpar ResNet-50 bf16, batch {2 * batch}",
        "vit_pipeline": f"jaxpar ViT-B/16 bf16, {vit_batch}, pipelined",
    }
    results = dict(results)
    for torch_part, jax_part in (("torchvision", "resnet50"), ("torchvision_vit", "vit")):
        j, t = results.get(jax_part, {}), results.get(torch_part, {})
        if j.get("mfu") and "images_per_s" in t:  # the same network: jaxpar's FLOP count
            results[torch_part] = {**t, "mfu": j["mfu"] * t["images_per_s"] / j["images_per_s"]}
    out = [line(names[p], r) for p, r in results.items()]
    for text, a, b, key in [
        ("jaxpar / torchvision ResNet-50 images/s", "resnet50", "torchvision", "images_per_s"),
        ("jaxpar / torchvision ViT-B/16 images/s", "vit", "torchvision_vit", "images_per_s"),
        ("bf16 / fp32 BatchNorm outputs images/s", "resnet50", "resnet50_bn_fp32", "images_per_s"),
        ("seed MLP epoch time, PyTorch / jaxpar", "torch_mlp", "mlp", "epoch_s"),
        ("seed MLP epoch time, 1 / 8 steps per dispatch", "mlp", "mlp_k8", "epoch_s"),
        ("ViT-B/16 images/s, 1-stage pipeline / plain", "vit_pipeline", "vit", "images_per_s"),
    ]:
        if key in results.get(a, {}) and key in results.get(b, {}):
            out.append(f"{text}: {results[a][key] / results[b][key]:.2f}x")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--vit-batch", type=int, default=128, help="batch of the ViT parts")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--deadline", type=float, default=420, help="seconds for all parts")
    parser.add_argument("--out", help="also write the JSON here, and the parts' output to OUT.log")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the code anywhere")
    parser.add_argument("--pipeline-microbatches", type=int, default=4,
                        help="microbatches of the vit_pipeline part")  # fmt: skip
    parser.add_argument("--part", help=argparse.SUPPRESS)  # run one part in this process
    a = parser.parse_args()
    a.image, a.classes = 224, 1000
    if a.smoke:
        a.image, a.classes, a.batch, a.vit_batch, a.steps, a.rounds = 32, 10, 8, 8, 2, 2
    if a.part:
        print("RESULT " + json.dumps(run_part(a)), flush=True)
        return
    parts = a.parts.split(",")
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    end, results = time.monotonic() + a.deadline, {}
    for part in parts:
        left = end - time.monotonic()
        if left < 20:
            results[part] = {"skipped": "no time left before --deadline"}
            continue
        cmd = [sys.executable, __file__, *sys.argv[1:], "--part", part]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
            lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            results[part] = json.loads(lines[-1][7:]) if lines else {
                "error": f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1:]}"}  # fmt: skip
            if a.out:  # each part's own output, for when something goes wrong
                with open(a.out + ".log", "a") as f:
                    f.write(f"== {part}: exit {p.returncode}\n{p.stdout}{p.stderr}\n")
        except subprocess.TimeoutExpired:
            results[part] = {"error": f"still running at --deadline ({a.deadline:.0f} s)"}
        print(f"[gpu] {part}: {json.dumps(results[part])}", flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(results, f, indent=1)
    print(table(results, a.batch, a.vit_batch))
    print(json.dumps({"benchmark": "gpu", "batch": a.batch, "vit_batch": a.vit_batch,
                      "results": results}))  # fmt: skip


if __name__ == "__main__":
    main()
