"""What a training mode decides besides its step: the `Mode` every mode derives from.

A mode (`jaxpar.modes.sync`'s every-step, local SGD, DiLoCo and stale SGD;
`jaxpar.modes.federated`'s rounds) tells the one loop its optimizer, how a batch splits over the
mesh, its data and its metrics; `Mode` gives what a mode whose step is one batch of examples does,
which the others replace.
"""

import jax
import jax.numpy as jnp
import optax

from jaxpar.core.optimizers import make_optimizer
from jaxpar.core.sharding import batch_sharding, check_batch, check_microbatches
from jaxpar.data import steps_per_epoch, train_batches


class Mode:
    """What a run's mode decides besides its step: here, what a mode of one batch per step does."""

    unit = "step"  # what the printed progress counts (a federated run's: rounds)
    rate = "examples_per_s"  # the training lines' speed: `examples_per_step` per second
    # What evaluation reports, the headline first: a key every evaluation line holds (an RBM's
    # are its reconstruction error and pseudo-log-likelihood: `jaxpar.models.rbm.REPORTED`).
    reported = ("eval_accuracy", "eval_loss")

    @property
    def eval_key(self) -> str:
        return self.reported[0]

    def optimizer(self, cfg, total: int) -> optax.GradientTransformation:
        """The optimizer the state holds (a schedule over `total` steps)."""
        o = cfg.optimization
        return make_optimizer(o.optimizer, o.lr, o.momentum, o.weight_decay, o.schedule,
                              o.warmup_steps, total, o.clip_grad_norm)  # fmt: skip

    def check(self, cfg, mesh) -> None:
        """Refuse a batch that does not split over the mesh's batch shards (or microbatches)."""
        check_batch(cfg.optimization.batch_size, mesh)
        check_microbatches(cfg.optimization.batch_size, cfg.parallelism.grad_accum, mesh)

    def steps_per_epoch(self, ds, batch_size: int) -> int:
        return steps_per_epoch(ds, batch_size)

    def batch_ndims(self, image_ndim: int) -> dict[str, int]:
        """Dimensions of each array of a step's batch (the leading one is sharded)."""
        return {"image": image_ndim, "label": 1}

    def batches(self, ds, batch_size: int, seed: int, plan, mesh, workers: int = 0):
        """The device batch of each dispatch in `plan` (read by `workers` processes)."""
        return train_batches(ds, batch_size, seed, plan, mesh, workers)

    def abstract_batch(self, ds, batch_size: int, mesh) -> dict:
        """Shapes, dtypes and shardings of one step's batch (for `--dry-run`)."""
        image = (batch_size, *ds.image_shape)
        return {"image": jax.ShapeDtypeStruct(image, ds.train_images.dtype,
                                              sharding=batch_sharding(mesh, len(image))),
                "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32,
                                              sharding=batch_sharding(mesh))}  # fmt: skip

    def examples_per_step(self, batch_size: int) -> float:
        """Training examples one step computes on (``examples_per_s`` in metrics)."""
        return batch_size

    def stamp(self, step: int) -> dict:
        """Keys every line of ``metrics.jsonl`` at `step` carries besides ``step``."""
        return {}

    def traffic(self, param_bytes: int) -> dict:
        """Constant keys of every training line (a federated round's bytes)."""
        return {}

    def shown(self, line: dict) -> dict:
        """What the progress line shows of an evaluation `line`."""
        return {k: line[k] for k in reversed(self.reported)}

    def summary(self, line: dict) -> str:
        """The run's last words on its last evaluation `line`."""
        if self.reported != Mode.reported:  # an RBM's: its figures by name
            named = ", ".join(f"{k.removeprefix('eval_').replace('_', ' ')} {line[k]:.4f}"
                              for k in self.reported)  # fmt: skip
            return f"final test {named} at step {line['step']}"
        ema = (f"; its weights' moving average {line['ema_eval_accuracy']:.2%}"
               if "ema_eval_accuracy" in line else "")  # fmt: skip
        return (f"final test accuracy {line['eval_accuracy']:.2%} (eval_loss "
                f"{line['eval_loss']:.4f}) at step {line['step']}{ema}")  # fmt: skip

    def announce(self, workdir) -> list[str]:
        """Lines to print when a run starts (and files to write in `workdir`)."""
        return []
