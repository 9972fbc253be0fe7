"""Orbax sharded checkpoints: asynchronous saves, exact resume onto any mesh, inspection.

Layout of ``WORKDIR/checkpoints`` (plain Orbax ``CheckpointManager``, one folder per step)::

    checkpoints/<step>/state/      StandardSave of {"model": ..., "optimizer": ...}: nested dicts
                                   of arrays (NNX pure dicts), e.g. state["model"]["fc1"]["kernel"]
    checkpoints/<step>/manifest/   JsonSave: model, dataset, batch size, mesh, each parameter's
                                   PartitionSpec, data position, library versions

Plain Orbax reads the parameters without jaxpar, as numpy arrays on any machine::

    import os, jax, numpy as np, orbax.checkpoint as ocp
    path = os.path.abspath("WORKDIR/checkpoints/330/state")  # Orbax needs an absolute path
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    kernel = state["model"]["fc1"]["kernel"]  # numpy.ndarray (64, 512)

Orbax writes each step to a temporary folder and renames it when complete, so a process killed
mid-save leaves the previous complete step as the latest; temporary folders are never restored.
List a workdir's checkpoints with ``python -m jaxpar.checkpoint WORKDIR``.
"""

import contextlib
import json
import logging
import os
import sys
import threading
from importlib.metadata import version
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from jaxpar.core.errors import UserError
from jaxpar.core.mesh import parse_mesh
from jaxpar.core.sharding import placed
from jaxpar.models import REVISIONS, revision
from jaxpar.modes import compose
from jaxpar.run.storage import is_url, readable

# Fields of the manifest that define the run: a checkpoint resumes only into the same ones. The
# model's and the data's, then those each training mode declares (`jaxpar.modes.compose`: its pins).
IDENTITY = tuple(
    dict.fromkeys(
        (
            "model",
            "dataset",
            "image_shape",
            "num_classes",
            "batch_size",
            "optimizer",
            "seed",
            "patch_size",
            "revision",
            "rbm",  # an RBM's sampling: --cd-k, --persistent (its chains in the state)
            "labeled_fraction",  # the training split's share kept (--labeled-fraction)
            *compose.pinned(),
        )
    )
)
# What a manifest written before a field existed means by its absence.
ABSENT = {"revision": 1, "freeze": None, "prune_to": None, "qat": None, "federated": None,
          "teacher": None, "ema": False, "game": None, "rbm": None,
          "labeled_fraction": None, "spikes": False}  # fmt: skip
# The layout of the saved state. 2: the optimizer state always holds a step count (schedules).
FORMAT = 2


# Names of the train state's parts in a checkpoint: ``{0: model, 1: optimizer}``, and what a
# `jaxpar.modes.sync` mode adds (DiLoCo's global copy and outer momentum, stale SGD's ring), a
# teacher, a game's replay ring and the network it evaluates against (`jaxpar.modes.games`), and
# --skip-spikes' running statistics (`jaxpar.core.spikes`).
ITEMS = {0: "model", 1: "optimizer", 2: "held_params", 3: "outer_optimizer", 4: "teacher",
         5: "replay", 6: "earlier", 7: "spikes"}  # fmt: skip


def _items(state) -> dict:
    """The train state under readable names."""
    return {ITEMS[k]: v for k, v in state.items()}


