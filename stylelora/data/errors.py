"""Owns DataError: the one exception the data pipeline raises for input the user has to fix."""


class DataError(ValueError):
    """The training data cannot be used as given; the message says what to change.

    Raised before any model is loaded (scan and checks are pure data work), so a bad folder costs
    seconds, not a model download and a crashed run.
    """
