"""`casm-deploy infer`: every image file under a folder -> masks, boxes and labels; resumable.

scan (streamed) -> read_image in threads, a few batches ahead -> backend (this thread) ->
mask files written in threads -> boxes.jsonl appended and fsync'd per batch, the record of
what is done -> summary.json (and COCO detections) from the whole record at the end.

On CUDA the JPEGs are decoded on the GPU (DALI, else torchvision's nvJPEG) and stay there;
batch N+1 is submitted to the device before batch N's results are taken, and the masks come
back as 8-bit levels (float32 for `--masks npy`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from casm_deploy import __version__
from casm_deploy.common.cpus import usable_cpus
from casm_deploy.common.ui import console, progress
from casm_deploy.config import InferConfig, config_to_dict
from casm_deploy.data.decode import (
    MAX_PIXELS,
    NO_IMAGES,
    Encoded,
    Entry,
    ImageError,
    TorchvisionJpegs,
    decode,
    quiet_decoders,
    read_file,
    read_image,
    read_overlay,
    scan,
    torchvision_decodes,
)
from casm_deploy.deploy.api import Masker, float_masks, resize_mask
from casm_deploy.deploy.outfolder import (
    IDENTITY,
    PARTIAL,
    RECORD,
    SUMMARY,
    Lock,
    OutputError,
    Record,
    as_user_error,
    check_outputs,
    drop_errors,
    is_fatal,
    name_limits,
    read_record,
    rows,
    unwritable,
    write_atomic,
    write_own,
)
from casm_deploy.deploy.runtimes import Pending
from casm_deploy.errors import UserError

RESULTS = (RECORD, SUMMARY, IDENTITY, "masks", "overlays")  # what --overwrite deletes
AHEAD = 2  # batches decoded ahead of the model, and batches being written behind it
OVERLAY_SIDE = 512  # longest side of an overlay image


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
    console.print(
        f"{root}: {todo} image files to do, {len(done)} already in {out / RECORD}; "
        f"{info.backend} {info.precision} on {info.provider}, batch {cfg.batch}"
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


# --- the pipeline -----------------------------------------------------------------------------


def max_pixels(cfg: InferConfig) -> int:
    return round(cfg.max_megapixels * 1e6)


def batched(entries: Iterable[Entry], size: int) -> Iterator[list[Entry]]:
    iterator = iter(entries)
    while batch := list(islice(iterator, size)):
        yield batch


def decode_ahead(
    pool: ThreadPoolExecutor,
    batches: Iterable[list[Entry]],
    size: int,
    limit: int = MAX_PIXELS,
    jpeg: JpegStage | None = None,
) -> Iterator[list[tuple[Entry, Future]]]:
    """Each batch with one decoding future per file, submitted AHEAD batches before it is
    needed, so decoding overlaps the model while at most AHEAD + 1 batches are in memory.

    Without `jpeg`, the pool's threads decode every file with OpenCV. With it, they read and
    check the files and decode all but the JPEGs its decoder takes; those of a batch go to it
    in one call.
    """
    queue: deque[list[tuple[Entry, Future]]] = deque()
    for batch in batches:
        if jpeg is None:
            futures = [
                failed(e) or pool.submit(read_image, e.path, size, max_pixels=limit) for e in batch
            ]
        else:
            prepared = [
                failed(entry) or pool.submit(prepare, entry.path, size, jpeg.decoder, limit)
                for entry in batch
            ]
            futures = jpeg.submit(prepared)
        queue.append(list(zip(batch, futures, strict=True)))
        if len(queue) > AHEAD:
            yield queue.popleft()
    yield from queue


def failed(entry: Entry) -> Future | None:
    """An entry the scan could not stat or read (its `error`): a future holding that reason,
    so it becomes an error row without being read; None for the others."""
    reason = getattr(entry, "error", None)
    if reason is None:
        return None
    future: Future = Future()
    future.set_exception(ImageError(reason))
    return future


def prepare(path: Path, size: int, decoder: Any, limit: int) -> tuple[str, Any, int, int]:
    """("jpeg", the `Encoded` file, w, h) for a JPEG `decoder` takes, left for it; ("image",
    decoded by OpenCV, w, h) otherwise."""
    encoded = read_file(path, max_pixels=limit)
    width, height = encoded.width, encoded.height
    if decoder.accepts(encoded):
        return "jpeg", encoded, width, height
    image = decode(encoded.data, width, height, size, encoded.orientation)
    return "image", image, width, height


class JpegStage:
    """The JPEGs of each batch decoded in one call, in one thread of its own: by DALI or
    torchvision (nvJPEG on a GPU, the images staying there)."""

    def __init__(self, decoder: Any, size: int):
        self.decoder, self.size = decoder, size
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="dali")

    def submit(self, prepared: list[Future]) -> list[Future]:
        results: list[Future] = [Future() for _ in prepared]
        self.thread.submit(self._decode, prepared, results)
        return results

    def _decode(self, prepared: list[Future], results: list[Future]) -> None:
        jpegs = []
        for future, result in zip(prepared, results, strict=True):
            try:
                kind, payload, width, height = future.result()
            except Exception as error:
                result.set_exception(error)
                continue
            if kind == "image":
                result.set_result((payload, width, height))
            else:
                jpegs.append((payload, width, height, result))
        if not jpegs:
            return
        try:
            images = self.decoder([encoded for encoded, *_ in jpegs])
        except Exception:  # one file it cannot decode fails the batch: each file alone then
            images = None
        for k, (encoded, width, height, result) in enumerate(jpegs):
            try:
                image = images[k] if images is not None else self._one(encoded)
                result.set_result((image, width, height))
            except Exception as error:
                result.set_exception(error)

    def _one(self, encoded: Encoded) -> Any:
        """One file by the decoder, else by OpenCV (which names what is wrong with it)."""
        try:
            return self.decoder([encoded])[0]
        except Exception:
            return decode(
                encoded.data, encoded.width, encoded.height, self.size, encoded.orientation
            )

    def close(self) -> None:
        self.thread.shutdown()


def jpeg_stage(cfg: InferConfig, device: str, size: int, workers: int) -> JpegStage | None:
    """The JPEG stage `--decoder` asks for, on the model's device, or None (OpenCV only).

    auto: on CUDA, DALI when it is installed, else torchvision's nvJPEG; OpenCV on the CPU.
    """
    from casm_deploy.data import dali

    if cfg.decoder == "opencv" or (cfg.decoder == "auto" and device != "cuda"):
        return None
    if cfg.decoder in ("dali", "auto") and dali.dali_available():
        device_id = torch_device_index() if device == "cuda" else None
        return JpegStage(dali.JpegDecoder(size, cfg.batch, device_id, workers), size)
    if cfg.decoder == "dali":
        raise UserError("--decoder dali: NVIDIA DALI is not installed (nvidia-dali-cuda120)")
    if not torchvision_decodes():
        if cfg.decoder == "torchvision":
            raise UserError("--decoder torchvision: this torchvision has no JPEG decoder")
        return None
    where = f"cuda:{torch_device_index()}" if device == "cuda" else "cpu"
    return JpegStage(TorchvisionJpegs(size, where), size)


def torch_device_index() -> int:
    import torch

    return torch.cuda.current_device()


@dataclass
class Launched:
    """A batch whose images went to the model: each file's record so far, and the model's
    pending masks and logits for the files that decoded (`good`: their rows)."""

    batch: list[tuple[Entry, Future]]
    rows: list[dict[str, Any]]
    sizes: list[tuple[int, int]]
    good: list[int]
    pending: Pending | None


def launch(batch: list[tuple[Entry, Future]], masker: Masker, uint8_masks: bool) -> Launched:
    """Submit a batch's decoded images to the model (on CUDA this does not wait for it)."""
    rows: list[dict[str, Any]] = []
    images, sizes, good = [], [], []
    for entry, future in batch:
        try:
            image, width, height = future.result()
        except ImageError as error:
            rows.append({"path": entry.rel, "status": "error", "error": str(error)})
            continue
        except Exception as error:  # a decoder crash on one file must not stop the run
            reason = f"cannot decode ({type(error).__name__}: {error})"
            rows.append({"path": entry.rel, "status": "error", "error": reason})
            continue
        rows.append({"path": entry.rel, "status": "ok"})
        images.append(image)
        sizes.append((width, height))
        good.append(len(rows) - 1)
    pending = masker.submit(images, uint8_masks) if images else None
    return Launched(batch, rows, sizes, good, pending)


