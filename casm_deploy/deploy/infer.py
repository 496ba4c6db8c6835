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

import json
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from casm_deploy.common.cpus import usable_cpus
from casm_deploy.common.files import remove_owned
from casm_deploy.common.ui import console, progress
from casm_deploy.config import InferConfig
from casm_deploy.data.decode import quiet_decoders
from casm_deploy.data.imagefiles import NO_IMAGES, scan
from casm_deploy.deploy.api import Masker
from casm_deploy.deploy.outfolder import (
    IDENTITY,
    RECORD,
    SUMMARY,
    Lock,
    Record,
    as_user_error,
    check_outputs,
    drop_errors,
    read_record,
    write_own,
)
from casm_deploy.deploy.outputs import Writer, max_pixels, write_coco, write_summary
from casm_deploy.deploy.pipeline import (
    AHEAD,
    Launched,
    all_done,
    append_records,
    batched,
    collect,
    decode_ahead,
    jpeg_stage,
    launch,
)
from casm_deploy.errors import UserError

RESULTS = (RECORD, SUMMARY, IDENTITY, "masks", "overlays")  # what --overwrite deletes


def run(cfg: InferConfig) -> dict[str, Any]:
    """Run the model over every image under `cfg.dir`; returns the content of summary.json.

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
    check_outputs(out, cfg.coco)
    masker = Masker.load(cfg.model, cfg.backend, cfg.device, cfg.batch, cfg.expect_sha256)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise as_user_error(error, out) from None
    # one run per OUT; --overwrite and the record's repairs happen under the lock
    with Lock(out), quiet_decoders():
        return run_locked(cfg, root, out, masker)


def run_locked(cfg: InferConfig, root: Path, out: Path, masker: Masker) -> dict[str, Any]:
    info = masker.info
    done = prepare_out(out, cfg, masker)
    # A counting pass first: the progress bar gets its total, and memory stays flat (a count,
    # not the list of files).
    todo = sum(1 for entry in scan(root, exclude=out) if entry.rel not in done)
    masks_only = ", masks only (no classifier: no labels)" if info.masks_only else ""
    console.print(
        f"{root}: {todo} image files to do, {len(done)} already in {out / RECORD}; "
        f"{info.backend} {info.precision}{masks_only} on {info.provider}, batch {cfg.batch}"
    )
    writer = Writer(out, cfg)
    workers = cfg.workers or usable_cpus()
    jpeg = jpeg_stage(cfg, info.device, masker.image_size, workers)
    decoder = "OpenCV" if jpeg is None else f"OpenCV, and for JPEGs {jpeg.decoder.name}"
    console.print(f"decoding: {decoder} with {workers} threads")
    # On CUDA: one batch on the device while the next is submitted; 8-bit masks come back
    # (the PNG's levels: 4x fewer bytes) unless npy files want float32.
    depth = 1 if info.device == "cuda" else 0
    uint8_masks = info.device == "cuda" and cfg.masks != "npy"
    counts = {"ok": 0, "error": 0}
    started = time.perf_counter()
    try:
        with (
            ThreadPoolExecutor(workers, thread_name_prefix="infer") as pool,
            Record(out / RECORD) as record,
            progress() as bars,
        ):
            task = bars.add_task("infer", total=todo, info="")
            entries = (entry for entry in scan(root, exclude=out) if entry.rel not in done)
            pending: deque[list[tuple[dict[str, Any], Future | None]]] = deque()
            on_device: deque[Launched] = deque()
            batches = batched(entries, cfg.batch)
            limit = max_pixels(cfg)
            for batch in decode_ahead(pool, batches, masker.image_size, limit, jpeg):
                on_device.append(launch(batch, masker, uint8_masks))
                if len(on_device) > depth:
                    pending.append(collect(on_device.popleft(), masker, writer, pool))
                while len(pending) > AHEAD or (pending and all_done(pending[0])):
                    finished = append_records(record, pending.popleft(), counts)
                    bars.update(task, advance=finished, info=_rate(counts, started))
            while on_device:
                pending.append(collect(on_device.popleft(), masker, writer, pool))
            while pending:
                finished = append_records(record, pending.popleft(), counts)
                bars.update(task, advance=finished, info=_rate(counts, started))
    finally:
        if jpeg is not None:
            jpeg.close()
    seconds = time.perf_counter() - started
    summary = write_summary(out, cfg, masker, counts, seconds)
    if cfg.coco:
        write_coco(out / RECORD, Path(cfg.coco), masker)
    show(summary, out)
    return summary


def _rate(counts: dict[str, int], started: float) -> str:
    seconds = max(time.perf_counter() - started, 1e-9)
    return f"{(counts['ok'] + counts['error']) / seconds:.0f} img/s, {counts['error']} errors"


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
    marker = out / IDENTITY
    wanted = identity(cfg, masker)
    if marker.is_file():
        if cfg.overwrite:
            remove_owned(out, RESULTS)
        else:
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
