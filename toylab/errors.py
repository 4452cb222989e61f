"""Errors a user can fix: the CLI prints their one-line message and exits with code 2."""


class ToylabError(Exception):
    """Bad input (unknown name, invalid value, bad config key, missing or corrupt file)."""


class NotATokenTask(ToylabError, NotImplementedError):
    """A token model or tool was asked of a task with real-valued inputs."""


class DivergenceError(ToylabError):
    """A training run's loss became NaN or infinite."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a study: the message says what finished and how to resume (the CLI exits 130)."""
