"""The one exception type for user mistakes.

`train.py` turns a `UserError` into one line on stderr and exit status 2; anything else is a bug or
an environment failure and exits 1.
"""


class UserError(Exception):
    """A mistake in what the user asked for: the message names the problem and the fix."""
