"""User-facing errors: the launcher prints them as one line and exits non-zero, never a traceback wall."""


class SdtrainError(Exception):
    """A problem the user can fix (bad config, bad data, missing file). Printed as `error: <message>`."""


class ConfigError(SdtrainError):
    """An invalid configuration value or key."""


class DataError(SdtrainError):
    """Shards that cannot be found, read or used with this model."""


class CheckpointError(SdtrainError):
    """A checkpoint that cannot be found or does not fit the model."""
