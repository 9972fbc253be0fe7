"""Evaluation on the test split (each source's too, for a mixture; the moving average's too,
with ``--ema``): sums on the devices, one read per batch, at most two batches in flight."""

import functools
import math
from functools import partial

import numpy as np

from jaxpar.data import eval_batch_size, eval_batches, prefetch
from jaxpar.run.observe import fetch


def eval_sums(eval_step, state, batches) -> dict:
    """The eval step's sums (``{name: sum}`` and ``count``) over every example of a test split."""
    read = lambda sums: {k: float(fetch(v)) for k, v in sums.items()}  # noqa: E731
    total, previous = None, None
    for batch in batches:
        sums = eval_step(state, batch)
        if previous is not None:  # Sync point: at most 2 batches in flight, as in training.
            total = _add(total, read(previous))
        previous = sums
    return _add(total, read(previous))


def _add(total: dict | None, sums: dict) -> dict:
    return sums if total is None else {k: total[k] + v for k, v in sums.items()}


def means(sums: dict, suffix: str = "") -> dict:
    """``eval_<name><suffix>``: each sum over the examples counted, divided by their count."""
    return {f"eval_{k}{suffix}": v / sums["count"] for k, v in sums.items() if k != "count"}


def evaluate(eval_step, state, batches) -> dict:
    """The eval step's means over every example of the test split (``eval_loss`` and
    ``eval_accuracy`` for a classifier)."""
    return means(eval_sums(eval_step, state, batches))


def evaluate_parts(eval_step, state, parts: dict) -> dict:
    """`evaluate` over all the test splits in `parts` (``{source: batches}``) together, and over
    each one (``eval_loss/<source>``, ``eval_accuracy/<source>``) when there are several."""
    sums = {name: eval_sums(eval_step, state, batches) for name, batches in parts.items()}
    out = means(functools.reduce(_add, sums.values(), None))
    for name, part in sums.items() if len(sums) > 1 else ():
        out.update(means(part, f"/{name}"))
    return out


def evaluations(run, state, parts: dict) -> dict:
    """`evaluate_parts` of the model, and of its weights' moving average (``ema_eval_loss``,
    ``ema_eval_accuracy``...) with ``--ema``."""
    out = evaluate_parts(run.eval_step, state, parts)
    if run.ema_eval_step is not None:
        ema = evaluate_parts(run.ema_eval_step, state, parts)
        out.update({f"ema_{k}": v for k, v in ema.items()})
    return out


def evaluation_batches(run, ds=None):
    """``() -> batches`` of the test split (of `ds`, else the run's): built once and kept on the
    devices when the split is in host memory, else read again for each evaluation (ImageNet's
    50,000 crops are 7.5 GB)."""
    ds, limit = ds or run.ds, run.cfg.metrics.eval_examples
    # A multiple of the batch shards: a federated run's --batch-size is unused and need not split.
    unit = math.lcm(run.cfg.optimization.batch_size, run.spec.stage * run.spec.data * run.spec.fsdp)
    size = eval_batch_size(unit, min(len(ds.test_labels), limit or len(ds.test_labels)))
    batches = partial(eval_batches, ds, size, run.mesh, limit)
    if isinstance(ds.test_images, np.ndarray):
        kept = list(batches())
        return lambda: kept
    return lambda: prefetch(batches())


def evaluation_data(run):
    """``() -> {source: batches}``: the test split, or each source's of a mixture."""
    parts = {name: evaluation_batches(run, ds) for name, ds in run.ds.parts or [("", run.ds)]}
    return lambda: {name: batches() for name, batches in parts.items()}


def evaluator(run):
    """``(state, step) -> the evaluation line's values`` of a run of images (`evaluations` on
    the test split, or each source's)."""
    data = evaluation_data(run)
    return lambda state, step: evaluations(run, state, data())
