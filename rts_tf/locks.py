"""Folder locks: one command at a time writes into an output folder (fit's logdir, predict's and build's out).

The lock is the operating system's (`flock` on the folder itself), held for the life of the
command and released by the kernel on any exit, a `kill -9` included: a killed command never
blocks the next one, and nothing is written into the folder for it. A second command on a folder
in use refuses at once, naming the folder and the process that holds it (read from /proc/locks).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import json
import os
from pathlib import Path
from typing import Callable, Iterator

from rts_tf.errors import InputError

# flock's errors on file systems that do not lock (some Lustre and old NFS mounts).
UNLOCKABLE = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


def lock_holder(descriptor: int) -> str:
    """'process PID (command line)' holding a flock on the file of `descriptor`, as far as this
    system says (Linux: /proc/locks), else 'another process'."""
    info = os.fstat(descriptor)
    inode = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1636 fe:00:2245598 0 EOF"
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode:
                    pid = int(fields[4])
                    return f"process {pid} ({command_line(pid)})"
    except (OSError, ValueError):
        pass
    return "another process"


def command_line(pid: int) -> str:
    try:
        parts = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "command line unknown"
    text = " ".join(" ".join(part.decode(errors="replace").split()) for part in parts if part)  # one line
    return (text[:300] + " ...") if len(text) > 300 else text or "command line unknown"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, option: str = "--out") -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (created if missing; removed again on exit when this
    created it and it is still empty, so a refused command leaves nothing behind). Raises an
    InputError naming the folder and the holding process when another command holds it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():  # the command itself says so, in its words
        yield folder
        return
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise InputError(f"{folder}: {option} is in use by {lock_holder(descriptor)}; wait for it to end "
                                 "or choose another folder (nothing was changed)") from None
            if error.errno not in UNLOCKABLE:  # a file system without locks: run unlocked, as before
                raise
        try:
            yield folder
        finally:
            if created:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when still empty
    finally:
        os.close(descriptor)  # releases the lock


def locks_folder(parameter: str, option: str) -> Callable:
    """Make a library function hold folder_lock on its argument `parameter` (the folder of the
    command line's `option`) while it runs: one line at each command's entry point."""
    def decorate(function: Callable) -> Callable:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            folder = bound.arguments[parameter]
            if not folder:  # left out: the function says what is missing
                return function(*args, **kwargs)
            with folder_lock(folder, option):
                return function(*args, **kwargs)
        return locked
    return decorate


def is_chief_task() -> bool:
    """True unless TF_CONFIG names this process a non-chief worker of a multi-worker run: the
    workers of one run share its logdir, and only the chief holds the lock."""
    try:
        config = json.loads(os.environ.get("TF_CONFIG") or "{}")
        cluster, task = config.get("cluster", {}), config.get("task", {})
    except (json.JSONDecodeError, AttributeError):
        return True
    if not cluster or not task:
        return True
    kind, index = task.get("type"), int(task.get("index", 0))
    return kind == "chief" or (kind == "worker" and index == 0 and "chief" not in cluster)
