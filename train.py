"""Train a Flax model over a device mesh: ``python train.py --mesh 2x2``.

A thin CLI: flags -> `jaxpar.Config` -> `jaxpar.train`. Mistakes in the flags exit with status 2
and one line on stderr; see ``--help`` for every flag and its default.
"""

import argparse
import sys

from jaxpar.config import Config
from jaxpar.errors import UserError
from jaxpar.mesh import parse_mesh, request_devices


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2 (argparse would also print the usage)
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv) -> Config:
    d = Config()
    p = Parser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument(
        "--mesh",
        default=d.mesh,
        help="DxM, N, data=2,fsdp=2,model=2, or a layout "
        "from meshes/ (default: every device on data)",
    )
    p.add_argument("--model", default=d.model, help="mlp, resnet8, resnet18, resnet34, resnet50")
    p.add_argument("--dataset", default=d.dataset, help="dataset name")
    p.add_argument("--data-dir", default=d.data_dir, help="directory of the dataset's files")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training set")
    p.add_argument(
        "--steps", type=int, default=d.steps, help="optimizer steps (overrides --epochs)"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size")
    p.add_argument("--optimizer", default=d.optimizer, choices=["sgd", "adamw"])
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--schedule", default=d.schedule, choices=["constant", "cosine"])
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workdir", default=d.workdir, help="where the run writes (default: runs/DATE)")
    p.add_argument("--precision", default=d.precision, choices=["fp32", "bf16"])
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=d.checkpoint_every,
        help="steps between checkpoints (0: at the end only)",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=d.eval_every,
        help="steps between evaluations (0: every epoch)",
    )
    p.add_argument(
        "--log-every", type=int, default=d.log_every, help="steps per metrics.jsonl training line"
    )
    return Config(**vars(p.parse_args(argv)))


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv).validate()
        # Before JAX starts: emulate as many CPU devices as the mesh needs (ignored on GPUs).
        request_devices(parse_mesh(cfg.mesh).size if cfg.mesh else 1)
        from jaxpar.loop import train

        train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
