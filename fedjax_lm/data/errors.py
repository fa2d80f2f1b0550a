"""The one error type for bad data inputs: it always says what is wrong and where."""


class DataError(ValueError):
    """A source, file, record or silo that cannot be used, with the reason."""
