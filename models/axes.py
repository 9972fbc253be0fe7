"""How models attach logical axis names to their parameters."""


def axes(*names: str | None) -> dict:
    """Variable metadata naming each dimension's logical axis (one name or None per dimension).

    The names are stored where Flax keeps them (``out_sharding``), but Flax's eager sharding is
    off for these variables: models build anywhere, with or without a mesh, and jaxpar's rules
    table (`jaxpar.sharding.RULES`) decides the placement.

    >>> axes("embed", "hidden")
    {'out_sharding': ('embed', 'hidden'), 'eager_sharding': False}
    """
    return {"out_sharding": names, "eager_sharding": False}
