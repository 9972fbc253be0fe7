"""jaxpar: sharded training with JAX and Flax on one device mesh.

The mesh utilities are importable from here:

>>> import jaxpar
>>> spec = jaxpar.parse_mesh("data=2,model=2")
>>> spec.size
4
"""

from jaxpar.core.errors import UserError
from jaxpar.core.mesh import (
    AXES,
    MeshSpec,
    draw_mesh,
    layout_names,
    make_mesh,
    parse_mesh,
    request_devices,
)
from jaxpar.core.sharding import RULES, batch_sharding, partition_spec, state_shardings
from jaxpar.run.config import Config


def __getattr__(name):
    """`jaxpar.train` is imported on first use: ``python -m jaxpar.checkpoint`` and the other
    entry points then run without their own module imported twice."""
    if name == "train":
        from jaxpar.run.loop import train

        return train
    raise AttributeError(f"module 'jaxpar' has no attribute {name!r}")


__all__ = [
    "AXES",
    "RULES",
    "Config",
    "MeshSpec",
    "UserError",
    "batch_sharding",
    "draw_mesh",
    "layout_names",
    "make_mesh",
    "parse_mesh",
    "partition_spec",
    "request_devices",
    "state_shardings",
    "train",
]