def collect(
    launched: Launched, masker: Masker, writer: Writer, pool: ThreadPoolExecutor
) -> list[tuple[dict[str, Any], Future | None]]:
    """The model's results of a launched batch: each file's record and its writing future."""
    jobs: list[Future | None] = [None] * len(launched.rows)
    if launched.pending is not None:
        masks, logits = launched.pending.result()  # (B, S, S), (B, K)
        for k, i in enumerate(launched.good):  # boxes and files in the pool: this thread
            entry = launched.batch[i][0]  # feeds the model
            args = (entry, masks[k : k + 1], logits[k : k + 1], launched.sizes[k])
            jobs[i] = pool.submit(finish, masker, writer, *args)
    return list(zip(launched.rows, jobs, strict=True))


def finish(
    masker: Masker,
    writer: Writer,
    entry: Entry,
    mask: np.ndarray,
    logits: np.ndarray,
    size: tuple[int, int],
) -> dict[str, Any]:
    """One image's record fields (box, label, ...) from its (1, S, S) mask and (1, K) logits,
    after its output files are written."""
    (row,) = masker.describe(mask, logits, [size])
    writer.write(entry, mask[0], row)
    return row


def all_done(batch: list[tuple[dict[str, Any], Future | None]]) -> bool:
    return all(job is None or job.done() for _, job in batch)


