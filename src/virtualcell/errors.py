"""The one exception type for bad input: its message is the single line a user sees."""


class InputError(Exception):
    """Bad input: the message names the file (or config key), the problem and the fix.

    The message is kept to one line (whitespace, including newlines from a library's
    error text quoted in it, collapses to single spaces), because the CLI prints it as
    ``error: <message>`` and the job's MLflow run records it as its error tag.
    """

    def __str__(self) -> str:
        return " ".join(super().__str__().split())
