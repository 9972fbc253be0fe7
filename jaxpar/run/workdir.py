"""The workdir: what a run writes, how a used one is recognised, resumed or moved aside.

Nothing a run wrote is deleted: starting over (``--restart``) moves the old files into
``previous-<date-time>/``, and metrics lines past a resumed checkpoint go to
``metrics.rewound.jsonl`` before the steps are trained again.
"""

import json
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxpar.core.errors import UserError
from jaxpar.run.config import Config

RUN_FILES = (
    "config.json",
    "config.before-step-*.json",
    "metrics.jsonl",
    "metrics.rewound.jsonl",
    "skipped.jsonl",  # --skip-spikes: the skipped steps' lines of metrics.jsonl
    "checkpoints",
    "events",
    "profile",
    "partition.json",  # a federated run's clients
    "compress.json",  # python -m jaxpar.compress
    "compress",
)


def resolve(cfg: Config) -> Path:
    """The run's workdir: ``--workdir``, else a new ``runs/DATE-TIME`` that process 0 names for
    the whole job (processes start at different times; one run must go to one folder)."""
    workdir = Path(cfg.checkpoint.workdir or default_workdir())
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir} is a file; name a directory")
    return workdir


def default_workdir() -> str:
    name = time.strftime("runs/%Y%m%d-%H%M%S")
    for n in range(2, 1000):  # two runs started in the same second get two folders
        if not Path(name).exists():
            break
        name = time.strftime(f"runs/%Y%m%d-%H%M%S-{n}")
    if jax.process_count() == 1:
        return name
    # Process 0's choice, sent to all: a fixed-size byte array through one collective.
    data = np.zeros(256, np.uint8)
    data[: len(name)] = np.frombuffer(name.encode(), np.uint8)
    return bytes(multihost_utils.broadcast_one_to_all(data)).rstrip(b"\0").decode()


def used(workdir: Path) -> list[str]:
    """The names of the run files in `workdir` (the patterns of `RUN_FILES` expanded)."""
    return sorted(p.name for pattern in RUN_FILES for p in workdir.glob(pattern))


def move_aside(workdir: Path, also: tuple = ()) -> Path | None:
    """Move a previous run's files, and the folders `also` names (a DBN's ``pretrain``), into
    ``previous-<date-time>/`` (for ``--restart``)."""
    names = used(workdir) + [name for name in also if (workdir / name).exists()]
    if not names or jax.process_index() != 0:
        return None
    dest = workdir / time.strftime("previous-%Y%m%d-%H%M%S")
    dest = free_name(dest.parent, dest.name, "")
    dest.mkdir()
    for name in names:
        (workdir / name).rename(dest / name)
    return dest


def write_config(workdir: Path, cfg: Config, step: int) -> None:
    """Write ``config.json``; a different earlier one is kept as ``config.before-step-N.json``."""
    if jax.process_index() != 0:
        return
    workdir.mkdir(parents=True, exist_ok=True)
    path, text = workdir / "config.json", cfg.to_json() + "\n"
    if path.exists() and path.read_text() != text:
        path.rename(free_name(workdir, f"config.before-step-{step}", ".json"))
    path.write_text(text)


def free_name(directory: Path, stem: str, suffix: str) -> Path:
    """``stem + suffix`` in `directory`, or ``stem-2 + suffix``, ... : never an existing name.

    >>> free_name(Path("/nonexistent"), "config.before-step-9", ".json").name
    'config.before-step-9.json'
    """
    path, n = directory / f"{stem}{suffix}", 2
    while path.exists():
        path, n = directory / f"{stem}-{n}{suffix}", n + 1
    return path


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line with ``step`` and ``time`` (s since start).

    Only process 0 writes. On resume, `rewind` moves lines past the checkpoint aside and
    continues the clock from the last kept line.
    """

    def __init__(self, path: Path, start: float, stamp=lambda step: {}):
        self.path, self.start, self.stamp = path, start, stamp  # stamp: step -> more keys
        self.file = self.events = None

    def rewind(self, step: int, keep=lambda line: True) -> None:
        """Move the lines past `step`, and those at `step` that `keep` rejects, to
        ``metrics.rewound.jsonl``: the resumed run writes them again."""
        if jax.process_index() != 0 or not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        parsed = [json.loads(line) for line in lines]
        kept = [x["step"] < step or (x["step"] == step and keep(x)) for x in parsed]
        if not all(kept):
            with open(self.path.with_name("metrics.rewound.jsonl"), "a") as f:
                f.writelines(line + "\n" for line, k in zip(lines, kept, strict=True) if not k)
            self.path.write_text(
                "".join(line + "\n" for line, k in zip(lines, kept, strict=True) if k)
            )
        if times := [x["time"] for x, k in zip(parsed, kept, strict=True) if k]:
            self.start -= times[-1]
        skips = self.path.with_name("skipped.jsonl")
        if skips.exists():  # the skips of the kept lines, as the uninterrupted run wrote them
            skips.write_text("".join(line + "\n" for line, x, k in zip(lines, parsed, kept,
                                     strict=True) if k and "skipped_loss" in x))  # fmt: skip

    def last(self, key: str, upto: float = float("inf")) -> dict:
        """The last line holding `key` (e.g. the last evaluation) at step `upto` or before, or
        {}."""
        if not self.path.exists():
            return {}
        lines = [json.loads(line) for line in self.path.read_text().splitlines()]
        return next((x for x in reversed(lines) if key in x and x["step"] <= upto), {})

    def open(self) -> None:
        """Open the file and TensorBoard's writer (seconds to start: before the training clock
        runs) in process 0; `write` opens them if not yet open."""
        if jax.process_index() == 0 and self.file is None:
            from tensorboardX import SummaryWriter

            self.file = open(self.path, "a")  # noqa: SIM115 - kept open for the run
            self.events = SummaryWriter(str(self.path.parent / "events"), flush_secs=10)

    def write(self, step: int, **values) -> dict:
        line = {
            "step": step,
            **self.stamp(step),
            "time": round(time.time() - self.start, 3),
            **values,
        }
        if jax.process_index() == 0:
            self.open()
            self.file.write(json.dumps(line) + "\n")
            self.file.flush()
            if "skipped_loss" in values:  # --skip-spikes: each skip also here
                with open(self.path.with_name("skipped.jsonl"), "a") as f:
                    f.write(json.dumps(line) + "\n")
            for key, value in values.items():  # TensorBoard: one scalar series per number
                if isinstance(value, int | float):
                    self.events.add_scalar(key, value, step)
        return line

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.events.close()
