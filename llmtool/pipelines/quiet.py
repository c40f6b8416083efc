"""Silence third-party libraries that print (progress bars, reports, import warnings):
a pipeline never prints, the CLI does."""

from __future__ import annotations

import atexit
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout


@contextmanager
def quiet() -> Iterator[None]:
    """Python-level stdout/stderr to /dev/null and warnings off while the block runs."""
    with open(os.devnull, "w") as null, redirect_stdout(null), redirect_stderr(null):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield


def quiet_native_exit() -> None:
    """LiteRT destroys a process-wide environment in a C++ static destructor after Python has
    finished, logging INFO lines on the way: point fd 2 at /dev/null once everything
    Python-side has been said (run from atexit, which runs after an uncaught exception's
    traceback)."""
    sys.stderr.flush()
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    except OSError:
        pass


def quiet_native_exit_at_exit() -> None:
    """Register quiet_native_exit for this process (the CLI, and release's worker processes,
    whose errors reach the parent as the item's failure)."""
    atexit.register(quiet_native_exit)
