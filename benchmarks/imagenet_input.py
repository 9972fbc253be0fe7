"""Host throughput of jaxpar's ImageNet input: read, JPEG decode and crop, images per second.

No ImageNet here, so the script makes ImageNet-like JPEGs (500x375, smooth colour fields with
noise, about the size and compressibility of real photos: see the printed mean bytes) and serves
them from memory through a source that decodes as tensorflow-datasets does (PIL). It times, in
the same process and alternating rounds: decoding alone (the baseline), and `jaxpar.data.imagenet`'s
training read (decode, random-resized crop, flip) and evaluation read (decode, central crop),
with 1 thread and with one thread per core. Divide a GPU's images/s by the per-core figure for
the cores a host needs to keep it fed.

Then the training input as the loop reads it (`jaxpar.data.train_batches`: rows of (seed, step),
decode, crop, flip, onto the device) with ``--data-workers`` 1, 2 and N grain worker
processes (N: this machine's cores), and in this process (``--data-workers 0``) with one thread
and with one per core (the default): crops/s in the steady state (start-up and the workers'
read-ahead excluded), alternating rounds; the ratios are against 1 worker. Alongside, the
machine's own ceiling: the same decode-and-crop work in 1 and in 2
independent processes (no jaxpar, no grain), since a virtual machine's cores may not scale.

    python benchmarks/imagenet_input.py              # 256 images, 3 rounds
    python benchmarks/imagenet_input.py --steps 40 --batch 32
"""

import argparse
import io
import json
import multiprocessing
import os
import time

import jax
import numpy as np
from PIL import Image

from jaxpar.core.mesh import make_mesh, parse_mesh
from jaxpar.data import Dataset, train_batches
from jaxpar.data.imagenet import Records, random_resized_crop


def photo_like(rng, h=375, w=500) -> bytes:
    """A JPEG of smooth colour fields with some noise: compresses like a photograph."""
    coarse = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), np.uint8)
    image = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
    noisy = np.asarray(image, np.int16) + rng.integers(-12, 12, (h, w, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


class JpegSource:
    """Records as tfds hands them out: decoded on access."""

    def __init__(self, blobs):
        self.blobs = blobs

    def __len__(self):
        return len(self.blobs)

    def __getitem__(self, i):
        with Image.open(io.BytesIO(self.blobs[i])) as image:
            return {"image": np.asarray(image.convert("RGB")), "label": i % 1000}


def images_per_s(fn, n) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def crop_all(blobs) -> float:
    """Decode and crop `blobs` in this process, crops/s (the ceiling's work)."""
    source, rng = JpegSource(blobs), np.random.default_rng(0)
    start = time.perf_counter()
    for i in range(len(blobs)):
        random_resized_crop(source[i]["image"], rng)
    return len(blobs) / (time.perf_counter() - start)


def ceiling(blobs, pool) -> dict:
    """Crops/s of 1 process, and of 2 independent processes together (same work each)."""
    one = pool.map(crop_all, [blobs])[0]
    start = time.perf_counter()
    pool.map(crop_all, [blobs, blobs])
    return {"1": one, "2": 2 * len(blobs) / (time.perf_counter() - start)}


def crops_per_s(source, workers, batch, steps, threads=1) -> float:
    """Training crops/s through `train_batches` with `workers` processes (0: this process, with
    `threads` decoding threads), in the steady state: timed over `steps` batches between two
    marks at which the workers' buffers are equally full (after start-up, before the end)."""
    records = Records(source, threads)
    ds = Dataset("jpegs", records.images, records.labels, records.images, records.labels, 1000)
    skip, mesh = 2 * workers + 2, make_mesh(parse_mesh("1"))
    batches = train_batches(ds, batch, 0, range(skip + steps + 4 * workers), mesh, workers)
    for _ in range(skip):
        jax.block_until_ready(next(batches))
    start = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(next(batches))
    seconds = time.perf_counter() - start
    batches.close()  # stops the workers
    return steps * batch / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="global batch of the worker runs")
    parser.add_argument("--steps", type=int, default=30, help="timed batches per worker run")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    blobs = [photo_like(rng) for _ in range(args.images)]
    source, rows = JpegSource(blobs), np.arange(args.images)
    seeds = np.stack([np.zeros(args.images, int), rows], -1)
    cores = os.cpu_count() or 1
    results = {}
    for threads in sorted({1, cores}):
        records = Records(source, threads)
        cases = {
            "decode only": lambda r=records: list(r.pool.map(source.__getitem__, rows.tolist())),
            "train read (crop+flip)": lambda r=records: r.read_images(rows, seeds),
            "eval read (center crop)": lambda r=records: r.read_images(rows),
        }
        times = {name: [] for name in cases}
        for i in range(args.rounds):
            for name in sorted(cases, reverse=i % 2 == 1):
                times[name].append(images_per_s(cases[name], args.images))
        results[threads] = {name: float(np.median(t)) for name, t in times.items()}
    print(f"mean JPEG {np.mean([len(b) for b in blobs]) / 1e3:.0f} kB, 500x375, {cores} cores")
    print(f"{'':>24} " + " ".join(f"{f'{t} thread(s)':>12}" for t in results))
    for name in results[1]:
        print(f"{name:>24} " + " ".join(f"{r[name]:>12.0f}" for r in results.values()))
    base = results[1]["decode only"]
    print(f"train read / decode alone, 1 thread: {results[1]['train read (crop+flip)'] / base:.2f}")
    cases = {  # name: (workers, threads in this process)
        "this process, 1 thread": (0, 1),
        f"this process, {cores} threads (default)": (0, cores),
        **{f"{w} worker process(es)": (w, 1) for w in sorted({1, 2, cores})},
    }
    runs, ceilings = {name: [] for name in cases}, []
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        for i in range(args.rounds):
            ceilings.append(ceiling(blobs, pool))
            for name in sorted(cases, reverse=i % 2 == 1):
                w, threads = cases[name]
                runs[name].append(crops_per_s(source, w, args.batch, args.steps, threads))
    workers = {name: float(np.median(r)) for name, r in runs.items()}
    machine = {k: float(np.median([c[k] for c in ceilings])) for k in ("1", "2")}
    print(f"training crops/s through train_batches (batch {args.batch}, {args.steps} batches):")
    one = workers["1 worker process(es)"]
    for name, rate in workers.items():
        print(f"{name:>34} {rate:>8.0f}  x{rate / one:.2f} of 1 worker")
    print(f"machine ceiling: 2 independent processes crop {machine['2']:.0f}/s, "
          f"x{machine['2'] / machine['1']:.2f} of one ({machine['1']:.0f}/s)")  # fmt: skip
    meta = {
        "cores": cores,
        "images": args.images,
        "mean_jpeg_bytes": float(np.mean([len(b) for b in blobs])),
        "batch": args.batch,
        "steps": args.steps,
    }
    print(json.dumps({"benchmark": "imagenet_input", **meta, "images_per_s": results,
                      "crops_per_s": workers, "runs": runs,
                      "ceiling": machine, "ceilings": ceilings}))  # fmt: skip


if __name__ == "__main__":
    main()
