"""The output folder of `data tiny-imagenet` (`tinyimagenet.py`): whether it already holds this
conversion, the staging folder a conversion is written into, and moving it in place.

OUT holds a conversion when its record, `tiny-imagenet.json`, is there: the record is written
last, after `train/`, `val/`, `annotations/` and `classes.txt` are moved in from
`OUT/.tiny-imagenet.partial/`, and removed first when a conversion replaces them. So an error
leaves OUT as it was (the staging folder and the folders this run made are removed), and a kill
leaves at most the staging folder (and, during the moves, part of what it held), which marks
OUT as ours: the next run removes it and converts again.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from casm_deploy.common.files import make_folders, remove_owned, write_atomic
from casm_deploy.config import json_ready
from casm_deploy.errors import UserError

RECORD = "tiny-imagenet.json"
STAGING = ".tiny-imagenet.partial"
MOVED = ("train", "val", "annotations", "classes.txt")
OWNED = (RECORD, *MOVED, STAGING)  # what --overwrite replaces; nothing else in OUT
NEW, SETTLED = "new", "settled"  # Output.state: to convert, or already this conversion


class Output:
    """OUT, checked against `key` (what a conversion's record must say to be this one).

    `state` is SETTLED when OUT already holds this conversion (and --overwrite is off), else
    NEW.

    Raises:
        UserError: OUT is a file, overlaps the source (`source`: its top folder or zip file),
            holds another conversion, or is a non-empty folder of something else, and
            `overwrite` is off.
    """

    def __init__(self, out: Path, key: dict[str, Any], overwrite: bool, source: Path):
        self.out, self.key, self.overwrite = out, json_ready(key), overwrite
        _check_apart(out, source)
        self.moving = False
        self.state = self._check()

    def _check(self) -> str:
        out = self.out
        if not os.path.lexists(out):
            return NEW
        if not out.is_dir():
            raise UserError(f"{out} exists and is not a folder")
        record = out / RECORD
        if record.is_file() and not self.overwrite:
            old = self.recorded()
            if {"source": old.get("source"), "wnids": old.get("wnids")} == self.key:
                remove_owned(out, [STAGING])  # a later --overwrite's, killed before its moves
                return SETTLED
            held = (
                f"{len(old.get('wnids') or [])} classes of {(old.get('source') or {}).get('path')}"
            )
            raise UserError(
                f"{out} already holds a Tiny ImageNet conversion of other settings ({held}); "
                "pass --overwrite to replace it, or choose another folder"
            )
        ours = record.is_file() or os.path.lexists(out / STAGING)
        if not ours and any(out.iterdir()) and not self.overwrite:
            raise UserError(
                f"{out} is not empty and holds no {RECORD} (not a Tiny ImageNet conversion); "
                "pass --overwrite to write into it anyway (only train/, val/, annotations/, "
                f"classes.txt and {RECORD} are replaced), or choose another folder"
            )
        return NEW

    def recorded(self) -> dict[str, Any]:
        """OUT's record ({} when it cannot be read)."""
        try:
            record = json.loads((self.out / RECORD).read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    @contextlib.contextmanager
    def staging(self, folders: Iterable[str]) -> Iterator[Path]:
        """OUT/.tiny-imagenet.partial/ (an old one removed first) with `folders` in it; on any
        error it is removed, with OUT and its parents where this run made them."""
        made = []
        folder = self.out
        while not os.path.lexists(folder):  # the folders make_folders is about to make
            made.append(folder)
            folder = folder.parent
        stage = self.out / STAGING
        try:
            make_folders(self.out)
            remove_owned(self.out, [STAGING])  # a killed run's; a link there is not followed
            os.mkdir(stage)
            for name in folders:
                make_folders(stage / name)
            yield stage
        except BaseException:
            with contextlib.suppress(OSError):
                remove_owned(self.out, [STAGING, *(MOVED if self.moving else ())])
            for path in made:  # deepest first, each only if empty
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            raise

    def settle(self, stage: Path, classes: dict[str, str], record: dict[str, Any]) -> None:
        """Move the staged conversion into OUT, replacing what a conversion owns there, and
        write its `record` last (with this Output's key)."""
        lines = "".join(f"{wnid} {name}\n" for wnid, name in classes.items())
        (stage / "classes.txt").write_text(lines)
        self.moving = True
        remove_owned(self.out, (RECORD, *MOVED))  # the record first: no record, no conversion
        for name in MOVED:
            os.rename(stage / name, self.out / name)
        write_atomic(
            self.out / RECORD, json.dumps(json_ready({**record, **self.key}), indent=2) + "\n"
        )
        os.rmdir(stage)


def _check_apart(out: Path, source: Path) -> None:
    """Refuse an OUT inside the source, or a source inside what a conversion replaces."""
    out, source = out.resolve(), source.resolve()
    if out == source or source in out.parents:
        raise UserError(f"{out}: inside the source {source}; choose an output folder outside it")
    for name in OWNED:
        if (out / name) == source or (out / name) in source.parents:
            raise UserError(
                f"{source}: the source is inside {out / name}, which the conversion replaces; "
                "choose another output folder"
            )


__all__ = ["MOVED", "NEW", "OWNED", "RECORD", "SETTLED", "STAGING", "Output"]
