"""Tools around runs: commands (``python -m jaxpar.NAME``, a thin entry point beside this
package, runs ``jaxpar.tools.NAME``) and the plan of ``train.py --dry-run``:

- `compress`: int8/bf16 quantization and one-shot pruning of a trained run, with accuracy.
- `weights`: PyTorch weights imported as a checkpoint, a checkpoint's weights exported.
- `predict`: batched inference from any checkpoint on any mesh.
- `play`: a game against a trained AlphaZero agent (``--game``), in a terminal or by lines.
- `plan`: ``--dry-run``, a run's memory and collectives per device before it starts.
- `plot`: loss and accuracy curves of workdirs; `launch`: an N-process job on one machine.

This package imports, from the rest of jaxpar, only `jaxpar.core`, `jaxpar.cost`,
`jaxpar.models`, `jaxpar.data`, `jaxpar.modes` and `jaxpar.run`; nothing in jaxpar imports
the tools but their entry points (``train.py`` imports the plan).
"""
