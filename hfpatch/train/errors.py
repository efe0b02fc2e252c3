"""Errors the trainer reports as one line (``error: ...``) instead of a traceback."""

from hfpatch.errors import UserError


class TrainError(UserError):
    """A problem the user can fix: bad config, bad data, bad launch."""


class ConfigError(TrainError):
    """A config file or option that does not validate."""


class DataError(TrainError):
    """Training data or tokenizer that cannot be used."""


class NonFiniteLossError(TrainError):
    """The loss or gradient norm became NaN/inf; the run stopped before the update."""


class UnreadableCheckpointError(TrainError):
    """A checkpoint whose files cannot be read (truncated, corrupt); an older one may still be."""


class Interrupted(Exception):
    """SIGINT / SIGTERM stopped the run at a step boundary; the message says how to resume."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_status = 128 + signum
