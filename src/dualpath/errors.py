"""User-facing errors: the CLI prints them as one line and exits with code 2, never a traceback; and
one-line warnings on stderr."""

import sys


class DualPathError(Exception):
    """Base class for errors caused by bad input (config, data, checkpoint, argument)."""


class ConfigError(DualPathError, ValueError):
    """An unknown key, a wrong type or an inconsistent value in a config."""


class DataError(DualPathError):
    """Missing, empty, corrupt or mismatched data."""


class CheckpointError(DualPathError):
    """A missing, corrupt or incompatible checkpoint."""


def check_one_of(key: str, value, allowed: tuple) -> None:
    """ConfigError naming the key, the allowed values and the nearest one, unless value is allowed."""
    if value not in allowed:
        import difflib

        hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        more = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(f"{key}='{value}' is not one of {', '.join(map(str, allowed))}{more}")


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none), at most 200 chars."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]


def warn(message: str) -> None:
    """One line on stderr: something was wrong but handled (e.g. a corrupt checkpoint skipped)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
