"""Writing output files safely: the one helper every llmtool writer uses.

    from llmtool.files import atomic_output

    with atomic_output(output, inputs=[checkpoint, tokenizer]) as tmp:
        write_everything_to(tmp)          # any writer that takes a path
    # here `output` exists, complete; on any error (or SIGTERM / Ctrl-C) it was never touched

What it guarantees:
- An output that is one of the inputs (the same path, a symlink to it, or a hard link: the
  same inode) is refused before anything is written, naming both files.
- The data goes to a temporary file in the output's folder (`.<name>.llmtool-<pid>.tmp`),
  fsynced and renamed over the output only when complete, so the output is either the old
  file or the whole new one.
- The temporary file is removed on any exception, on Ctrl-C, and on SIGTERM (the handler is
  installed while a write is in progress, in the main thread, if nobody else handles SIGTERM).
  Temporary files left by processes that no longer exist (SIGKILL, power loss) are removed the
  next time anything is written to that folder.
- Errors name the real output, never the temporary name.

`write_bytes(path, data)` is the one-shot form for small files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from llmtool.errors import LlmToolError

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.llmtool-(?P<pid>\d+)\.tmp$")
_live: set[Path] = set()  # temporary files being written by this process
_live_lock = threading.Lock()
_previous_handler: object = None
_handler_depth = 0
_swept: set[str] = set()  # folders already cleaned of stale temporaries by this process


def temporary_name(path: Path) -> Path:
    """Where `path` is written before the rename (same folder: the rename is atomic)."""
    return path.with_name(f".{path.name}.llmtool-{os.getpid()}.tmp")


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when a and b are the same file on disk (path, symlink or hard link)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def refuse_overlap(output: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Raise LlmToolError when writing `output` would replace one of `inputs`."""
    out = Path(output)
    for item in inputs:
        if item is None:
            continue
        src = Path(item)
        if src.is_dir():
            if out.exists() and same_file(out, src):
                raise LlmToolError(f"the output is the input folder {src}", out)
            continue
        if same_file(out, src) and (src.exists() or out.exists()):
            raise LlmToolError(
                f"the output is the same file as the input {src} (a path, symlink or hard "
                "link to it); choose another output name",
                out,
            )


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove `.<name>.llmtool-<pid>.tmp` files in `folder` whose process has ended."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TMP_RE.match(name)
        if m is None or _pid_alive(int(m.group("pid"))):
            continue
        path = Path(folder) / name
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed


def _on_sigterm(signum: int, frame: object) -> None:
    with _live_lock:
        for tmp in list(_live):
            with contextlib.suppress(OSError):
                tmp.unlink()
    # Unwind like Ctrl-C does, so every `finally` runs; exit status 128 + SIGTERM.
    raise SystemExit(128 + signum)


def exit_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C for the whole process (the CLI calls this), so every
    `finally` and every atomic_output cleans up; the exit status stays 128 + SIGTERM."""
    signal.signal(signal.SIGTERM, _on_sigterm)


@contextlib.contextmanager
def _sigterm_cleanup() -> Iterator[None]:
    """Install the SIGTERM handler for the duration of a write (main thread, default only)."""
    global _previous_handler, _handler_depth
    installed = False
    if threading.current_thread() is threading.main_thread():
        current = signal.getsignal(signal.SIGTERM)
        if current is not _on_sigterm and (_handler_depth or current in (signal.SIG_DFL, None)):
            if _handler_depth == 0:
                _previous_handler = current
                signal.signal(signal.SIGTERM, _on_sigterm)
            _handler_depth += 1
            installed = True
    try:
        yield
    finally:
        if installed:
            _handler_depth -= 1
            if _handler_depth == 0:
                signal.signal(signal.SIGTERM, _previous_handler or signal.SIG_DFL)


def _rename_error(exc: OSError, tmp: Path, output: Path) -> LlmToolError:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        reason = "no space left on the device"
    text = str(reason).replace(str(tmp), str(output))
    return LlmToolError(f"cannot write ({text})", output)


@contextlib.contextmanager
def atomic_output(
    path: str | Path, inputs: Iterable[str | Path | None] = (), fsync: bool = True
) -> Iterator[Path]:
    """Yield a temporary path to write; rename it to `path` when the block succeeds.

    `inputs`: the files the output is made from (refused as outputs). `fsync=False` skips
    flushing to the disk before the rename (for many small files whose completeness another
    file marks, like the per-tensor folder's layer_info.txt).
    """
    output = Path(path)
    refuse_overlap(output, inputs)
    if output.is_dir():
        raise LlmToolError("the output is a folder; give a file name", output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LlmToolError(
            f"cannot create the output folder ({exc.strerror or exc})", output.parent
        ) from None
    folder = os.path.abspath(output.parent)
    if folder not in _swept:
        _swept.add(folder)
        remove_stale_temporaries(folder)
    tmp = temporary_name(output)
    with _sigterm_cleanup():
        with _live_lock:
            _live.add(tmp)
        try:
            try:
                yield tmp
                if not tmp.exists():
                    raise LlmToolError("the writer produced no file", output)
                if fsync:
                    with open(tmp, "rb+") as f:
                        os.fsync(f.fileno())
                os.replace(tmp, output)
            except OSError as exc:
                if exc.filename is not None and Path(exc.filename) not in (tmp, output):
                    raise
                raise _rename_error(exc, tmp, output) from None
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        finally:
            with _live_lock:
                _live.discard(tmp)


def write_bytes(
    path: str | Path, data: bytes, inputs: Iterable[str | Path | None] = (), fsync: bool = True
) -> None:
    """Write a small file atomically (see atomic_output)."""
    with atomic_output(path, inputs, fsync) as tmp:
        tmp.write_bytes(data)
