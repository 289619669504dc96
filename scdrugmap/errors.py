"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (bad input, unknown name, ...).
The CLI prints its message on one line and exits with code 2; nothing else is a
user error, so anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's input; the message names the problem and the fix."""

    exit_code = 2
