"""Errors a user can cause and fix. The CLI turns them into one stderr line and exit code 2,
the app into a visible ``gr.Error``; anything else is a bug and keeps its traceback."""

from __future__ import annotations


class NLAInputError(ValueError):
    """Bad input from a user: text, vector, parameter, card name, layer, or file.

    ``field``: the request parameter at fault, when there is one (the app marks that input)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class CheckpointError(NLAInputError):
    """A checkpoint or card folder that is missing, corrupt, unsafe, or does not fit the backbone."""