class Checkpoints:
    """An Orbax `CheckpointManager` over ``WORKDIR/checkpoints`` keeping the last `keep` steps."""

    def __init__(self, workdir: Path, keep: int = 3):
        self.directory = Path(workdir).resolve() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        # Orbax's "replica-parallel" saving slices every replicated array with one jax dispatch
        # per slice before `save` returns: 213 ms of 603 ms for ResNet-18 on a 2x2 CPU mesh, 43 ms
        # without it (benchmarks/checkpoint_blocking.py). Orbax turns it off on GPUs already.
        arrays = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
        registry = ocp.type_handlers.create_type_handler_registry((jax.Array, arrays))
        handlers = {
            "state": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
            "manifest": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )
        self._handing = None  # the thread handing the last save to Orbax
        self._failed = None  # what it raised, re-raised by the next call that waits for it

    def latest(self) -> int | None:
        self._handed()
        return self.manager.latest_step()

    def save(self, step: int, state, manifest: dict, wait: bool = False) -> None:
        """Start an asynchronous save; returns once a copy of `state` is dispatched on the
        devices, so the caller may donate `state` right after.

        Performance is decided here: Orbax's own `save` copies every array to the host before it
        returns (the blocking part of an asynchronous save: 42 ms of 357 ms for ResNet-18 on a
        2x2 CPU mesh, benchmarks/checkpoint_blocking.py). Here a device-side copy is dispatched
        (XLA runs it after the step that produced `state`, before the next one reuses its
        buffers) and a background thread hands the copy to Orbax, which copies it to the host and
        writes the files; saves stay in order, one handed over at a time. The copy costs device
        memory the size of the state until Orbax has it on the host: where a device reports less
        free memory than that (`has_room_for`), Orbax copies to the host before `save` returns.
        """
        self._handed()
        items = _items(state)
        if has_room_for(items):
            args = _save_args(_device_copy(items), manifest)

            def hand_over():
                try:
                    self.manager.save(step, args=args, force=True)
                except BaseException as e:  # noqa: BLE001 - re-raised in the training thread
                    self._failed = e

            self._handing = threading.Thread(target=hand_over, name="jaxpar-save", daemon=True)
            self._handing.start()
        else:
            self.manager.save(step, args=_save_args(items, manifest), force=True)
        if wait:
            self.wait()

    def _handed(self) -> None:
        """Wait until the last save is in Orbax's hands; raise what handing it over raised."""
        if self._handing is not None:
            self._handing.join()
            self._handing = None
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise failed

    def manifest(self, step: int) -> dict:
        path = self.directory / str(step)
        try:
            return self.manager.restore(
                step, args=ocp.args.Composite(manifest=ocp.args.JsonRestore())
            ).manifest
        except Exception as e:  # noqa: BLE001 - any failure here means an unreadable checkpoint
            raise UserError(
                f"checkpoint step {step} at {path} is unreadable ({type(e).__name__}); move it "
                "aside to resume from an earlier step, or pass --restart"
            ) from None

    def restore(self, step: int, abstract, shardings):
        """Restore `step` into the current mesh's `shardings` (any mesh, device or process count).

        `abstract`: the state's shapes and dtypes (a pure dict, as `shardings`).
        """
        target = placed(_items(abstract), _items(shardings))
        path = self.directory / str(step)
        try:
            args = ocp.args.PyTreeRestore(
                target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)
            )
            with _quiet_if_failed():
                restored = self.manager.restore(step, args=ocp.args.Composite(state=args)).state
        except Exception as e:  # noqa: BLE001
            raise UserError(
                f"checkpoint step {step} at {path} does not fit this run or is corrupt "
                f"({_reason(e)}); "
                "use another --workdir, or --restart to move the old run aside"
            ) from None
        return {k: restored[name] for k, name in ITEMS.items() if name in restored}

    def restore_partial(self, step: int, target: dict) -> dict:
        """The parts of `step` that `target` names (abstract arrays with their shardings)."""
        args = ocp.args.PyTreeRestore(
            target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        )
        with _quiet_if_failed():  # the caller reports the failure
            return self.manager.restore(step, args=ocp.args.Composite(state=args)).state

    def wait(self) -> None:
        self._handed()
        self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self._handed()
        finally:
            self.manager.close()


