"""The GPU benchmark: ResNet-50 in bf16, the seed's MLP epoch, and torchvision's ResNet-50.

Meant for one GPU with JAX, Flax, Optax and Orbax installed and no network (install jaxpar with
``pip install --no-deps -e .``); it needs neither tensorflow-datasets nor TensorBoard. In one run:

1. jaxpar ResNet-50, ``--precision bf16``, synthetic ImageNet-size data (224x224x3, 1000 classes),
   SGD with momentum: images/s over timed steps on one pre-built device batch, and model FLOPs
   utilisation = XLA's cost-analysis FLOPs per step / step time / the card's peak bf16 FLOP/s.
2. jaxpar's MLP (the seed's) for one epoch of MNIST-size synthetic data (50,000 rows, batch 128),
   through jaxpar's input pipeline: seconds per epoch, compilation excluded.
3. torchvision's ResNet-50 with bf16 autocast, channels_last and ``torch.compile``, same batch
   and optimizer: images/s, if PyTorch and torchvision are installed.

    python benchmarks/gpu.py                         # defaults for one H100 (batch 256)
    python benchmarks/gpu.py --smoke                 # tiny sizes, any machine: checks the code
"""

import argparse
import json
import time
from functools import partial

import jax

from jaxpar.data import load_dataset, prefetch, preprocess, train_batches
from jaxpar.mesh import make_mesh, parse_mesh, set_gpu_flags
from jaxpar.step import compile_steps, create_state, make_optimizer
from models import MODELS

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s, vendor specs


def peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_BF16.items() if k in kind), None)


def timed_steps(step, state, batch, steps: int):
    state, m = step(state, batch)  # compile and warm up
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, batch)
    jax.block_until_ready((state, m))
    return state, (time.perf_counter() - start) / steps


def jax_resnet50(image: int, classes: int, batch: int, steps: int) -> dict:
    ds = load_dataset(f"synthetic:{image}x{image}x3:{classes}")
    mesh = make_mesh(parse_mesh("1"))
    model_fn = partial(MODELS["resnet50"], ds.image_shape, ds.num_classes, dtype=jax.numpy.bfloat16)
    graphdef, state, shardings, _ = create_state(model_fn, make_optimizer(lr=0.1), mesh, seed=0)
    step, _ = compile_steps(graphdef, shardings, mesh, 0, 4, preprocess(ds))
    data = next(train_batches(ds, batch, 0, range(1), mesh))
    start = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - start
    flops = (compiled.cost_analysis() or {}).get("flops")
    state, seconds = timed_steps(compiled, state, data, steps)  # the program compiled above
    peak = peak_flops()
    return {
        "images_per_s": batch / seconds,
        "step_ms": seconds * 1e3,
        "compile_s": compile_s,
        "flops_per_step": flops,
        "mfu": flops / seconds / peak if flops and peak else None,
    }


def jax_mlp_epoch(batch: int = 128) -> dict:
    ds = load_dataset("synthetic:28x28x1:10")
    mesh = make_mesh(parse_mesh("1"))
    model_fn = partial(MODELS["mlp"], ds.image_shape, ds.num_classes)
    graphdef, state, shardings, _ = create_state(model_fn, make_optimizer(), mesh, seed=0)
    step, _ = compile_steps(graphdef, shardings, mesh, 0, 4, preprocess(ds))
    per_epoch = len(ds.train_labels) // batch
    times = []
    for epoch in range(2):  # the first epoch compiles
        start, previous = time.perf_counter(), None
        steps = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        for data in prefetch(train_batches(ds, batch, 0, steps, mesh)):
            state, m = step(state, data)
            if previous is not None:
                float(previous["train_loss"])  # as jaxpar's loop: at most 2 steps in flight
            previous = m
        float(previous["train_loss"])
        times.append(time.perf_counter() - start)
    return {"epoch_s": times[1], "first_epoch_s": times[0], "steps_per_epoch": per_epoch}


def torch_resnet50(image: int, classes: int, batch: int, steps: int) -> dict:
    try:
        import torch
        import torchvision
    except ImportError as e:
        return {"skipped": f"{e.name} is not installed"}
    if not torch.cuda.is_available():
        return {"skipped": "PyTorch sees no GPU"}
    model = torchvision.models.resnet50(num_classes=classes).cuda()
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.randn(batch, 3, image, image, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    step = torch.compile(step)
    start = time.perf_counter()
    for _ in range(3):  # compile and warm up
        step()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    return {"images_per_s": batch / seconds, "step_ms": seconds * 1e3, "compile_s": compile_s,
            "torch": torch.__version__}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the code anywhere")
    args = parser.parse_args()
    image, classes, batch, steps = (224, 1000, args.batch, args.steps)
    if args.smoke:
        image, classes, batch, steps = 32, 10, 8, 2
    device = jax.devices()[0]
    results = {
        "device": device.device_kind,
        "jax": jax.__version__,
        "batch": batch,
        "image": image,
        "jaxpar_resnet50_bf16": jax_resnet50(image, classes, batch, steps),
        "jaxpar_mlp_epoch": jax_mlp_epoch(),
        "torchvision_resnet50_bf16": torch_resnet50(image, classes, batch, steps),
    }
    ours, theirs = results["jaxpar_resnet50_bf16"], results["torchvision_resnet50_bf16"]
    print(f"device {results['device']}, jax {results['jax']}, batch {batch}, {image}px")
    mfu = f", MFU {ours['mfu']:.1%}" if ours["mfu"] else ""
    print(f"jaxpar ResNet-50 bf16: {ours['images_per_s']:.0f} images/s{mfu}")
    if "images_per_s" in theirs:
        print(f"torchvision ResNet-50 bf16 (torch.compile): {theirs['images_per_s']:.0f} images/s")
    else:
        print(f"torchvision ResNet-50: {theirs['skipped']}")
    print(f"seed MLP, one epoch of 50,000 rows: {results['jaxpar_mlp_epoch']['epoch_s']:.2f} s")
    print(json.dumps({"benchmark": "gpu", **results}, default=float))


if __name__ == "__main__":
    set_gpu_flags()
    main()