def append_records(
    record: Record, batch: list[tuple[dict[str, Any], Future | None]], counts: dict
) -> int:
    """Wait for the batch's files, then append its records in one write, fsync'd: a file is
    recorded only once its outputs are on disk.

    Raises:
        OutUnwritable: a file's outputs met a full, read-only or failing disk; the batch is
            not recorded (its files were not the problem: a rerun does them again).
    """
    lines, counted = [], {"ok": 0, "error": 0}
    for row, job in batch:
        if job is not None:
            try:
                row = {**row, **job.result()}
            except OutputError as error:
                row = {"path": row["path"], "status": "error", "error": str(error)}
            except OSError as error:
                if is_fatal(error):
                    raise unwritable(error, Path(record.path).parent) from None
                reason = f"cannot write its outputs ({error.strerror or error})"
                row = {"path": row["path"], "status": "error", "error": reason}
        counted[row["status"]] += 1
        lines.append(json.dumps(row) + "\n")
    record.append("".join(lines))
    for status, n in counted.items():
        counts[status] += n
    return len(lines)


def _rate(counts: dict[str, int], started: float) -> str:
    seconds = max(time.perf_counter() - started, 1e-9)
    return f"{(counts['ok'] + counts['error']) / seconds:.0f} img/s, {counts['error']} errors"


# --- OUT: resuming (outfolder: the lock, the record, and writing inside OUT only) ----------


