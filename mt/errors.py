"""The few exception types library code raises; `cli.py` turns them into one-line errors."""


class MTError(Exception):
    """Base class: an error caused by the user's input, reported without a traceback."""


class ConfigError(MTError):
    """A config file or override is invalid (the message names the key)."""


class DataError(MTError):
    """A corpus file is missing or malformed (the message names the file and line)."""


class CheckpointError(MTError):
    """A run directory or checkpoint cannot be used (the message says why)."""


class TrainingError(MTError):
    """Training cannot go on (say, the loss keeps diverging); the message names the last good checkpoint."""


def one_line(exc: Exception) -> str:
    """An MTError's message, or an operating-system error as `PATH: what happened`."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror.lower()}" + (f" ({exc.filename2})" if exc.filename2 else "")
    return str(exc)