def latest_manifest(workdir, what, quantized: bool = False) -> tuple[int, dict]:
    """The step and manifest of `workdir`'s latest complete checkpoint, to read one model from
    (predict, compress, a teacher, --init-from); a `UserError` naming `what` (the flag or folder
    that pointed there) when there is none, when it is DiLoCo's between syncs, or when it is an
    int8 model from ``compress --save`` and the reader cannot serve one (`quantized`: predict)."""
    ckpts = Checkpoints(workdir)
    try:
        step = ckpts.latest()
        if step is None:
            raise UserError(f"{what} holds no complete checkpoint")
        manifest = ckpts.manifest(step)
        if manifest.get("quantization") and not quantized:
            raise UserError(
                f"{what} holds an int8 model written by compress --save, which only predict "
                f"serves; use the run it was compressed from ({manifest['compressed']['from']})"
            )
        kind, _, period = (manifest.get("sync") or "").partition(":")
        if kind == "diloco" and step % int(period):
            raise UserError(
                f"{what} was trained with --sync {manifest['sync']} and its latest checkpoint, "
                f"step {step}, lies between syncs, where the model it evaluates is computed, not "
                f"stored; continue the run to a multiple of {period} steps (python train.py ... "
                f"--steps {-(-step // int(period)) * int(period)} --workdir {workdir})"
            )
        return step, manifest
    finally:
        ckpts.close()


def model_of(manifest: dict):
    """The model a checkpoint's manifest describes, unbuilt: ``(model_fn, image_shape)``: its
    model, dtype, patch size and quantization. Predict, export, compress and ``--teacher`` build
    it; `restore_model` fills it with the weights the run evaluated."""
    import jax.numpy as jnp

    from jaxpar.models import MODELS

    shape = tuple(manifest["image_shape"])
    options = {"patch_size": manifest["patch_size"]} if manifest["model"].startswith("vit-") else {}
    dtype = jnp.bfloat16 if manifest.get("precision") == "bf16" else jnp.float32
    fn = MODELS.lookup(manifest["model"], "model")
    build = lambda rngs: fn(shape, manifest["num_classes"], dtype=dtype, rngs=rngs, **options)  # noqa: E731
    if quantized := manifest.get("quantization"):  # `compress --save`: int8 weights and scales
        from jaxpar.modes.quantize import post_training

        sample = jnp.zeros((1, *shape), jnp.float32)
        return lambda rngs: post_training(build(rngs), sample, quantized["activations"]), shape
    return build, shape


def restore_model(workdir, step: int, abstract: dict, shardings: dict) -> dict:
    """The model weights of `workdir`'s checkpoint `step` that `abstract` (a pure dict of shapes,
    possibly a part of the model) names, restored straight into `shardings` (any mesh): the
    model the run evaluates, so for a model per replica (``--sync local:H``) their mean, and for
    ``--sync diloco:H`` the global copy (`latest_manifest` refuses steps between its syncs)."""
    ckpts = Checkpoints(workdir)
    try:
        kind = (ckpts.manifest(step).get("sync") or "").partition(":")[0]
        if kind == "diloco":  # at a sync: the global copy is the model
            held = ckpts.restore_partial(step, {"held_params": placed(abstract, shardings)})
            return held["held_params"]
        if kind != "local":
            return ckpts.restore_partial(step, {"model": placed(abstract, shardings)})["model"]
        replicas = parse_mesh(ckpts.manifest(step)["mesh"]).data

        def with_replicas(a, s):  # the replica axis first, whole on each device
            if isinstance(s, NamedSharding):
                s = NamedSharding(s.mesh, PartitionSpec(None, *s.spec))
            return jax.ShapeDtypeStruct((replicas, *a.shape), a.dtype, sharding=s)

        ahead = jax.tree.map(with_replicas, abstract, shardings)
        laid = ckpts.restore_partial(step, {"model": ahead})["model"]
        mean = lambda tree: jax.tree.map(lambda a: a.mean(axis=0), tree)  # noqa: E731
        return jax.jit(mean, out_shardings=shardings)(laid)  # as `jaxpar.modes.sync.Local.view`
    finally:
        ckpts.close()


def _save_args(items, manifest: dict):
    return ocp.args.Composite(
        state=ocp.args.PyTreeSave(items), manifest=ocp.args.JsonSave(manifest)
    )


def has_room_for(tree, headroom: float = 0.9) -> bool:
    """Whether every local device has room for another copy of its shards of `tree` within
    `headroom` of its memory limit. Devices that report no memory statistics (CPUs) have."""
    need: dict = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            need[shard.device] = need.get(shard.device, 0) + shard.data.nbytes
    for device, nbytes in need.items():
        stats = device.memory_stats() or {}
        limit = stats.get("bytes_limit")
        if limit and stats.get("bytes_in_use", 0) + nbytes > headroom * limit:
            return False
    return True


