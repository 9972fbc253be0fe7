"""How far `--project` is from what one GPU measured (issue #17, item 4).

For each measured case, the projection `python train.py --dry-run --project CHIP` computes on this
CPU beside the images/s the GPU benchmarks recorded (`benchmarks/RESULTS.md`: `gpu.py` and
`gpu_profile.py` runs, on one H100 and one H200), and the ratio projected / measured.

    python benchmarks/projection.py
    python benchmarks/projection.py --cases resnet50-b256-h200
"""

import argparse
import statistics
import time

# case: (model, batch, chip, measured images/s, where it was measured)
MEASURED = {
    "resnet50-b256-h200": ("resnet50", 256, "h200", [6764, 6786, 6862, 6820],
                           "gpu.py runs 1-3 (2026-11-26), gpu_profile.py (2026-11-27)"),
    "resnet50-b128-h200": ("resnet50", 128, "h200", [6014], "gpu_profile.py (2026-11-27)"),
    "resnet50-b512-h200": ("resnet50", 512, "h200", [7128, 7115, 7301],
                           "gpu.py runs 1-3 (2026-11-26)"),
    "resnet18-b256-h200": ("resnet18", 256, "h200", [17473], "gpu_profile.py (2026-11-27)"),
    "resnet50-b256-h100": ("resnet50", 256, "h100", [5628], "gpu.py run 1 (2026-11-27)"),
    "vit-base-b128-h100": ("vit-base", 128, "h100", [1509, 1513, 1511],
                           "gpu.py runs 1-3 (2026-11-27), XLA attention as projected"),
    "vit-base-b128-h200-cudnn": ("vit-base", 128, "h200", [2388],
                                 "gpu_profile.py (2026-11-27), cuDNN attention: the projection "
                                 "counts XLA's"),
    # the dispatch floor (`jaxpar.cost.projection.DISPATCH_S`) is this point's step: taken from it,
    # not a check
    "mlp-b128-h200-fitted": ("mlp", 128, "h200", [round(128 * 390 / 0.2218)],
                             "gpu.py run 1 (2026-11-26): 390 steps in 0.2218 s"),
}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(MEASURED))
    a = parser.parse_args()
    from jaxpar.run.config import Config
    from jaxpar.tools.plan import plan

    rows = []
    for case in a.cases.split(","):
        model, batch, chip, measured, where = MEASURED[case]
        extra = {"patch_size": 16} if model.startswith("vit") else {}
        data = "synthetic:28x28x1:10" if model == "mlp" else "synthetic:224x224x3:1000"
        cfg = Config.of(model=model, dataset=data, batch_size=batch,
                     precision="bf16", dry_run=True, project=f"{chip}x1", **extra)  # fmt: skip
        start = time.perf_counter()
        q = plan(cfg.validate())["projection"]
        m = statistics.median(measured)
        rows.append((case, q["images_per_s"] / m, time.perf_counter() - start))
        print(
            f"{case:26} projected {q['images_per_s']:7,.0f} measured {m:7,.0f} "
            f"({q['images_per_s'] / m - 1:+.0%})  compute {q['compute_s'] * 1e3:.1f} ms + "
            f"memory {q['memory_s'] * 1e3:.1f} ms + launch {q['launch_s'] * 1e3:.1f} ms, "
            f"{q['bound']}-bound  [{where}]",
            flush=True,
        )
    errors = [abs(r[1] - 1) for r in rows]
    print(
        f"median |projected/measured - 1| {statistics.median(errors):.0%}, "
        f"largest {max(errors):.0%}"
    )


if __name__ == "__main__":
    main()
