"""Writing a file so that a reader sees the old one or the whole new one, never half of it;
making and removing folders at any depth.

Checkpoints, metrics logs, synth.json and every file infer writes in OUT go through
`atomic_file`: a temporary beside the target (opened without following a link), fsync'd,
renamed over the target, and the folder fsync'd so the rename survives a crash too.

Folders are made by `make_folders` and removed by `remove_tree`, never by
`Path.mkdir(parents=True)`, `os.makedirs` or `shutil.rmtree`: each of those recurses once per
folder level (rmtree until Python 3.12), so a file 1,000 folders deep in a user's tree, whose
mask infer writes at the same depth, would overflow Python's stack.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

PARTIAL = ".partial"  # the temporary's suffix: `.<name>.partial` beside the file


def temporary_of(path: Path) -> Path:
    """The fixed scratch name of `path`: a kill leaves at most this one stray file, which the
    next write of the same file replaces."""
    return path.with_name(f".{path.name}{PARTIAL}")


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write `path` through; on leaving the block it replaces `path` whole.

    A link or anything planted at the temporary's name is removed, not followed. If the block
    raises, the temporary is removed and `path` is untouched.
    """
    path = Path(path)
    temporary = temporary_of(path)
    with contextlib.suppress(FileNotFoundError):
        if temporary.is_symlink() or not temporary.is_file():
            os.unlink(temporary)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        with os.fdopen(os.open(temporary, flags, 0o644), "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    sync_folder(path.parent)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """`atomic_file` for data already in memory (text is written as UTF-8)."""
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def sync_folder(folder: Path) -> None:
    """fsync a folder, which makes a rename inside it durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_folders(folder: str | Path) -> None:
    """`folder` and its missing parents, made one at a time from the nearest existing one down
    (no recursion: any depth the file system allows).

    Raises:
        NotADirectoryError: a component is a file (or a link to one, or a dangling link).
        OSError: anything else the file system refuses (a path too long, no permission).
    """
    folder = Path(folder)
    missing = []
    while not folder.is_dir():  # a link to a folder is a folder, as for mkdir -p
        if os.path.lexists(folder):
            if folder.is_dir():  # made meanwhile, by another thread or process
                break
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(folder))
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            os.mkdir(path)
        except FileExistsError:  # made meanwhile by another process: fine if a folder
            if not path.is_dir():
                raise


def remove_tree(folder: str | Path) -> None:
    """Delete `folder` and everything under it, deepest first, without recursion; a link is
    removed, never followed."""
    stack = [(Path(folder), False)]
    while stack:
        path, emptied = stack.pop()
        if emptied:
            os.rmdir(path)
            continue
        stack.append((path, True))  # removed once everything pushed after it is gone
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append((Path(entry.path), False))
                else:
                    os.unlink(entry.path)


def remove_owned(folder: Path, names: Iterable[str]) -> None:
    """Delete from `folder` only the entries a command writes there (`names`), so that
    `--overwrite` never touches anything else in a folder the user named: a link among them is
    removed, never followed."""
    for name in names:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            remove_tree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
