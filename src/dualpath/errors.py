"""User-facing errors: the CLI prints them as one line and exits with code 2, never a traceback."""


class DualPathError(Exception):
    """Base class for errors caused by bad input (config, data, checkpoint, argument)."""


class ConfigError(DualPathError, ValueError):
    """An unknown key, a wrong type or an inconsistent value in a config."""


class DataError(DualPathError):
    """Missing, empty, corrupt or mismatched data."""


class CheckpointError(DualPathError):
    """A missing, corrupt or incompatible checkpoint."""
