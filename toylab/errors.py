"""Errors a user can fix: the CLI prints their one-line message and exits with code 2."""


class ToylabError(Exception):
    """Bad input (unknown name, invalid value, bad config key, missing or corrupt file)."""


class DivergenceError(ToylabError):
    """A training run's loss became NaN or infinite."""
