"""Evaluation on the test split (each source's too, for a mixture; the moving average's too,
with ``--ema``): sums on the devices, one read per batch, at most two batches in flight."""

import math
from functools import partial

import numpy as np

from jaxpar.data import eval_batch_size, eval_batches, prefetch
from jaxpar.run.observe import fetch


def eval_sums(eval_step, state, batches) -> np.ndarray:
    """Summed loss, correct predictions and count over every example of a test split."""
    keys = ("loss_sum", "correct", "count")
    read = lambda sums: np.array([fetch(sums[k]) for k in keys])  # noqa: E731
    total, previous = np.zeros(3), None
    for batch in batches:
        sums = eval_step(state, batch)
        if previous is not None:  # Sync point: at most 2 batches in flight, as in training.
            total += read(previous)
        previous = sums
    return total + read(previous)


def evaluate(eval_step, state, batches) -> dict:
    """Loss and accuracy over every example of the test split."""
    loss_sum, correct, count = eval_sums(eval_step, state, batches)
    return {"eval_loss": float(loss_sum / count), "eval_accuracy": float(correct / count)}


def evaluate_parts(eval_step, state, parts: dict) -> dict:
    """`evaluate` over all the test splits in `parts` (``{source: batches}``) together, and over
    each one (``eval_loss/<source>``, ``eval_accuracy/<source>``) when there are several."""
    sums = {name: eval_sums(eval_step, state, batches) for name, batches in parts.items()}
    loss_sum, correct, count = sum(sums.values())
    out = {"eval_loss": float(loss_sum / count), "eval_accuracy": float(correct / count)}
    for name, (loss_sum, correct, count) in sums.items() if len(sums) > 1 else ():
        out[f"eval_loss/{name}"] = float(loss_sum / count)
        out[f"eval_accuracy/{name}"] = float(correct / count)
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
