"""Training modes: what changes how a run trains, each in its own module, plugged into the one
loop (`jaxpar.run.loop`) through `jaxpar.modes.mode.Mode` or the train step's arguments.

- `mode`: the `Mode` every mode derives from (its optimizer, data, metrics).
- `sync`: how data-parallel replicas agree (``--sync``: every step, local SGD, DiLoCo, stale).
- `federated`: ``--clients N``, a round of FedAvg and its kin as one step.
- `pipeline`: a ViT's blocks over the ``stage`` axis (GPipe, circular).
- `distill`: ``--teacher``'s loss; `prune`: ``--prune-to``'s masks; `quantize`: qwix int8.
- `alphazero`: Monte Carlo tree search (mctx) in pgx's games: self-play sharded over the batch
  axes (root parallelism too), the replay ring, AlphaZero's loss, players for evaluation.
- `games`: ``--game``, AlphaZero as a mode of the loop (an iteration as one step).
- `compose`: which modes run together, the matrix the config check and the tests read.

This package imports, from the rest of jaxpar, only `jaxpar.core`, `jaxpar.models` and
`jaxpar.data`: the run (`jaxpar.run.loop`, checkpoints) builds on the modes, not the other way.
"""
