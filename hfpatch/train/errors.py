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
