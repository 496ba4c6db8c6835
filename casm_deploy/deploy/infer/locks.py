"""OUT's locks: which infer processes may write OUT at the same time.

Every lock is a flock, which the kernel releases when its process ends, even by kill -9, so a
killed run never leaves OUT locked.

  OUT (the folder)             exclusive while a process sets OUT up or merges (short): the
                               checks of OUT, infer.json and parts/ are made by one at a time
  OUT/.lock                    exclusive: a single-process run, or a merge; shared: each shard
  OUT/parts/part-K-of-N.lock   exclusive: shard K of N, so no two processes do one share
  OUT/parts/of-N.lock          shared: every running shard of N; a shard of another N does not
                               start while it is held (its shares would be other files)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from casm_deploy.deploy.infer.outfolder import (
    LOCK,
    OutputError,
    as_user_error,
    open_regular,
    write_all,
)
from casm_deploy.errors import UserError


def hold(path: Path, exclusive: bool, wait: bool = False) -> int | None:
    """flock `path` (made if missing): its descriptor, or None where another process holds it
    (without `wait`). Closing the descriptor releases the lock.

    Raises:
        UserError: the file is a link or cannot be opened, or its file system has no locks.
    """
    try:
        fd = open_regular(path, os.O_RDWR | os.O_CREAT)
    except (OutputError, OSError) as error:
        raise as_user_error(error, path) from None
    try:
        fcntl.flock(
            fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
        )
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as error:  # a file system without locks: exactly-once is not sure there
        os.close(fd)
        raise UserError(f"{path}: cannot lock ({error.strerror or error})") from None
    return fd


@contextlib.contextmanager
def folder_lock(folder: Path, exclusive: bool = True) -> Iterator[None]:
    """The folder itself locked (flock on its descriptor), waiting for the holder: held while
    OUT is checked and set up, so that processes starting together see it one at a time."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError as error:  # a file system without locks: exactly-once is not sure there
            raise UserError(f"{folder}: cannot lock ({error.strerror or error})") from None
        yield
    finally:
        os.close(fd)


class Lock:
    """OUT/.lock: held exclusively by a single-process run (or a merge), shared by each shard
    of a sharded one, with the pid, host and start time of the last to take it.

    Raises:
        UserError: another run holds it (named), or .lock is a link or not a file.
        OutUnwritable: OUT's disk takes no writes.
    """

    def __init__(self, out: Path, shared: bool = False, note: str = ""):
        path = out / LOCK
        fd = hold(path, exclusive=not shared)
        if fd is None:
            with open(path, "rb") as f:
                holder = _holder(f.read(4096))
            # a shard is kept out by a single-process run or a merge; those by anything
            kind = "a single-process infer run or a merge" if shared else "another infer run"
            raise UserError(
                f"--out {out}: in use by {kind} ({holder}); wait for it to end or choose "
                "another --out"
            )
        self.fd = fd
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
        if note:
            holder["note"] = note
        try:
            os.ftruncate(self.fd, 0)
            write_all(self.fd, (json.dumps(holder) + "\n").encode())
            os.fsync(self.fd)
        except OSError as error:
            self.close()
            raise as_user_error(error, path) from None

    def close(self) -> None:
        os.close(self.fd)  # releases the lock

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _holder(data: bytes) -> str:
    try:
        holder = json.loads(data)
        note = f", {holder['note']}" if holder.get("note") else ""
        return f"pid {holder['pid']} on {holder['host']}{note}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "its pid is not written yet"
