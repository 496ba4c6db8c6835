"""An untrusted archive read by the names a layout gives, never extracted: a zip file, or the
folder it was extracted to (`tinyimagenet.py` reads Tiny ImageNet's through it).

`open_source(SRC)` finds the top folder (the one holding `marker`, e.g. wnids.txt: SRC itself
or its one subfolder, or in a zip the one top-level folder that holds it) and indexes what is
under it. Nothing is ever written from a member's name: the caller asks for the paths of its
layout (`member`, `listing`) and builds every output path itself.

What the index refuses, each named so the caller can warn of it and go on (`unsafe`, `refusal`):
a zip member whose name is absolute or has a `..` component; a link (a zip member whose
`external_attr` says S_IFLNK; in a folder, a symbolic link seen by lstat, never followed) or
anything else that is not a regular file; a member larger than its cap, or in a zip one that
inflates more than `MAX_RATIO` times its stored size, both read from the header before any
byte is inflated (zipfile's reader never yields more than the header's `file_size`). A damaged
zip (not a zip, a bad CRC, a truncated member) is a UserError naming the member.
"""

from __future__ import annotations

import lzma
import os
import re
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from casm_deploy.errors import UserError

MAX_RATIO = 100  # the most a zip member may inflate: JPEGs hardly shrink, text by 3 to 10
# What zipfile raises on a damaged archive or member (a bad CRC is a BadZipFile).
DAMAGED = (
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    OSError,
    NotImplementedError,  # an unknown compression method
    RuntimeError,  # an encrypted member
)


@dataclass(frozen=True)
class Member:
    """A file under the top folder: `rel` its "/"-separated path there, `size` the bytes it
    holds (a zip header's `file_size`), `stored` the bytes it takes in the archive."""

    rel: str
    size: int
    stored: int
    link: bool = False
    regular: bool = True
    info: Any = None  # a zip member's ZipInfo


def refusal(member: Member, cap: int) -> str:
    """Why `member` is not read ("" when it may be), from its header alone."""
    if member.link:
        return "a symbolic link, not followed"
    if not member.regular:
        return "not a regular file"
    if member.size > MAX_RATIO * max(member.stored, 1):
        return (
            f"inflates from {member.stored:,} to {member.size:,} bytes "
            f"(over {MAX_RATIO}x its stored size)"
        )
    if member.size > cap:
        return f"{member.size:,} bytes, over the limit of {cap:,}"
    return ""


def shown(name: str) -> str:
    """A member's name as one line of a message: as it is, or escaped where it has control
    characters (a name is the archive's, and may hold a newline)."""
    return name if name.isprintable() else ascii(name)


def unsafe_name(name: str) -> bool:
    """A member name that points outside wherever it would be extracted."""
    parts = re.split(r"[/\\]", name)
    return name.startswith(("/", "\\")) or bool(re.match(r"[A-Za-z]:", name)) or ".." in parts


class Source:
    """SRC's top folder, a zip's or a folder's; `where(rel)` names a member in messages."""

    def __init__(self, path: Path, top: str, root: Path):
        self.path, self.top = path, top
        self.root = root  # what holds the members on disk: the zip file, or the top folder
        self.unsafe: list[str] = []  # member names refused outright (a zip's)

    def where(self, rel: str) -> str:
        return shown(str(self.path / self.top / rel))

    def text(self, rel: str, cap: int) -> str:
        """A required text file of the layout, as text.

        Raises:
            UserError: it is missing, refused (`refusal`), damaged, or not UTF-8.
        """
        member = self.member(rel)
        if member is None:
            raise UserError(f"{self.where(rel)}: missing")
        reason = refusal(member, cap)
        if reason:
            raise UserError(f"{self.where(rel)}: {reason}; refused")
        try:
            return self.read(member, cap).decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise UserError(f"{self.where(rel)}: not UTF-8 text ({error.reason})") from None

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass


class ZipSource(Source):
    def __init__(self, path: Path, archive: zipfile.ZipFile, marker: str):
        self.archive = archive
        members: dict[str, zipfile.ZipInfo] = {}
        unsafe = []
        for info in archive.infolist():
            if unsafe_name(info.filename):
                unsafe.append(info.filename)
            elif not info.is_dir():
                members[info.filename] = info
        super().__init__(path, _zip_top(path, members, marker), path)
        self.unsafe = unsafe
        # Members may share their compressed bytes (overlapping entries): what all of them
        # inflate to is capped too, at MAX_RATIO times the archive's size.
        self.budget = MAX_RATIO * max(path.stat().st_size, 1 << 20)
        prefix = f"{self.top}/" if self.top else ""
        self.members = {
            name[len(prefix) :]: info for name, info in members.items() if name.startswith(prefix)
        }
        self.folders: dict[str, list[str]] = {}
        for rel in self.members:
            folder, _, _ = rel.rpartition("/")
            self.folders.setdefault(folder, []).append(rel)

    def where(self, rel: str) -> str:
        return f"{self.path}:{shown(f'{self.top}/{rel}' if self.top else rel)}"

    def member(self, rel: str) -> Member | None:
        info = self.members.get(rel)
        if info is None:
            return None
        link = stat.S_ISLNK(info.external_attr >> 16)
        return Member(rel, info.file_size, info.compress_size, link=link, info=info)

    def listing(self, folder: str) -> list[Member] | None:
        """The files directly in `folder` (a path of the layout), by name; None: no such folder."""
        names = self.folders.get(folder)
        return None if names is None else [self.member(rel) for rel in sorted(names)]

    def read(self, member: Member, cap: int) -> bytes:
        self.budget -= member.size
        if self.budget < 0:
            raise UserError(
                f"{self.path}: its members inflate to over {MAX_RATIO}x its size "
                "(members that share their data?); refused"
            )
        try:
            with self.archive.open(member.info) as f:
                data = f.read(cap + 1)
        except DAMAGED as error:
            raise UserError(f"{self.where(member.rel)}: damaged zip member ({error})") from None
        if len(data) != member.size:
            raise UserError(
                f"{self.where(member.rel)}: damaged zip member ({len(data):,} bytes, "
                f"its header says {member.size:,})"
            )
        return data

    def identity(self) -> dict[str, Any]:
        st = self.path.stat()
        return {
            "path": str(self.path),
            "kind": "zip",
            "top": self.top,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
        }

    def close(self) -> None:
        self.archive.close()


