"""Errors that reach the user carry one clear message; entrypoints print them without a traceback."""


class FlashserveError(Exception):
    """Base class for errors caused by user input or the environment, not by a bug."""


class ModelNotFoundError(FlashserveError):
    pass


class ModelFormatError(FlashserveError):
    """A model file that is truncated, corrupted, or of an unsupported architecture/type."""


class InvalidRequestError(FlashserveError, ValueError):
    """A request the engine cannot run (prompt longer than the context, bad parameters)."""


class WorkerError(FlashserveError, RuntimeError):
    """A model worker process died, failed or hung; the engine cannot go on (its workers are stopped)."""
