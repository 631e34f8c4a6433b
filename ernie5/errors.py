"""User-facing errors: anything the user can fix (config, files, data) is a UserError.

The CLI turns a UserError into one line on stderr and exit status 2; everything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input. `where` names the config key or file; `reason` says what is wrong."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason

    def line(self) -> str:
        return f"error: {self.where}: {self.reason}"


class ConfigError(UserError):
    """A config value is wrong; `where` is the dotted key path."""


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss stays non-finite). The CLI prints one line and exits 3."""

    def line(self) -> str:
        return f"error: training: {self}"
