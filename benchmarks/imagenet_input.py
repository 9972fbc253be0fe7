"""Host throughput of jaxpar's ImageNet input: read, JPEG decode and crop, images per second.

No ImageNet here, so the script makes ImageNet-like JPEGs (500x375, smooth colour fields with
noise, about the size and compressibility of real photos: see the printed mean bytes) and serves
them from memory through a source that decodes as tensorflow-datasets does (PIL). It times, in
the same process and alternating rounds: decoding alone (the baseline), and `jaxpar.imagenet`'s
training read (decode, random-resized crop, flip) and evaluation read (decode, central crop),
with 1 thread and with one thread per core. Divide a GPU's images/s by the per-core figure for
the cores a host needs to keep it fed.

    python benchmarks/imagenet_input.py              # 256 images, 3 rounds
"""

import argparse
import io
import json
import os
import time

import numpy as np
from PIL import Image

from jaxpar.imagenet import Records


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
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
    meta = {
        "cores": cores,
        "images": args.images,
        "mean_jpeg_bytes": float(np.mean([len(b) for b in blobs])),
    }
    print(json.dumps({"benchmark": "imagenet_input", **meta, "images_per_s": results}))


if __name__ == "__main__":
    main()
