"""OUT: its files, the record, and writing inside it only (its locks: locks.py).

Every file infer writes or truncates in OUT is opened without following a link (O_NOFOLLOW)
and must be a regular file (fstat), so nothing outside OUT is ever opened for writing. Writes
are whole (short writes continued) and fsync'd; a failed write leaves no temporary behind.
A disk that stops taking writes (full, over quota, read-only, failing) ends the run with
`OutUnwritable`: the record then holds exactly the batches finished before, and a rerun
resumes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from casm_deploy.common.files import PARTIAL, atomic_file, temporary_of
from casm_deploy.common.paths import check_file, check_folder
from casm_deploy.errors import UserError

RECORD = "boxes.jsonl"
IDENTITY = "infer.json"  # what produced OUT: a rerun must match it to resume
LOCK = ".lock"  # held by the runs writing OUT (locks.py); stays behind, meaningless, after them
PARTS = "parts"  # a sharded run's records, one per shard, until they are merged (shards.py)
SUMMARY = "summary.json"
OWN_FILES = (RECORD, SUMMARY, IDENTITY, LOCK)
# Errors of the disk itself, not of one file: the run stops instead of recording them.
FATAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})
OK_FIELDS = ("width", "height", "box")  # what readers of ok rows use
# and the label fields, all of them or (a masks-only model's rows) none
LABEL_FIELDS = ("class_index", "score")


class OutputError(Exception):
    """An output file that cannot or must not be written; the message is the reason."""


class OutUnwritable(Exception):
    """OUT (or the COCO file's folder) stopped taking writes: full, over quota, read-only or
    failing. What is recorded stays valid; a rerun once there is room resumes."""


def is_fatal(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in FATAL_ERRNOS


def unwritable(error: OSError, folder: Path) -> OutUnwritable:
    """The one-line message of a disk that stopped taking writes, with its free space."""
    try:
        free = f"{shutil.disk_usage(folder).free / 1e6:.1f} MB free"
    except OSError:
        free = "free space unknown"
    return OutUnwritable(
        f"{folder}: cannot write ({error.strerror or error}; {free}); the batch in flight was "
        "not recorded: make room and run the same command again to resume"
    )


def as_user_error(error: Exception, path: Path) -> Exception:
    """What to raise when one of OUT's own files (or the COCO file) cannot be written."""
    if isinstance(error, OutputError):
        return UserError(str(error))
    if is_fatal(error):
        return unwritable(error, path.parent)
    reason = getattr(error, "strerror", None) or error
    return UserError(f"{path}: cannot write ({reason})")


def open_regular(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open of a regular file, never through a link.

    O_NONBLOCK: a FIFO planted there must not hang the run (it has no effect on files).

    Raises:
        OutputError: a symbolic link, or not a regular file, is at `path`.
        OSError: anything else.
    """
    flags |= os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, mode)
    except OSError as error:
        if error.errno == errno.ELOOP:
            reason = "a symbolic link; infer does not write through links"
            raise OutputError(f"{path}: {reason}") from None
        if error.errno in (errno.EISDIR, errno.ENXIO):  # ENXIO: a FIFO with no reader
            raise OutputError(f"{path}: not a regular file") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputError(f"{path}: not a regular file")
    return fd


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written: a write may take fewer bytes than it is given."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "a write wrote nothing")
        view = view[written:]


def write_atomic(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Write `path` (bytes, or chunks of them) through `common.files.atomic_file`: a temporary
    beside it, fsync'd, renamed over it, the folder fsync'd; a reader sees the old file or the
    whole new one.

    The temporary's name is fixed, so a kill leaves no stray file behind for long (the next
    write of the same output replaces it); a link planted there is removed, not followed.
    Each chunk goes through `write_all`, whole, on the temporary's descriptor.

    Raises:
        OutputError: a link or something else than a regular file is at `path`.
        OSError: the write failed (the temporary is removed, `path` is untouched).
    """
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            kind = "a symbolic link" if path.is_symlink() else "not a regular file"
            raise OutputError(f"{path}: {kind}; infer does not replace it")
    except FileNotFoundError:
        pass
    with atomic_file(path) as f:
        for chunk in [data] if isinstance(data, bytes) else data:
            write_all(f.fileno(), chunk)  # unbuffered: nothing is left for the file to flush


def write_own(path: Path, data: bytes | Iterable[bytes]) -> None:
    """write_atomic for one of OUT's own files or the COCO file: a link there is the user's
    to remove (UserError); a full disk stops the run (OutUnwritable)."""
    try:
        write_atomic(path, data)
    except (OutputError, OSError) as error:
        raise as_user_error(error, path) from None


# --- the paths, checked before the first image --------------------------------------------


def check_outputs(out: Path, coco: str) -> None:
    """OUT and the COCO file can be written, before any work: one-line UserErrors otherwise.

    OUT: a folder (or one that can be made), not a dangling link, empty or an infer output,
    with none of its own files a link. The COCO file: not a folder or a link, in a folder that
    is (or can be made), and not one of OUT's own files.
    """
    check_folder(out, "--out")
    if out.is_dir():
        if any(p.name != LOCK for p in out.iterdir()) and not (out / IDENTITY).is_file():
            raise UserError(
                f"--out {out}: not empty and not an infer output (no {IDENTITY}); "
                "choose a new or empty folder"
            )
        for name in OWN_FILES:
            path = out / name
            if path.is_symlink() or (os.path.lexists(path) and not path.is_file()):
                kind = "a symbolic link" if path.is_symlink() else "not a regular file"
                raise UserError(f"{path}: {kind}; remove it (infer does not write through it)")
        parts = out / PARTS
        if parts.is_symlink() or (os.path.lexists(parts) and not parts.is_dir()):
            kind = "a symbolic link" if parts.is_symlink() else "not a folder"
            raise UserError(f"{parts}: {kind}; remove it (infer does not write through it)")
    if not coco:
        return
    path = Path(coco)
    check_file(path, "--coco")
    if len(os.fsencode(temporary_of(path).name)) > _name_max(path.parent):
        raise UserError(f"--coco {path}: file name too long")
    if path.resolve() in {(out / name).resolve() for name in (*OWN_FILES, "masks", "overlays")}:
        raise UserError(f"--coco {path}: would replace OUT's own {path.name}")


def _name_max(folder: Path) -> int:
    """The longest file name (bytes) in `folder`'s file system, or of its nearest parent."""
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def name_limits(folder: Path) -> tuple[int, int]:
    """The longest output file name, leaving room for its temporary's, and the longest path."""
    try:
        path_max = os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError):
        path_max = 4096
    return _name_max(folder) - len(PARTIAL) - 1, path_max


# --- the record -----------------------------------------------------------------------------


def parse(line: bytes) -> dict[str, Any] | None:
    """One record line as a dict, or None for a damaged one (not JSON, or not a record)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict) or not isinstance(row.get("path"), str):
        return None
    status = row.get("status")
    if status == "error":
        return row
    labelled = {key in row for key in LABEL_FIELDS}
    if status == "ok" and all(key in row for key in OK_FIELDS) and len(labelled) == 1:
        return row
    return None


@dataclass
class Recorded:
    """What boxes.jsonl holds: the paths recorded ok and as errors, and its damaged lines."""

    ok: set[str] = field(default_factory=set)
    errors: set[str] = field(default_factory=set)
    damaged: list[int] = field(default_factory=list)  # line numbers, from 1

    @property
    def done(self) -> set[str]:
        return self.ok | self.errors


def read_record(path: Path) -> Recorded:
    """What boxes.jsonl holds. A last line cut short (no newline: a kill during the append) is
    removed from the file, and its file done again. A damaged line elsewhere is kept as it is
    (bytes infer cannot read may still be someone's) and skipped, here and by every reader;
    its file, if it had one, is done again, so each file keeps one good line.
    """
    recorded = Recorded()
    if not os.path.lexists(path):
        return recorded
    try:
        fd = open_regular(path, os.O_RDWR)
    except (OutputError, OSError) as error:
        raise as_user_error(error, path) from None
    with os.fdopen(fd, "rb") as f:
        good_end = 0
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                break  # the torn last line
            good_end += len(line)
            row = parse(line)
            if row is None:
                recorded.damaged.append(number)
            elif row["status"] == "ok":
                recorded.ok.add(row["path"])
            else:
                recorded.errors.add(row["path"])
        if good_end < os.fstat(fd).st_size:
            try:
                os.ftruncate(fd, good_end)
            except OSError as error:
                raise as_user_error(error, path) from None
    return recorded


def rows(path: Path) -> Iterator[dict[str, Any]]:
    """The good rows of boxes.jsonl, damaged lines skipped."""
    with open(path, "rb") as f:
        for line in f:
            row = parse(line)
            if row is not None:
                yield row


def drop_errors(path: Path) -> None:
    """Rewrite boxes.jsonl without its error rows (their files are done again, each still with
    one line), through a temporary and a rename; damaged lines are kept as they are."""

    def kept() -> Iterator[bytes]:
        with open(path, "rb") as f:
            for line in f:
                row = parse(line)
                if row is None or row["status"] != "error":
                    yield line

    write_own(path, kept())


class Record:
    """boxes.jsonl opened for appending whole batches, each fsync'd. A failed append is cut
    back to the last good length: the file never ends in a torn line the run wrote.

    Raises:
        OutUnwritable: from `append`, when the disk takes no more (the batch is not recorded).
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            self.fd = open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        except (OutputError, OSError) as error:
            raise as_user_error(error, path) from None
        self.size = os.fstat(self.fd).st_size

    def append(self, text: str) -> None:
        data = text.encode()
        try:
            write_all(self.fd, data)
            os.fsync(self.fd)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)
            raise unwritable(error, self.path.parent) from None
        self.size += len(data)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Record:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
