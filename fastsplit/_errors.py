"""The one error type fastsplit raises for bad input."""


class SplitError(ValueError):
    """Bad input to a split: the message names the value that is wrong.

    A ``SplitError`` is raised before anything is written, so the arrays and
    models passed in are left exactly as they were.
    """
