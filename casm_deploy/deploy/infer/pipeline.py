"""infer's pipeline: batches of image files decoded ahead, run by the model, written behind.

process: batched(entries) -> decode_ahead (read_image in the pool's threads; JPEGs
to DALI or nvJPEG in one call per batch, JpegStage) -> launch (submit to the model) ->
collect (boxes and labels, the files written by outputs.Writer in the pool) -> append_records
(boxes.jsonl, once a batch's files are on disk).
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from casm_deploy.common.cpus import usable_cpus
from casm_deploy.common.ui import console, progress
from casm_deploy.config import InferConfig
from casm_deploy.data.decode import TorchvisionJpegs, decode, read_image, torchvision_decodes
from casm_deploy.data.imagefiles import MAX_PIXELS, Encoded, Entry, ImageError, read_file
from casm_deploy.deploy.infer.outfolder import OutputError, Record, is_fatal, unwritable
from casm_deploy.deploy.infer.outputs import Writer
from casm_deploy.deploy.runtime.device_io import Pending
from casm_deploy.deploy.runtime.masker import Masker
from casm_deploy.errors import UserError

AHEAD = 2  # batches decoded ahead of the model, and batches being written behind it


def process(
    cfg: InferConfig,
    out: Path,
    masker: Masker,
    record_path: Path,
    entries: Iterable[Entry],
    todo: int,
    bar: bool = True,
) -> tuple[dict[str, int], float]:
    """Run `entries` (`todo` of them) through decoding, the model and the writers into OUT,
    appending each finished batch's rows to `record_path`. `bar`: draw the progress bar.

    Returns:
        The counts of ok and error rows appended, and the seconds it took.
    """
    info = masker.info
    writer = Writer(out, cfg.masks, cfg.mask_size, overlay=cfg.overlay, max_pixels=cfg.max_pixels)
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
            Record(record_path) as record,
            progress(disable=not bar) as bars,
        ):
            task = bars.add_task("infer", total=todo, info="")
            pending: deque[list[tuple[dict[str, Any], Future | None]]] = deque()
            on_device: deque[Launched] = deque()
            batches = batched(entries, cfg.batch)
            for batch in decode_ahead(pool, batches, masker.image_size, cfg.max_pixels, jpeg):
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
    return counts, time.perf_counter() - started


def _rate(counts: dict[str, int], started: float) -> str:
    seconds = max(time.perf_counter() - started, 1e-9)
    return f"{(counts['ok'] + counts['error']) / seconds:.0f} img/s, {counts['error']} errors"


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
        masks, logits = launched.pending.result()  # (B, S, S), (B, K) or None (masks-only)
        for k, i in enumerate(launched.good):  # boxes and files in the pool: this thread
            entry = launched.batch[i][0]  # feeds the model
            one = None if logits is None else logits[k : k + 1]
            args = (entry, masks[k : k + 1], one, launched.sizes[k])
            jobs[i] = pool.submit(finish, masker, writer, *args)
    return list(zip(launched.rows, jobs, strict=True))


def finish(
    masker: Masker,
    writer: Writer,
    entry: Entry,
    mask: np.ndarray,
    logits: np.ndarray | None,
    size: tuple[int, int],
) -> dict[str, Any]:
    """One image's record fields (box, label, ...) from its (1, S, S) mask and (1, K) logits
    (None, and no label fields, for a masks-only model), after its output files are written."""
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
