"""The one exception type for user mistakes: the CLI prints its message, never a traceback."""


class UserError(Exception):
    """Bad input from the user (a missing file, a malformed annotation, a wrong option)."""
