"""Per-device memory and collectives of each sharding strategy, from XLA's compiled step.

For each model and strategy on 8 (emulated) devices, `jaxpar.tools.plan` compiles the train step on
abstract shapes. Reported: parameter + optimizer bytes per device against data parallel (ZeRO
accounting: DP keeps everything on every device, FSDP should keep 1/N), the compiled peak, and the
collectives with the summed sizes of their results. Result sizes are not wire bytes (a ring
all-reduce sends about twice its size), so compare kinds and counts, and sizes within a kind.

    python benchmarks/sharding_costs.py
    python benchmarks/sharding_costs.py --models mlp --devices 4
"""

import argparse
import json

import jax

from jaxpar import Config, request_devices

STRATEGIES = {"dp": "data={n}", "fsdp": "fsdp={n}", "tp": "model={n}", "dp_tp": "data={h},model=2",
              "fsdp_tp": "fsdp={h},model=2"}  # fmt: skip
MODELS = {"mlp": ("digits", 128), "resnet18": ("synthetic:32x32x3:10", 64)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    request_devices(args.devices)
    from jaxpar.tools.plan import plan  # after the device count is set

    rows = []
    for model in args.models:
        dataset, batch = MODELS[model]
        base = None
        for name, mesh in STRATEGIES.items():
            mesh = mesh.format(n=args.devices, h=args.devices // 2)
            p = plan(Config.of(model=model, dataset=dataset, batch_size=batch, mesh=mesh))
            d = p["per_device"]
            state = d["params"] + d["optimizer"]
            base = base or state
            comm = {k: v["bytes"] for k, v in p["collectives"].items()}
            rows.append({
                "model": model, "strategy": name, "mesh": mesh, "state_bytes": state,
                "state_vs_dp": round(state / base, 4), "peak_bytes": d["compiled_peak"],
                "collective_result_bytes": comm,
                "collective_counts": {k: v["count"] for k, v in p["collectives"].items()},
            })  # fmt: skip
    print(
        f"{'model':>9} {'strategy':>8} {'state MiB':>10} {'vs DP':>7} {'peak MiB':>9}  collectives"
    )
    for r in rows:
        comm = ", ".join(
            f"{k} x{r['collective_counts'][k]} {v / 2**20:.2f} MiB"
            for k, v in r["collective_result_bytes"].items()
        )
        print(
            f"{r['model']:>9} {r['strategy']:>8} {r['state_bytes'] / 2**20:>10.3f} "
            f"{r['state_vs_dp']:>7.3f} {r['peak_bytes'] / 2**20:>9.2f}  {comm}"
        )
    meta = {"jax": jax.__version__, "devices": args.devices, "platform": jax.default_backend()}
    print(json.dumps({"benchmark": "sharding_costs", **meta, "rows": rows}))


if __name__ == "__main__":
    main()