def identity(cfg: InferConfig, masker: Masker) -> dict[str, Any]:
    """What must match for a rerun to continue OUT's results rather than mix runs."""
    return {
        "dir": str(Path(cfg.dir).resolve()),
        "model_sha256": masker.info.sha256,
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
            remove_results(out)
        else:
            try:
                previous = json.loads(marker.read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise UserError(f"{marker}: unreadable ({error}); use --overwrite") from None
            changed = [key for key, value in wanted.items() if previous.get(key) != value]
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


def remove_results(out: Path) -> None:
    for name in RESULTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


class Writer:
    """Writes one file's mask (and overlay) under OUT, and never anywhere else."""

    def __init__(self, out: Path, cfg: InferConfig):
        self.out = out
        self.real_out = out.resolve()
        self.cfg = cfg
        self.checked: set[Path] = set()  # folders already made and found inside OUT
        self.name_max, self.path_max = name_limits(out)

    def target(self, folder: str, rel: str, suffix: str) -> Path:
        """OUT/folder/rel+suffix, after checking that it stays inside OUT.

        A file name too long for the file system becomes a readable prefix, "~", 16 hex
        digits of the SHA-256 of `rel` (unique) and the suffix; a path too long for it goes to
        OUT/folder/~long/ under such a name. The record then names the file written.

        Raises:
            OutputError: the path would leave OUT (`..`, an absolute path, or a symbolic link
                on the way that points outside).
        """
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts:
            raise OutputError(f"output path {rel!r} would leave the output folder")
        path = self.out / folder / (rel + suffix)
        if len(os.fsencode(path.name)) > self.name_max:
            path = path.with_name(self.short_name(rel, suffix))
        if len(os.fsencode(path)) + len(PARTIAL) + 1 >= self.path_max:  # and its temporary
            path = self.out / folder / "~long" / self.short_name(rel, suffix)
        if path.parent in self.checked:
            return path
        existing = path.parent
        while not existing.exists():
            existing = existing.parent
        if not existing.resolve().is_relative_to(self.real_out):
            raise OutputError(f"output folder {existing} leads outside {self.out} (a link)")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.parent.resolve().is_relative_to(self.real_out):
            self.checked.add(path.parent)
        return path

    def short_name(self, rel: str, suffix: str) -> str:
        tail = f"~{hashlib.sha256(os.fsencode(rel)).hexdigest()[:16]}{suffix}"
        prefix = os.fsencode(Path(rel).name)[: self.name_max - len(tail)]
        return prefix.decode("utf-8", "ignore") + tail  # a character cut in two is dropped

    def write(self, entry: Entry, mask: np.ndarray, row: dict[str, Any]) -> None:
        """Write one (S, S) mask: floats in [0, 1], or uint8 levels (from the GPU).

        PNG masks are made 8-bit at S x S and resized as levels for `--mask-size original`
        (a float mask of a 13,000 px image would take 676 MB; a level may differ by one from
        resizing the floats first); npy keeps floats. A shortened name is recorded in the row
        ("mask", "overlay": the path written, relative to OUT).
        """
        width, height = row["width"], row["height"]
        original = self.cfg.mask_size == "original"
        if self.cfg.masks == "png":
            import cv2

            levels = mask if mask.dtype == np.uint8 else np.rint(mask * 255).astype(np.uint8)
            full = resize_mask(levels, width, height) if original else levels
            ok, png = cv2.imencode(".png", full)
            if not ok:
                raise OutputError("cannot encode the mask as PNG")
            self.put("masks", entry.rel, ".png", png.tobytes(), row, "mask")
        elif self.cfg.masks == "npy":
            floats = float_masks(mask).astype(np.float32)
            full = resize_mask(floats, width, height) if original else floats
            buffer = io.BytesIO()
            np.save(buffer, full)
            self.put("masks", entry.rel, ".npy", buffer.getvalue(), row, "mask")
        if self.cfg.overlay:
            label = overlay_label(row["name"], row["score"])
            args = (entry.path, float_masks(mask), row["box"], width, height, max_pixels(self.cfg))
            jpeg = overlay(*args, label=label)
            self.put("overlays", entry.rel, ".jpg", jpeg, row, "overlay")

    def put(self, folder: str, rel: str, suffix: str, data: bytes, row: dict, key: str) -> None:
        path = self.target(folder, rel, suffix)
        write_atomic(path, data)
        if path != self.out / folder / (rel + suffix):
            row[key] = path.relative_to(self.out).as_posix()


def overlay(
    path: Path,
    mask: np.ndarray,
    box: list[int] | None,
    width: int,
    height: int,
    limit: int = MAX_PIXELS,
    label: str = "",
) -> bytes:
    """The image (longest side at most OVERLAY_SIDE) dimmed where the mask is low, with its box
    and `label` (`overlay_label`; at the top left without a box)."""
    import cv2

    try:
        # a large JPEG is decoded at a reduced scale
        image = read_overlay(path, OVERLAY_SIDE, max_pixels=limit)
    except ImageError as error:  # the file changed since it was read for the model
        raise OutputError(f"cannot make the overlay: {error}") from None
    h, w = image.shape[:2]
    weight = resize_mask(mask, w, h)[:, :, None]
    shown = (image * (0.3 + 0.7 * weight)).astype(np.uint8)  # salient pixels stay bright
    thickness = max(1, round(max(h, w) / 200))  # 1 px up to 300 px, 3 px at 512
    corner = (0, 0)
    if box is not None:
        scale = min(1.0, OVERLAY_SIDE / max(width, height))
        x0, y0, x1, y1 = (round(v * scale) for v in box)
        cv2.rectangle(shown, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), BOX_COLOR, thickness)
        corner = (x0, y0)
    if label:
        draw_label(shown, label, corner, thickness)
    ok, jpeg = cv2.imencode(".jpg", shown, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise OutputError("cannot encode the overlay")
    return jpeg.tobytes()


BOX_COLOR = (0, 255, 0)  # BGR: green, and the label's background


def overlay_label(name: str, score: float) -> str:
    """An overlay's label: the predicted class name and its probability."""
    return f"{name} {score:.2f}"


def draw_label(image: np.ndarray, text: str, corner: tuple[int, int], thickness: int) -> None:
    """`text`, black on a filled box of BOX_COLOR, sitting on `corner` (a box's top left): above
    it where there is room, else just below; shifted and shortened ("..") to stay inside."""
    import cv2

    h, w = image.shape[:2]
    font, scale, weight = cv2.FONT_HERSHEY_SIMPLEX, max(0.3, max(h, w) / 640), max(1, thickness - 1)
    pad = thickness + 1
    text = text.encode("ascii", "replace").decode()  # Hershey fonts draw ASCII only
    shown = text
    while (size := cv2.getTextSize(shown, font, scale, weight))[0][0] + 2 * pad > w and text:
        text = text[:-1]
        shown = text + ".."
    (text_width, text_height), baseline = size
    box_width, box_height = text_width + 2 * pad, text_height + baseline + 2 * pad
    x, y = corner
    y = y - box_height if y >= box_height else y  # a box at the top edge: its label inside
    x, y = max(0, min(x, w - box_width)), max(0, min(y, h - box_height))
    cv2.rectangle(image, (x, y), (x + box_width - 1, y + box_height - 1), BOX_COLOR, cv2.FILLED)
    origin = (x + pad, y + pad + text_height)
    cv2.putText(image, shown, origin, font, scale, (0, 0, 0), weight, cv2.LINE_AA)


# --- the results ------------------------------------------------------------------------------


def write_summary(
    out: Path, cfg: InferConfig, masker: Masker, counts: dict[str, int], seconds: float
) -> dict[str, Any]:
    """OUT/summary.json: counts over the whole record (every run into OUT), speed of this one."""
    totals = {"ok": 0, "error": 0}
    for row in rows(out / RECORD):
        totals[row["status"]] += 1
    info = masker.info
    done = counts["ok"] + counts["error"]
    summary = {
        **totals,
        "files": totals["ok"] + totals["error"],
        "this_run": {**counts, "seconds": round(seconds, 3)},
        "images_per_second": round(done / seconds, 2) if done and seconds > 0 else None,
        "backend": info.backend,
        "provider": info.provider,
        "device": info.device,
        "precision": info.precision,
        "model": info.path,
        "model_sha256": info.sha256,
        "image_size": info.image_size,
        "package_version": __version__,
        "config": config_to_dict(cfg),
    }
    write_own(out / SUMMARY, (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def write_coco(record: Path, path: Path, masker: Masker) -> None:
    """COCO-style detections: `images`, `categories` (ids = class index + 1) and one
    `annotations` entry with a `score` per image with a box (the results list of COCO's API)."""
    images, annotations = [], []
    for image_id, row in enumerate(rows(record), start=1):
        if row["status"] != "ok":
            continue
        images.append(
            {
                "id": image_id,
                "file_name": row["path"],
                "width": row["width"],
                "height": row["height"],
            }
        )
        if row["box"] is not None:
            x0, y0, x1, y1 = row["box"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": row["class_index"] + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "score": row["score"],
                    "iscrowd": 0,
                }
            )
    info = masker.info
    categories = [
        {"id": k + 1, "name": info.label(k)[1], "supercategory": info.label(k)[0]}
        for k in range(info.num_classes)
    ]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise as_user_error(error, path) from None
    write_own(path, (json.dumps(coco) + "\n").encode())


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
