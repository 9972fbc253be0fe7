"""The core: what one sharded train step is made of, with no run around it.

- `mesh`: a device mesh from one string (``2x2``, ``data=2,model=2``, a layout in ``meshes/``).
- `axes`: how models name each parameter dimension's logical axis, and the roles they mark.
- `sharding`: the rules table (logical axis -> mesh axes), parameters' and batches' shardings.
- `step`: the train state, the jitted train and eval steps with their shardings.
- `optimizers`: the optax transformation the flags build (schedules, clipping, EMA, freezing).
- `errors`: the exceptions a run stops with; `registry`: names -> things, for every choice.

This package imports nothing else of jaxpar: everything else builds on it.
"""
