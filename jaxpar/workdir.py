"""The workdir: what a run writes, how a used one is recognised, resumed or moved aside.

Nothing a run wrote is deleted: starting over (``--restart``) moves the old files into
``previous-<date-time>/``, and metrics lines past a resumed checkpoint go to
``metrics.rewound.jsonl`` before the steps are trained again.
"""

import json
import time
from pathlib import Path

import jax

from jaxpar.config import Config
from jaxpar.errors import UserError

RUN_FILES = ("config.json", "metrics.jsonl", "metrics.rewound.jsonl", "checkpoints", "events")


def resolve(cfg: Config) -> Path:
    workdir = Path(cfg.workdir or time.strftime("runs/%Y%m%d-%H%M%S"))
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir} is a file; name a directory")
    return workdir


def used(workdir: Path) -> list[str]:
    return [n for n in RUN_FILES if (workdir / n).exists()]


def move_aside(workdir: Path) -> Path | None:
    """Move a previous run's files into ``previous-<date-time>/`` (for ``--restart``)."""
    names = used(workdir)
    if not names or jax.process_index() != 0:
        return None
    dest = workdir / time.strftime("previous-%Y%m%d-%H%M%S")
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
        path.rename(workdir / f"config.before-step-{step}.json")
    path.write_text(text)


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line with ``step`` and ``time`` (s since start).

    Only process 0 writes. On resume, `rewind` moves lines past the checkpoint aside and
    continues the clock from the last kept line.
    """

    def __init__(self, path: Path, start: float):
        self.path, self.start = path, start
        self.file = self.events = None

    def rewind(self, step: int) -> None:
        if jax.process_index() != 0 or not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        keep = [line for line in lines if json.loads(line)["step"] <= step]
        if len(keep) < len(lines):
            with open(self.path.with_name("metrics.rewound.jsonl"), "a") as f:
                f.writelines(line + "\n" for line in lines[len(keep) :])
            self.path.write_text("".join(line + "\n" for line in keep))
        if keep:
            self.start -= json.loads(keep[-1])["time"]

    def last(self, key: str) -> dict:
        """The last line holding `key` (e.g. the last evaluation), or {}."""
        if not self.path.exists():
            return {}
        lines = [json.loads(line) for line in self.path.read_text().splitlines()]
        return next((line for line in reversed(lines) if key in line), {})

    def write(self, step: int, **values) -> dict:
        line = {"step": step, "time": round(time.time() - self.start, 3), **values}
        if jax.process_index() == 0:
            if self.file is None:
                from tensorboardX import SummaryWriter

                self.file = open(self.path, "a")  # noqa: SIM115 - kept open for the run
                self.events = SummaryWriter(str(self.path.parent / "events"), flush_secs=10)
            self.file.write(json.dumps(line) + "\n")
            self.file.flush()
            for key, value in values.items():  # TensorBoard: one scalar series per key
                self.events.add_scalar(key, value, step)
        return line

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.events.close()
