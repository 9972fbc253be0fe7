"""How models attach logical axis names to their parameters."""


def axes(*names: str | None) -> dict:
    """Variable metadata naming each dimension's logical axis (one name or None per dimension).

    The names are stored where Flax keeps them (``out_sharding``), but Flax's eager sharding is
    off for these variables: models build anywhere, with or without a mesh, and jaxpar's rules
    table (`jaxpar.core.sharding.RULES`) decides the placement.

    >>> axes("embed", "hidden")
    {'out_sharding': ('embed', 'hidden'), 'eager_sharding': False}
    """
    return {"out_sharding": names, "eager_sharding": False}


def is_weight(names) -> bool:
    """Whether a parameter with these logical axes is a weight matrix or kernel of a product (what
    pruning prunes): two or more dimensions besides a stack's ``layers``, and neither a table of
    positions (``seq``) nor a per-head vector (``heads`` x ``head_dim``, an attention bias).

    >>> is_weight(("embed", "hidden")), is_weight((None, None, "conv_in", "conv_out"))
    (True, True)
    >>> is_weight(("layers", "heads", "head_dim")), is_weight(("seq", "embed"))
    (False, False)
    """
    dims = [n for n in names if n != "layers"]
    return len(dims) >= 2 and "seq" not in dims and not set(dims) <= {"heads", "head_dim"}


def is_head(names) -> bool:
    """Whether a parameter belongs to the classifier head (what ``--freeze backbone`` trains):
    it has a ``classes`` axis."""
    return "classes" in names
