"""Output paths, checked before any work: a folder that is (or can be made), a file that is not
a folder or a link, each somewhere writable.

Every command that writes calls these first, so a mistyped --out or --json is a one-line
UserError naming the option, not a traceback after minutes of work.
"""

from __future__ import annotations

import os
from pathlib import Path

from casm_deploy.errors import UserError


def check_folder(folder: Path, option: str) -> None:
    """`option`'s `folder` is a folder, or can be made: not a file, not a dangling link, and
    its nearest existing parent is a writable folder.

    Raises:
        UserError: naming `option`, the folder and what is wrong.
    """
    if folder.is_symlink() and not folder.exists():
        raise UserError(f"{option} {folder}: a dangling symbolic link")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {folder}: exists and is not a folder")
    _check_parents(folder, option, folder)


def check_file(path: Path, option: str) -> None:
    """`option`'s `path` can be written as a file: not a folder, a link or another kind of
    file (a FIFO, a device), writable if it exists, in a folder that is or can be made.

    Raises:
        UserError: naming `option`, the file and what is wrong.
    """
    if path.is_symlink():
        raise UserError(f"{option} {path}: a symbolic link; it is not written through")
    if path.is_dir():
        raise UserError(f"{option} {path}: a folder; give a file name")
    if path.exists() and not path.is_file():
        raise UserError(f"{option} {path}: not a regular file")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{option} {path}: not writable")
    _check_parents(path.parent, option, path)


def _check_parents(folder: Path, option: str, given: Path) -> None:
    """The nearest existing one of `folder` and its parents is a writable folder."""
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {given}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option} {given}: {existing} is not writable")
