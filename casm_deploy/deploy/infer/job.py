"""`casm-deploy infer`: every image file under a folder -> masks, boxes and labels; resumable.
A masks-only model (`export --masks-only`) gives masks and boxes, and rows without labels.

scan (streamed) -> read_image in threads, a few batches ahead -> backend (this thread) ->
mask files written in threads -> boxes.jsonl appended and fsync'd per batch, the record of
what is done -> summary.json (and COCO detections) from the whole record at the end.

On CUDA the JPEGs are decoded on the GPU (DALI, else torchvision's nvJPEG) and stay there;
batch N+1 is submitted to the device before batch N's results are taken, and the masks come
back as 8-bit levels (float32 for `--masks npy`).

This module runs the command and makes OUT ready to resume; pipeline.py moves the batches
through decoding, the model and the writers; outputs.py writes the files.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from casm_deploy.common.files import make_folders, remove_owned
from casm_deploy.common.ui import console
from casm_deploy.config import InferConfig, MergeConfig, config_to_dict
from casm_deploy.data.decode import quiet_decoders
from casm_deploy.data.imagefiles import NO_IMAGES, Entry, scan
from casm_deploy.deploy.infer.locks import Lock, folder_lock, hold
from casm_deploy.deploy.infer.outfolder import (
    IDENTITY,
    LOCK,
    PARTS,
    RECORD,
    SUMMARY,
    as_user_error,
    check_outputs,
    drop_errors,
    read_record,
    write_own,
)
from casm_deploy.deploy.infer.outputs import run_summary, write_coco, write_summary
from casm_deploy.deploy.infer.pipeline import process
from casm_deploy.deploy.infer.shards import (
    Shard,
    hold_share,
    join_records,
    merge,
    missing_shards,
    parts_of,
    recorded,
    shard_for,
    shard_of,
    use_rank_device,
    write_marker,
)
from casm_deploy.deploy.runtime.masker import Masker
from casm_deploy.errors import UserError

RESULTS = (RECORD, SUMMARY, IDENTITY, PARTS, "masks", "overlays")  # what --overwrite deletes


def run(cfg: InferConfig) -> dict[str, Any]:
    """Run the model over every image under `cfg.dir` (this process's share of them, under
    torchrun or with --shard); returns the content of summary.json (a shard that leaves the
    merge to another: its own counts and run).

    What libpng and libjpeg print to stderr about a file ("libpng warning: ...") is kept off
    the console (`quiet_decoders`); a file that fails to decode has its error row.

    Raises:
        UserError: the folder (missing, or without any image file), the model or an output
            path cannot be used (checked before the first image), or another run holds OUT.
            A rerun of a finished run is no error: 0 files to do.
        OutUnwritable: OUT's disk stopped taking writes (full, quota, read-only, I/O error);
            the batches recorded before stay, and a rerun resumes.
    """
    root = Path(cfg.dir)
    if not root.is_dir():
        raise UserError(f"{root}: {'not a folder' if root.exists() else 'no such folder'}")
    out = Path(cfg.out)
    if next(scan(root, exclude=out), None) is None:  # before the model is loaded
        raise UserError(f"{root}: {NO_IMAGES}")
    shard = shard_for(cfg)
    with folder_lock(out, exclusive=False) if out.is_dir() else contextlib.nullcontext():
        check_outputs(out, cfg.coco)  # (OUT is checked again, set up, under the lock)
    if shard is not None:
        use_rank_device(cfg, shard)
    masker = Masker.load(cfg.model, cfg.backend, cfg.device, cfg.batch, cfg.expect_sha256)
    try:
        make_folders(out)
    except OSError as error:
        raise as_user_error(error, out) from None
    with quiet_decoders():
        if shard is None:
            return run_single(cfg, root, out, masker)
        return run_shard(cfg, root, out, masker, shard)


def run_single(cfg: InferConfig, root: Path, out: Path, masker: Masker) -> dict[str, Any]:
    """One process, every file: OUT/.lock held exclusively, rows appended to boxes.jsonl."""
    info = masker.info
    with contextlib.ExitStack() as held:
        with folder_lock(out):  # --overwrite and the record's repairs happen under the lock
            check_outputs(out, cfg.coco)
            held.enter_context(Lock(out))
            done = prepare_out(out, cfg, masker)
        # A counting pass first: the progress bar gets its total, and memory stays flat (a
        # count, not the list of files).
        todo = sum(1 for _ in unrecorded(root, out, done))
        masks_only = ", masks only (no classifier: no labels)" if info.masks_only else ""
        console.print(
            f"{root}: {todo} image files to do, {len(done)} already in {out / RECORD}; "
            f"{info.backend} {info.precision}{masks_only} on {info.provider}, batch {cfg.batch}"
        )
        counts, seconds = process(cfg, out, masker, out / RECORD, unrecorded(root, out, done), todo)
        summary = write_summary(out, run_summary(info, config_to_dict(cfg), counts, seconds))
        if cfg.coco:
            write_coco(out / RECORD, Path(cfg.coco), info)
    show(summary, out)
    return summary


def unrecorded(
    root: Path, out: Path, done: set[str], shard: Shard | None = None
) -> Iterator[Entry]:
    """The image files under `root` (of `shard`'s share) that are not in `done`."""
    for entry in scan(root, exclude=out):
        if entry.rel not in done and (shard is None or shard.takes(entry.rel)):
            yield entry


def run_shard(
    cfg: InferConfig, root: Path, out: Path, masker: Masker, shard: Shard
) -> dict[str, Any]:
    """One share of the files: OUT/.lock shared with the other shards, rows appended to the
    shard's own part; the last shard to finish merges (`merge_if_last`)."""
    info = masker.info
    with contextlib.ExitStack() as held:
        with folder_lock(out):
            check_outputs(out, cfg.coco)
            held.enter_context(Lock(out, shared=True, note=f"shard {shard}"))
            claim(out, cfg, masker)
            try:
                (out / PARTS).mkdir(exist_ok=True)
            except OSError as error:
                raise as_user_error(error, out / PARTS) from None
            hold_share(held, out, shard)
        done = recorded(out, shard)
        todo = sum(1 for _ in unrecorded(root, out, done, shard))
        console.print(
            f"shard {shard}: {todo} image files of its share to do, {len(done)} recorded in "
            f"{out}; {info.backend} {info.precision} on {info.provider}, batch {cfg.batch}"
        )
        part = out / PARTS / f"{shard.name}.jsonl"
        entries = unrecorded(root, out, done, shard)
        bar = not shard.torchrun or shard.index == 0  # one bar in a torchrun job's console
        started = time.time()  # the job's speed is over its shards' processing, as one run's
        counts, seconds = process(cfg, out, masker, part, entries, todo, bar=bar)
        run = run_summary(info, config_to_dict(cfg), counts, seconds)
        write_marker(out, shard, info, run, started)
    console.print(f"shard {shard}: {counts['ok']} ok, {counts['error']} errors in {seconds:.1f} s")
    summary = merge_if_last(out, shard)
    if summary is None:
        return {**counts, **run}
    show(summary, out)
    return summary


def merge_if_last(out: Path, shard: Shard) -> dict[str, Any] | None:
    """Merge OUT's parts if no other process holds OUT and every shard of N has finished;
    otherwise say who is left (the last of them merges). The merged summary, or None."""
    with folder_lock(out):
        fd = hold(out / LOCK, exclusive=True)
        if fd is None:
            console.print(f"shard {shard}: other shards are still running; the last merges")
            return None
        try:
            missing = missing_shards(out, shard.count)
            if missing:
                names = ", ".join(f"{k}/{shard.count}" for k in missing)
                console.print(
                    f"shard {shard}: not finished yet: {names}; the last of them to finish "
                    f"merges (or run casm-deploy merge {out} once they are done)"
                )
                return None
            return merge(out)
        finally:
            os.close(fd)


class MissingShards(UserError):
    """`casm-deploy merge`: files of DIR are recorded nowhere; the message names their shards."""


def merge_out(cfg: MergeConfig) -> dict[str, Any]:
    """`casm-deploy merge OUT`: join a sharded run's parts once every file of its DIR is
    recorded; returns the summary (OUT's summary.json when there was nothing left to merge).

    Raises:
        MissingShards: some files are recorded nowhere: the shards that should have done them
            (of the N of the latest part) are named, and nothing is merged.
        UserError: OUT is not an infer output, its DIR is gone, or a run still holds OUT.
    """
    out = Path(cfg.out)
    try:
        root = Path(json.loads((out / IDENTITY).read_text())["dir"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{out}: not an infer output folder (no readable {IDENTITY})") from None
    if not root.is_dir():
        raise UserError(f"{root}: no such folder (the folder {out} was made from)")
    with folder_lock(out):
        fd = hold(out / LOCK, exclusive=True)
        if fd is None:
            raise UserError(f"--out {out}: shards (or a run) are still writing it; merge later")
        try:
            check_complete(root, out)
            summary = merge(out, cfg.coco)
        finally:
            os.close(fd)
    if summary is None:
        console.print(f"{out}: no shard has finished since the last merge; nothing to merge")
        return json.loads((out / SUMMARY).read_text()) if (out / SUMMARY).is_file() else {}
    show(summary, out)
    return summary


def check_complete(root: Path, out: Path) -> None:
    """Raise MissingShards when a file under `root` is in neither boxes.jsonl nor a part."""
    done = read_record(out / RECORD).done
    records = parts_of(out, "jsonl")
    for path, _, _ in records:
        done |= read_record(path).done
    parts = records + parts_of(out, "json")
    count = max(parts, key=lambda p: p[0].stat().st_mtime)[2] if parts else 1
    left: dict[int, int] = {}
    for entry in unrecorded(root, out, done):
        k = shard_of(entry.rel, count)
        left[k] = left.get(k, 0) + 1
    if not left:
        return
    files = sum(left.values())
    if not parts:
        raise MissingShards(f"{out}: {files} files of {root} are not recorded, and no shard ran")
    names = ", ".join(f"{k}/{count} ({n} files)" for k, n in sorted(left.items()))
    raise MissingShards(
        f"{out}: not merged: {files} files of {root} are recorded nowhere; missing shards "
        f"{names}: run them (the same command with --shard K/N), then merge again"
    )


# --- OUT: resuming (outfolder: the lock, the record, and writing inside OUT only) ----------


# Keys of infer.json that older releases did not write, with the value such a file meant.
IDENTITY_DEFAULTS = {"masks_only": False}


def identity(cfg: InferConfig, masker: Masker) -> dict[str, Any]:
    """What must match for a rerun to continue OUT's results rather than mix runs."""
    return {
        "dir": str(Path(cfg.dir).resolve()),
        "model_sha256": masker.info.sha256,
        "masks_only": masker.info.masks_only,  # its rows have no label fields
        "masks": cfg.masks,
        "mask_size": cfg.mask_size,
        "overlay": cfg.overlay,
    }


def prepare_out(out: Path, cfg: InferConfig, masker: Masker) -> set[str]:
    """Make OUT ready (under its lock) and return the paths not to do again.

    A new or empty OUT starts fresh; an OUT of the same run resumes; `--overwrite` deletes an
    earlier run's results first; `--retry-errors` takes the error rows out of the record, so
    their files are done again. OUT's contents were checked by `check_outputs`.
    """
    if cfg.overwrite and (out / IDENTITY).is_file():
        remove_owned(out, RESULTS)
    claim(out, cfg, masker)
    if (out / PARTS).is_dir():  # an earlier sharded run's parts: into boxes.jsonl first
        added = join_records(out)
        remove_owned(out, [PARTS])
        console.print(f"{added} files recorded by an earlier sharded run joined {out / RECORD}")
    recorded = read_record(out / RECORD)
    if recorded.damaged:
        lines = ", ".join(map(str, recorded.damaged[:10]))
        more = f" and {len(recorded.damaged) - 10} more" if len(recorded.damaged) > 10 else ""
        console.print(
            f"[yellow]warning[/]: {out / RECORD}: damaged line(s) {lines}{more}, kept as they "
            "are and skipped; the files they were (if any) are done again"
        )
    if cfg.retry_errors and recorded.errors:
        drop_errors(out / RECORD)
        console.print(f"{len(recorded.errors)} files recorded as errors are done again")
        return recorded.ok
    return recorded.done


def claim(out: Path, cfg: InferConfig, masker: Masker) -> None:
    """Write OUT/infer.json, after checking that an earlier one is of this same run.

    Raises:
        UserError: OUT holds another run's results (what changed is named), or its infer.json
            cannot be read.
    """
    marker = out / IDENTITY
    wanted = identity(cfg, masker)
    if marker.is_file():
        try:
            previous = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise UserError(f"{marker}: unreadable ({error}); use --overwrite") from None
        changed = [
            key
            for key, value in wanted.items()
            if previous.get(key, IDENTITY_DEFAULTS.get(key)) != value
        ]
        if changed:
            raise UserError(
                f"--out {out} holds results of another run (changed: {', '.join(changed)}"
                "); use --overwrite to start over, or another --out"
            )
    write_own(marker, (json.dumps(wanted, indent=2) + "\n").encode())


# --- the results ------------------------------------------------------------------------------


def show(summary: dict[str, Any], out: Path) -> None:
    from rich.table import Table

    table = Table(title=f"casm-deploy infer -> {out}")
    for column in ("ok", "error", "this run", "img/s", "backend", "provider", "precision"):
        table.add_column(column)
    run_ = summary["this_run"]
    table.add_row(
        str(summary["ok"]),
        str(summary["error"]),
        f"{run_['ok'] + run_['error']} files in {run_['seconds']:.1f} s",
        f"{summary['images_per_second'] or 0:.1f}",
        summary["backend"],
        summary["provider"],
        summary["precision"],
    )
    console.print(table)
    if summary["error"]:
        console.print(f"{summary['error']} files failed: their reasons are in {out / RECORD}")