@jax.jit
def _device_copy(tree):
    """A copy of every array of `tree` in new buffers, in the same shardings (not donated, so
    XLA cannot alias them to the input)."""
    return jax.tree.map(lambda x: x.copy(), tree)


_RESTORE_FAILED = threading.Event()  # set by a failed restore, cleared by the next one
_RESTORING = threading.Event()  # set while a restore runs: a read may fail before it does
_QUIET_INSTALLED = threading.Event()


def _quiet_failed_reads() -> None:
    """When a restore fails, Orbax's other reads of that checkpoint still end, in its threads or
    when they are collected: "Event loop is closed", or their own read errors reported as
    unraisable exceptions and as asyncio's "exception was never retrieved". Drop those so the
    user sees one error line: "loop is closed" always, the others (raised in Orbax's code) only
    while a restore runs or after it failed, and before the next restore. Installed before the
    restore: those reads may end before the failure is handled."""
    _RESTORE_FAILED.clear()
    if _QUIET_INSTALLED.is_set():
        return
    _QUIET_INSTALLED.set()
    previous = sys.unraisablehook

    def hook(args):
        if not _is_failed_read(args.exc_value):
            previous(args)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(
        lambda record: not (record.exc_info and _is_failed_read(record.exc_info[1]))
    )


@contextlib.contextmanager
def _quiet_if_failed():
    """A restore: if it fails, Orbax's other reads of it end quietly (`_quiet_failed_reads`)."""
    _quiet_failed_reads()
    _RESTORING.set()
    try:
        yield
    except Exception:
        _RESTORE_FAILED.set()
        raise
    finally:
        _RESTORING.clear()


def _is_failed_read(e) -> bool:
    if isinstance(e, RuntimeError) and "loop is closed" in str(e):
        return True
    # A read's error may be reported (a task collected) before the restore's failure reaches
    # `_quiet_if_failed`: while a restore runs, Orbax's read errors are its failure's too.
    if not (_RESTORE_FAILED.is_set() or _RESTORING.is_set()):
        return False
    while e is not None:  # the exception, then what it was raised from
        tb = e.__traceback__
        while tb is not None:
            if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
                return True
            tb = tb.tb_next
        e = e.__cause__ or e.__context__
    return False


