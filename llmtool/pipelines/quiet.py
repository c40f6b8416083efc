"""Silence third-party libraries that print (progress bars, reports, import warnings):
a pipeline never prints, the CLI does."""

from __future__ import annotations

import os
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
