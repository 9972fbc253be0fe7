"""Importing PyTorch weights: seconds to import, and logits against PyTorch's own forward pass.

ResNet-50 and ViT-B/16 at 224x224 with random weights (BatchNorm statistics random too, so a
swapped or dropped tensor shows), written as .safetensors, imported with `jaxpar.tools.weights`
(read, convert, write an Orbax checkpoint), then restored by `jaxpar.tools.predict` and compared
with PyTorch's logits for the same float32 images. The networks are torchvision's own
(``torchvision.models.resnet50``, ``vit_b_16``) when torchvision imports, else the test suite's
torchvision-structured references (`tests/torch_reference.py`). Needs PyTorch.

    python benchmarks/import_weights.py
    python benchmarks/import_weights.py --batch 4 --models resnet50
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))  # pgx installs a `tests`
import torch_reference as ref  # noqa: E402

from jaxpar.tools.predict import predict  # noqa: E402
from jaxpar.tools.weights import import_weights  # noqa: E402


def network(name: str):
    """``(torch module, where it comes from)`` with random weights, in evaluation mode."""
    try:
        import torchvision

        net = {"resnet50": torchvision.models.resnet50, "vit-base": torchvision.models.vit_b_16}
        return ref.randomize(
            net[name](weights=None), seed=0
        ), f"torchvision {torchvision.__version__}"
    except ImportError:
        if name == "resnet50":
            return ref.randomize(ref.resnet("resnet50", 1000), seed=0), "tests/torch_reference.py"
        vit = ref.ViT(224, 16, 768, 12, 12, 3072, 1000)
        return ref.randomize(vit, seed=0), "tests/torch_reference.py"


def measure(name: str, batch: int, root: Path) -> dict:
    net, source = network(name)
    file = root / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, file)
    start = time.perf_counter()
    import_weights(file, name, root / name, (224, 224, 3))
    seconds = time.perf_counter() - start
    x = np.random.default_rng(0).normal(size=(batch, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    got = predict(root / name, x)
    return {
        "model": name,
        "pytorch_network": source,
        "file_mb": round(file.stat().st_size / 1e6, 1),
        "import_s": round(seconds, 2),
        "max_abs_diff": float(np.abs(got - expected).max()),
        "max_abs_logit": float(np.abs(expected).max()),
        "top1_agree": float((got.argmax(-1) == expected.argmax(-1)).mean()),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit-base"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(m, args.batch, Path(tmp)) for m in args.models]
    header = ("model", "network", "MB", "import s", "max |diff|", "max |logit|")
    print("{:10} {:28} {:>6} {:>9} {:>11} {:>12}".format(*header))
    for r in rows:
        print(f"{r['model']:10} {r['pytorch_network']:28} {r['file_mb']:6.1f} {r['import_s']:9.2f} "
              f"{r['max_abs_diff']:11.2e} {r['max_abs_logit']:12.2f}")  # fmt: skip
    print(json.dumps({"benchmark": "import_weights", "batch": args.batch, "rows": rows}))


if __name__ == "__main__":
    main()
