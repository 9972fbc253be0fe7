"""Compression (issue #15): what int8, bf16 and 90% pruning cost in accuracy and save in bytes and
time, for the seed's MLP and a ResNet-18 trained on the digits, all in this process.

Each model trains (the MLP as the seed: 30 epochs, SGD 0.01; the ResNet-18 with ``--lr 0.05``),
then ``python -m jaxpar.compress`` measures float32, int8, int8-act and bf16, and for the MLP
90% one-shot pruning followed by ``--finetune-epochs`` epochs. Eval images/s are measured one
variant after another in the same process (this machine is shared and noisy: compare within a
run).

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
from jaxpar import compress  # noqa: E402

FLAGS = {"mlp": [], "resnet18": ["--model", "resnet18", "--lr", "0.05"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(FLAGS), choices=list(FLAGS))
    parser.add_argument("--finetune-epochs", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--epochs", type=int, default=30)
    a = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in a.models:
            workdir = Path(tmp) / model
            assert (
                cli.main([*FLAGS[model], "--epochs", str(a.epochs), "--workdir", str(workdir)]) == 0
            )
            assert compress.main([str(workdir), "--quantize", "int8", "--activations", "int8"]) == 0
            assert compress.main([str(workdir), "--quantize", "bf16"]) == 0
            if model == "mlp":
                for n in a.finetune_epochs:
                    flags = ["--prune", "0.9", "--finetune-epochs", str(n)]
                    assert compress.main([str(workdir), *flags]) == 0
                    saved = json.loads((workdir / "compress.json").read_text())
                    results[f"{model} pruned, {n} epochs"] = saved["variants"][-1]
                    (workdir / "compress" / "pruned-0.90").rename(workdir / f"pruned-{n}")
            results[model] = json.loads((workdir / "compress.json").read_text())["variants"]
    for model, variants in results.items():
        if isinstance(variants, list):
            print(f"\n{model}\n{compress.table(variants)}")
    print(json.dumps({"benchmark": "compress", "results": results}))


if __name__ == "__main__":
    main()
