"""User-facing errors: problems with a user's input or disk, reported as one line without a traceback."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import threading
from pathlib import Path

# Errors of the file system that a user fixes (free space, another folder), not bugs.
DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EDQUOT: "disk quota exceeded"}


class InputError(ValueError):
    """A problem with a user's file, folder or option; its message names the file and the reason."""


class OutputError(InputError):
    """A write that failed for a reason of the output's disk or folder (full, read-only, forbidden):
    it concerns every job of a command, not one bad input, so a command stops at the first."""


# A write error of a library that does not say why (GDAL: "IO error writing tag data") counts as a
# full disk when the disk has less than this left.
NEARLY_FULL_BYTES = 16 * 2 ** 20


def disk_problem(error: BaseException, path: str | os.PathLike | None = None) -> str | None:
    """The reason when an error is a full, read-only or forbidden disk (OSError, TensorFlow's or
    GDAL's), else None. With `path`, a bare write error on a nearly full disk counts as full."""
    if isinstance(error, OSError) and error.errno in DISK_ERRORS:
        return DISK_ERRORS[error.errno]
    # GDAL's own words (a TIFF write error, say) may be in an error that this one was raised from.
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    text = "\n".join(chain)
    if path is not None and ("io error" in text.lower() or "write error" in text.lower()):
        existing = Path(path)
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        free = shutil.disk_usage(existing).free
        if free < NEARLY_FULL_BYTES:
            return f"no space left on device ({free // 1024} KiB free; {text.strip().splitlines()[0]})"
    if "Free disk space available is" in text:  # GDAL checks before it writes a GeoTIFF, and says how much
        return "no space left on device (" + text.strip().splitlines()[0].split(". You can")[0] + ")"
    for code, reason in DISK_ERRORS.items():
        if os.strerror(code) in text:
            return reason
    return None


def output_error(path: str | os.PathLike, error: BaseException) -> OutputError:
    """A one-line error for a failed write of `path`: the file and what to do."""
    reason = disk_problem(error, path)
    if reason is None:
        return OutputError(f"{path}: cannot write: {str(error).strip().splitlines()[0] if str(error) else error!r}")
    if reason.startswith("no space left on device"):
        reason, extra = "no space left on device", reason[len("no space left on device"):].rstrip()
    else:
        extra = ""
    hint = {"no space left on device": "free space or choose another folder, then run the command again "
                                       "(finished work is kept)",
            "disk quota exceeded": "free space or choose another folder, then run the command again",
            "read-only file system": "choose a writable folder"}.get(reason, "check the folder's permissions")
    return OutputError(f"{path}: cannot write: {reason}{extra}; {hint}")


class Terminated(KeyboardInterrupt):
    """SIGTERM (what batch schedulers send before a kill), raised in the main thread like Ctrl-C, so
    the same clean-up runs (temporaries, Ray shut down, the folder lock released) and a command
    resumes where it stopped when run again."""


terminated = threading.Event()  # set once SIGTERM arrived (see terminate_like_interrupt)


@contextlib.contextmanager
def terminate_like_interrupt():
    """Within the block, SIGTERM raises Terminated in this process's main thread (Python's default
    ends the process at once, without clean-up and without a word); the previous handler after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        terminated.set()  # libraries (Ray) may turn the exception into a plain KeyboardInterrupt
        raise Terminated()

    terminated.clear()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
