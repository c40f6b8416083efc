"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations

from pathlib import Path


class LlmToolError(Exception):
    """A user-facing error: bad input, missing file, unsupported model.

    The message should name the file (when there is one) and the problem in one line.
    """

    def __init__(self, message: str, path: str | Path | None = None, exit_code: int = 2):
        self.path = str(path) if path is not None else None
        self.exit_code = exit_code
        super().__init__(f"{self.path}: {message}" if self.path else message)
