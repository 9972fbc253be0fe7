"""Compression (issue #15): what int8, bf16 and 90% pruning cost in accuracy and save in bytes and
time, for the seed's MLP and a ResNet-18 trained on the digits, all in this process.

Each model trains (the MLP as the seed: 30 epochs, SGD 0.01; the ResNet-18 with ``--lr 0.05``),
then one ``python -m jaxpar.compress`` call measures float32, int8, int8-act and bf16 one
after another (their speeds compare: this machine is shared and noisy), and for the MLP further
calls 90% one-shot pruning followed by each ``--finetune-epochs``.

    python benchmarks/compress.py
    python benchmarks/compress.py --models mlp --finetune-epochs 5 10
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train.py is not installed
import train as cli  # noqa: E402
from jaxpar.tools import compress  # noqa: E402

FLAGS = {"mlp": [], "resnet18": ["--model", "resnet18", "--lr", "0.05"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(FLAGS), choices=list(FLAGS))
    parser.add_argument("--finetune-epochs", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--time", type=float, default=3.0, help="seconds timing each variant")
    a = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in a.models:
            workdir = Path(tmp) / model
            assert (
                cli.main([*FLAGS[model], "--epochs", str(a.epochs), "--workdir", str(workdir)]) == 0
            )
            # float32, int8, int8-act and bf16 timed one after another in one call
            flags = ["--quantize", "int8,bf16", "--activations", "int8", "--time", str(a.time)]
            assert compress.main([str(workdir), *flags]) == 0
            results[model] = json.loads((workdir / "compress.json").read_text())["variants"]
            if model == "mlp":
                for n in a.finetune_epochs:
                    flags = ["--prune", "0.9", "--finetune-epochs", str(n), "--time", str(a.time)]
                    assert compress.main([str(workdir), *flags]) == 0
                    saved = json.loads((workdir / "compress.json").read_text())
                    results[f"{model} pruned, {n} epochs"] = saved["variants"][-1]
    for name, r in results.items():
        if isinstance(r, list):
            print(f"\n{name}\n{compress.table(r)}")
        else:
            print(f"\n{name}: test accuracy {r['test_accuracy_before_finetune']:.4f} pruned, "
                  f"{r['test_accuracy']:.4f} fine-tuned; {r['nonzero_params']:,} nonzero, "
                  f"{r['sparse_bytes']:,} bytes as sparse")  # fmt: skip
    print(json.dumps({"benchmark": "compress", "results": results}))


if __name__ == "__main__":
    main()
