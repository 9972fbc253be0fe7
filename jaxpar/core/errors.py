"""The one exception type for user mistakes.

`train.py` turns a `UserError` into one line on stderr and exit status 2; anything else is a bug or
an environment failure and exits 1.
"""


class UserError(Exception):
    """A mistake in what the user asked for: the message names the problem and the fix."""


class Diverged(Exception):
    """The loss or the gradients stopped being finite; no checkpoint of that state was saved."""


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGINT (after saving a checkpoint, once training began); exit
    status 128 + signal."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
