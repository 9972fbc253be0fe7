"""Loss and accuracy curves of one or several workdirs on one figure.

python -m jaxpar.plot runs/a runs/b s3://bucket/runs/c -o curves.png
"""

import argparse
import contextlib
import json
import sys
from pathlib import Path

from jaxpar.core.errors import UserError
from jaxpar.run.storage import readable


def read(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{workdir} has no metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def plot(workdirs: list[Path], output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for i, workdir in enumerate(workdirs):
        lines, color = read(workdir), f"C{i}"  # one colour per run
        for key, ax, style in (("train_loss", loss_ax, "-"), ("eval_loss", loss_ax, "--")):
            points = [(x["step"], x[key]) for x in lines if key in x]
            if points:
                ax.plot(
                    *zip(*points, strict=True), style, color=color, label=f"{workdir.name} {key}"
                )
        points = [(x["step"], x["eval_accuracy"]) for x in lines if "eval_accuracy" in x]
        if points:
            acc_ax.plot(*zip(*points, strict=True), color=color, label=workdir.name)
    loss_ax.set(xlabel="step", ylabel="loss", yscale="log", title="loss")
    acc_ax.set(xlabel="step", ylabel="accuracy", title="test accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxpar.plot", description="Plot loss and accuracy of jaxpar workdirs."
    )
    parser.add_argument("workdirs", nargs="+", help="folders, or s3:// and gs:// URLs")
    parser.add_argument("-o", "--output", type=Path, default=Path("curves.png"))
    args = parser.parse_args(argv)
    try:
        with contextlib.ExitStack() as stack:  # a URL's run files copied from the store
            folders = [stack.enter_context(readable(w, "workdir", items=())) for w in args.workdirs]
            plot(folders, args.output)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError:
        print("error: plotting needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