def _zip_top(path: Path, members: dict[str, Any], marker: str) -> str:
    tops = sorted(
        {name.rpartition("/")[0] for name in members if name.rpartition("/")[2] == marker}
    )
    tops = [top for top in tops if "/" not in top]
    if len(tops) != 1:
        found = "none" if not tops else ", ".join(f"{t or '.'}/{marker}" for t in tops)
        raise UserError(
            f"{path}: need one {marker} at the top or in one top folder, found {found} "
            "(not Tiny ImageNet's layout?)"
        )
    return tops[0]


class FolderSource(Source):
    def member(self, rel: str) -> Member | None:
        folder, _, name = rel.rpartition("/")
        if not self._folder(folder):
            return None
        try:
            st = os.lstat(self.path / self.top / rel)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise UserError(f"{self.where(rel)}: cannot read ({error.strerror})") from None
        return self._member(rel, st)

    @staticmethod
    def _member(rel: str, st: os.stat_result) -> Member:
        link = stat.S_ISLNK(st.st_mode)
        regular = stat.S_ISREG(st.st_mode)
        return Member(rel, st.st_size, st.st_size, link=link, regular=regular)

    def _folder(self, folder: str) -> bool:
        """Whether `folder` (under the top) is a real folder; a link on its way is an error."""
        path = self.path / self.top
        for part in folder.split("/") if folder else ():
            path = path / part
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return False
            except OSError as error:
                raise UserError(f"{path}: cannot read ({error.strerror})") from None
            if stat.S_ISLNK(st.st_mode):
                raise UserError(f"{path}: a symbolic link where a folder should be; not followed")
            if not stat.S_ISDIR(st.st_mode):
                return False
        return True

    def listing(self, folder: str) -> list[Member] | None:
        """The files directly in `folder` (a path of the layout), by name; None: no such folder."""
        if not self._folder(folder):
            return None
        prefix = f"{folder}/" if folder else ""
        try:
            with os.scandir(self.path / self.top / folder) as entries:
                found = [
                    self._member(prefix + e.name, e.stat(follow_symlinks=False))
                    for e in entries
                    if not e.is_dir(follow_symlinks=False)
                ]
        except OSError as error:
            raise UserError(f"{self.where(folder)}: cannot list ({error.strerror})") from None
        return sorted(found, key=lambda m: m.rel)

    def read(self, member: Member, cap: int) -> bytes:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.path / self.top / member.rel, flags)
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise UserError(f"{self.where(member.rel)}: not a regular file")
                data = f.read(cap + 1)
        except OSError as error:
            raise UserError(f"{self.where(member.rel)}: cannot read ({error.strerror})") from None
        if len(data) > cap:
            raise UserError(f"{self.where(member.rel)}: grew past {cap:,} bytes while read")
        return data

    def identity(self) -> dict[str, Any]:
        top = self.path / self.top
        return {
            "path": str(self.path),
            "kind": "folder",
            "top": self.top,
            "mtime_ns": [_mtime(top / rel) for rel in (".", "train", "val")],
        }


def _mtime(path: Path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def open_source(src: str | Path, marker: str) -> Source:
    """SRC as a Source: a zip file, or a folder holding `marker` itself or in one subfolder.

    Raises:
        UserError: SRC is missing, neither a zip nor a folder, a damaged zip, or has no
            (or more than one) top folder holding `marker`.
    """
    path = Path(src).absolute()
    if path.is_dir():
        top = _folder_top(path, marker)
        return FolderSource(path, top, path / top)
    if not path.exists():
        raise UserError(f"{src}: no such file or folder")
    if not path.is_file():
        raise UserError(f"{src}: neither a zip file nor a folder")
    try:
        archive = zipfile.ZipFile(path)
    except DAMAGED as error:
        raise UserError(f"{src}: not a zip file, or a damaged one ({error})") from None
    try:
        return ZipSource(path, archive, marker)
    except BaseException:
        archive.close()
        raise


def _folder_top(path: Path, marker: str) -> str:
    if os.path.lexists(path / marker):
        return ""
    try:
        with os.scandir(path) as entries:
            tops = sorted(
                e.name
                for e in entries
                if e.is_dir(follow_symlinks=False) and os.path.lexists(Path(e.path) / marker)
            )
    except OSError as error:
        raise UserError(f"{path}: cannot list ({error.strerror})") from None
    if len(tops) != 1:
        found = "none" if not tops else ", ".join(f"{t}/{marker}" for t in tops)
        raise UserError(
            f"{path}: need {marker} in it or in one subfolder, found {found} "
            "(not Tiny ImageNet's layout?)"
        )
    return tops[0]


__all__ = ["MAX_RATIO", "Member", "Source", "open_source", "refusal", "shown", "unsafe_name"]