def _reason(e: BaseException, limit: int = 160) -> str:
    """The first line of the root cause (TensorStore's or Orbax's own words), cut at a word."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def check_fits(manifest: dict, identity: dict, step: int, directory: Path) -> None:
    """Refuse a checkpoint saved for another run, or in another layout, naming each mismatch."""
    if "imported" in manifest:
        raise UserError(
            f"{directory} holds weights imported from {manifest['imported']['file']}, not a run to "
            f"resume: start one from them with --init-from {directory.parent} and a new --workdir"
        )
    if (saved := manifest.get("format", 1)) != FORMAT:
        raise UserError(
            f"checkpoint step {step} in {directory} has layout {saved} and this jaxpar reads "
            f"layout {FORMAT}; --restart to train anew (the old run is moved aside, not deleted)"
        )
    check_revision(manifest, identity["model"], f"checkpoint step {step} in {directory}")
    diffs = [
        f"{k}={manifest.get(k, ABSENT.get(k))!r} there, {identity[k]!r} here"
        for k in IDENTITY
        if manifest.get(k, ABSENT.get(k)) != identity[k]
    ]
    if diffs:
        saved_patch = manifest.get("patch_size")
        fix = (f"pass --patch-size {saved_patch} to resume it (ViTs on images of at most 16 "
               "pixels took patch 2 by default before; now 4), "
               if saved_patch and saved_patch != identity["patch_size"] else "")  # fmt: skip
        raise UserError(
            f"checkpoint step {step} in {directory} is from another run ({'; '.join(diffs)}); "
            f"{fix}use another --workdir, or --restart to move the old run aside"
        )


def check_revision(manifest: dict, model: str, what: str) -> None:
    """Refuse weights saved by a `model` that computed differently (`jaxpar.models.REVISIONS`)."""
    saved, now = manifest.get("revision", ABSENT["revision"]), revision(model)
    if manifest.get("model") == model and saved != now:
        family = REVISIONS[model.rstrip("0123456789").split("-")[0]][1]
        raise UserError(
            f"{what} holds {model} weights of revision {saved}, and this jaxpar's {model} is "
            f"revision {now} ({family}): they would compute other logits; train anew (--restart "
            "moves the old run aside), or use the jaxpar that trained it"
        )


def versions() -> dict:
    names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "qwix")
    return {n: version(n) for n in names}


def manifests(workdir: str) -> list[dict]:
    """Every complete checkpoint of `workdir`, oldest first: its manifest plus ``path``."""
    ckpts = Checkpoints(Path(workdir))
    try:
        steps = ckpts.manager.all_steps()
        return [{**ckpts.manifest(s), "path": str(ckpts.directory / str(s))} for s in steps]
    finally:
        ckpts.close()


def describe(found: list[dict]) -> str:
    """One block per checkpoint: step, mesh, model and where it lives."""
    lines = []
    for m in found:
        if "imported" in m:
            lines.append(f"step 0: model {m['model']} {m['image_shape']}, {m['num_classes']} "
                         f"classes, imported from {m['imported']['file']}")  # fmt: skip
            lines.append(f"  {m['path']}")
            continue
        lines.append(
            f"step {m['step']}: model {m['model']} on {m['dataset']} {m['image_shape']}, batch "
            f"{m['batch_size']}, saved on mesh {m['mesh']} ({m['processes']} process(es)), "
            f"epoch {m['epoch']} batch {m['batch_in_epoch']}, jax {m['versions']['jax']}"
        )
        lines.append(f"  {m['path']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m jaxpar.checkpoint", description="List a jaxpar workdir's checkpoints."
    )
    parser.add_argument("workdir", help="a folder, or an s3:// or gs:// URL")
    parser.add_argument(
        "--json", action="store_true", help="print a JSON list of every manifest, nothing else"
    )
    args = parser.parse_args(argv)
    try:
        # A URL: its manifests copied from the store (`jaxpar.run.storage`), named by the URL.
        with readable(args.workdir, "workdir", items=("manifest",)) as folder:
            if not (folder / "checkpoints").is_dir():
                raise UserError(f"{args.workdir} has no checkpoints/ folder")
            found = manifests(folder)
            if is_url(args.workdir):
                for m in found:
                    m["path"] = m["path"].replace(str(folder), args.workdir.rstrip("/"), 1)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(found, indent=2))
    else:
        print(describe(found) or f"no checkpoints in {args.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def load_teacher(cfg, ds, mesh):
    """Check now that ``--teacher`` holds a checkpoint of a model for this data (image shape and
    classes), and describe how to restore it onto `mesh` (a `jaxpar.modes.distill.Teacher`)."""
    from functools import partial

    from flax import nnx

    from jaxpar.core.sharding import state_shardings
    from jaxpar.modes.distill import Teacher

    source = Path(cfg.model.teacher)
    if not (source / "checkpoints").is_dir():
        raise UserError(f"--teacher {source} has no checkpoints/ folder; name a trained workdir")
    step, manifest = latest_manifest(source, f"--teacher {source}")
    for key, here in (("image_shape", list(ds.image_shape)), ("num_classes", ds.num_classes)):
        if manifest.get(key) != here:
            raise UserError(f"--teacher {source} was trained with {key} {manifest.get(key)}; "
                            f"this run's data has {here}")  # fmt: skip
    check_revision(manifest, manifest["model"], f"--teacher {source}")
    build, _ = model_of(manifest)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))))
    shardings, _ = state_shardings(abstract, mesh)
    abstract = nnx.to_pure_dict(abstract)
    restore = partial(restore_model, source, step, abstract, shardings)
    return Teacher(graphdef, abstract, shardings, restore, cfg.model.distill_temperature,
                   cfg.model.distill_weight)  # fmt: skip
