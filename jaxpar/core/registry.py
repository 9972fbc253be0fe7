"""Name -> constructor tables (`jaxpar.models.MODELS`, `jaxpar.data.DATASETS`) that also take a
``module:attribute`` name, so a user's own model or dataset needs no edit of jaxpar:

    python train.py --model mypackage.nets:WideMLP --dataset mypackage.data:load_scans

The module is imported on first use (from the path, or else the current folder)
and the attribute kept under that name; every process of a job resolves it the same way, and a
checkpoint records the name, so a resume, ``predict`` or ``--teacher`` find it again.
"""

import importlib
import os
import sys

from jaxpar.core.errors import UserError


class Registry(dict):
    """A dict whose missing ``module:attribute`` keys are imported on first use, and whose
    ``family:size`` keys, for a family in `sized`, are ``sized[family](name)``.

    >>> table = Registry(sqrt=None)
    >>> table["math:sqrt"](9.0), "math:tau" in table, "math:nothing" in table, "pi" in table
    (3.0, True, False, False)
    >>> Registry(sized={"twice": lambda name: 2 * int(name[6:])})["twice:21"]
    42
    """

    def __init__(self, *args, sized: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sized = sized or {}

    def __missing__(self, name: str):
        module, sep, attribute = name.partition(":")
        if module in self.sized:  # a family of sizes: rbm:500
            self[name] = self.sized[module](name)
            return self[name]
        if not sep or not module or not attribute:
            raise KeyError(name)
        if os.getcwd() not in sys.path:  # `python train.py` puts the script's folder first
            sys.path.append(os.getcwd())  # last: a name of the user's shadows nothing
        try:
            found = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as e:
            raise KeyError(name) from e
        self[name] = found
        return found

    def __contains__(self, name) -> bool:
        try:
            self[name]
        except KeyError:
            return False
        return True

    def lookup(self, name: str, what: str):
        """``self[name]``, or a `UserError` naming `what` (``--model``) and why it failed."""
        try:
            return self[name]
        except KeyError as e:
            cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ else ""
            known = [k for k in dict.keys(self) if ":" not in k] + [f"{f}:N" for f in self.sized]
            raise UserError(
                f"unknown {what} '{name}'{cause}; choose from {', '.join(known)}, or "
                "name your own as module:attribute"
            ) from None
