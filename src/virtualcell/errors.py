"""The one exception type for bad input: its message is the single line a user sees."""


class InputError(Exception):
    """Bad input: the message names the file (or config key), the problem and the fix."""
