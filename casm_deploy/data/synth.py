"""The embedded benchmark: a deterministic generator of an ImageNet-layout data set on disk.

First step of the flow: `generate` writes `train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`,
`annotations/<stem>.xml` (ILSVRC/PASCAL VOC boxes) and beside each XML `annotations/<stem>.png`
(the objects' pixels: a uint8 map at the image's size, 0 where no object is, k on the pixels of
the XML's k-th object) that `imagenet.py` and the loaders (`loader.build_loader`) then read.
Boxes are ILSVRC pixel coordinates of the tight box of the object's drawn pixels (coverage >=
0.5), the pixels its mask holds: xmin, ymin inclusive, xmax, ymax EXCLUSIVE (last column / row
+ 1), as `[x0, y0, x1, y1]`.

The pixels come from `draw.py` (one solid shape, `render`) or, with `parts` (`--parts N`),
from `parts.py` (an object of parts, whose validation images also get `parts/<stem>.png` and
`parts/<stem>.json`). Here: each image's own generator and copies (`make_sample`), the files,
the worker processes, and whether an existing folder already holds the set.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from casm_deploy.common.files import make_folders, remove_owned, write_atomic
from casm_deploy.config import SynthConfig, config_to_dict
from casm_deploy.data.draw import SHAPES, background, draw_distractors, render, tight_box, wnid_for
from casm_deploy.data.imagenet import has_object_masks
from casm_deploy.data.parts import PART_KINDS, SPLITS, make_parts_sample, part_annotation
from casm_deploy.errors import UserError
from casm_deploy.options import ConfigError

MARKER = ".synth-incomplete"  # present while a run is writing; synth.json is written last
OWNED = ("train", "val", "annotations", "parts", "classes.txt", "synth.json", MARKER)
IGNORED_KEYS = ("out", "workers", "overwrite")  # config keys that do not change the content
JPEG_QUALITY = 90


def make_sample(
    cfg: SynthConfig, split: str, shape_index: int, i: int, drop: int | None = None
) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """The image and boxes of image `i` of shape `shape_index` in `split` (deterministic).

    With `cfg.parts`, the object is made of parts (`make_parts_sample`, which `drop` is passed
    to) and its box is the tight box of all their pixels.

    Returns:
        `(image, boxes)`: RGB uint8 `(H, W, 3)` (W doubled when `cfg.copies == 2`) and one box
        per object copy (only the left one when `cfg.right == "clutter"`).
    """
    image, boxes, _ = make_labelled_sample(cfg, split, shape_index, i, drop)
    return image, boxes


def make_labelled_sample(
    cfg: SynthConfig, split: str, shape_index: int, i: int, drop: int | None = None
) -> tuple[np.ndarray, list[tuple[int, int, int, int]], np.ndarray]:
    """`make_sample`'s image and boxes, and the objects' pixels as a label map.

    Returns:
        `(image, boxes, objects)`: `objects` is uint8 `(H, W)`, 0 where no object is and k on
        the pixels of the object of `boxes[k - 1]` (those at least half covered; their tight
        box is that box).
    """
    if cfg.parts:
        image, labels = make_parts_sample(cfg, split, shape_index, i, drop)
        return image, [tight_box(labels > 0)], (labels > 0).astype(np.uint8)
    if drop is not None:
        raise ValueError("drop needs an object made of parts (cfg.parts > 0)")
    rng = np.random.default_rng([cfg.seed, SPLITS[split], shape_index, i])
    image, mask = render(
        rng, SHAPES[shape_index], cfg.min_side, cfg.max_side, cfg.min_area, cfg.max_area
    )
    boxes, objects = [tight_box(mask)], mask.astype(np.uint8)
    if cfg.copies == 2 and cfg.right == "clutter":  # the object on the left only
        h, w = image.shape[:2]
        # A generator of its own (the trailing 1), so the left half is the same image as with
        # --right copy.
        clutter_rng = np.random.default_rng([cfg.seed, SPLITS[split], shape_index, i, 1])
        right = background(clutter_rng, h, w)
        draw_distractors(clutter_rng, right)
        image = np.concatenate([image, right], axis=1)
        objects = np.concatenate([objects, np.zeros_like(objects)], axis=1)
    elif cfg.copies == 2:  # the paper's duplicated-object check: the same content twice
        w = image.shape[1]
        x0, y0, x1, y1 = boxes[0]
        boxes.append((x0 + w, y0, x1 + w, y1))
        image = np.concatenate([image, image], axis=1)
        objects = np.concatenate([objects, objects * 2], axis=1)
    return image, boxes, objects


# ---------------------------------------------------------------------------------------------
# Writing the data set.


def _annotation_xml(stem: str, wnid: str, width: int, height: int, boxes: list) -> str:
    objects = "".join(
        f"\t<object>\n\t\t<name>{wnid}</name>\n\t\t<pose>Unspecified</pose>\n"
        "\t\t<truncated>0</truncated>\n\t\t<difficult>0</difficult>\n\t\t<bndbox>\n"
        f"\t\t\t<xmin>{x0}</xmin>\n\t\t\t<ymin>{y0}</ymin>\n"
        f"\t\t\t<xmax>{x1}</xmax>\n\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        for x0, y0, x1, y1 in boxes
    )
    return (
        f"<annotation>\n\t<folder>val</folder>\n\t<filename>{stem}</filename>\n"
        "\t<source>\n\t\t<database>casm-deploy synth</database>\n\t</source>\n"
        f"\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n"
        "\t\t<depth>3</depth>\n\t</size>\n\t<segmented>0</segmented>\n"
        f"{objects}</annotation>\n"
    )


def _write_items(cfg: SynthConfig, items: list[tuple[str, int, int, str]]) -> int:
    """Render and write `(split, shape_index, i, stem)` items; returns how many."""
    import cv2

    out = Path(cfg.out)
    for split, shape_index, i, stem in items:
        wnid = wnid_for(shape_index)
        if cfg.parts:
            image, labels = make_parts_sample(cfg, split, shape_index, i)
            boxes, objects = [tight_box(labels > 0)], (labels > 0).astype(np.uint8)
        else:
            image, boxes, objects = make_labelled_sample(cfg, split, shape_index, i)
        ok, jpeg = cv2.imencode(
            ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
        )
        assert ok, "JPEG encoding failed"
        (out / split / wnid / f"{stem}.JPEG").write_bytes(jpeg.tobytes())
        if split == "val":
            h, w = image.shape[:2]
            xml = _annotation_xml(stem, wnid, w, h, boxes)
            (out / "annotations" / f"{stem}.xml").write_text(xml)
            (out / "annotations" / f"{stem}.png").write_bytes(_png(objects))
        if split == "val" and cfg.parts:
            (out / "parts" / f"{stem}.png").write_bytes(_png(labels))
            record = json.dumps(part_annotation(labels, cfg.parts))
            (out / "parts" / f"{stem}.json").write_text(record + "\n")
    return len(items)


def _png(labels: np.ndarray) -> bytes:
    """A label map as PNG bytes: lossless, so that labels stay labels."""
    import cv2

    ok, png = cv2.imencode(".png", labels)
    assert ok, "PNG encoding failed"
    return png.tobytes()


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already; no nested thread pools


def _write_chunk(args: tuple[SynthConfig, list]) -> int:
    return _write_items(*args)


def resolve_config(cfg: SynthConfig) -> SynthConfig:
    """Resolve `cfg`'s classes to readable names (`num_classes` to match), checking what needs
    the generator's tables (SynthConfig checks the rest when it is made).

    Raises:
        ConfigError: an unknown class name, or --num-classes or --parts out of range.
    """
    if cfg.classes:
        lookup = {name.lower(): k for k, name in enumerate(SHAPES)}
        lookup.update({wnid_for(k): k for k in range(len(SHAPES))})
        unknown = [c for c in cfg.classes if c.lower() not in lookup]
        if unknown:
            valid = ", ".join(f"{name} ({wnid_for(k)})" for k, name in enumerate(SHAPES))
            raise ConfigError(f"unknown class(es) {', '.join(unknown)}; valid classes: {valid}")
        indices = sorted({lookup[c.lower()] for c in cfg.classes})
    else:
        if not 1 <= cfg.num_classes <= len(SHAPES):
            raise ConfigError(f"--num-classes must be in [1, {len(SHAPES)}], not {cfg.num_classes}")
        indices = list(range(cfg.num_classes))
    if not 0 <= cfg.parts <= len(PART_KINDS):
        raise ConfigError(f"--parts must be in [0, {len(PART_KINDS)}], not {cfg.parts}")
    names = tuple(SHAPES[k] for k in indices)
    return dataclasses.replace(cfg, classes=names, num_classes=len(names))


def _record(cfg: SynthConfig) -> dict[str, Any]:
    """The config as synth.json records it: `parts` only when set, so that a set of solid
    shapes is recorded (and recognised) as before the setting existed."""
    values = config_to_dict(cfg)
    if not values["parts"]:
        del values["parts"]
    return values


def _content_key(cfg: SynthConfig) -> dict[str, Any]:
    return {k: v for k, v in _record(cfg).items() if k not in IGNORED_KEYS}


def _summary(cfg: SynthConfig, seconds: float, generated: bool) -> dict[str, Any]:
    indices = [SHAPES.index(name) for name in cfg.classes]
    n = len(indices)
    return {
        "out": str(cfg.out),
        "counts": {"train": n * cfg.train_per_class, "val": n * cfg.val_per_class},
        "classes": {wnid_for(k): SHAPES[k] for k in indices},
        "seconds": round(seconds, 3),
        "generated": generated,
    }


def _check_existing(cfg: SynthConfig) -> bool:
    """True when `cfg.out` already holds this data set; clears our old output when allowed.

    Raises:
        UserError: the folder holds a different data set, or files that are not ours, and
            `cfg.overwrite` is off.
    """
    out = Path(cfg.out)
    if not out.exists():
        return False
    if not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    done = out / "synth.json"
    if done.exists() and not cfg.overwrite:
        try:
            old = json.loads(done.read_text())["config"]
        except (ValueError, KeyError, TypeError):
            old = None
        if isinstance(old, dict):
            # A setting added since that set was made (e.g. `right`) has its default there.
            old = {**_record(SynthConfig()), **old}
        if isinstance(old, dict) and {
            k: v for k, v in old.items() if k not in IGNORED_KEYS
        } == _content_key(cfg):
            return True
        raise UserError(
            f"{out} already holds a synthetic data set with a different config; "
            "pass --overwrite to replace it, or choose another folder"
        )
    # An interrupted run of ours (the marker, no synth.json) is simply redone.
    ours = done.exists() or (out / MARKER).exists()
    if not ours and any(out.iterdir()) and not cfg.overwrite:
        raise UserError(
            f"{out} is not empty and holds no synth.json (not a synthetic data set); "
            "pass --overwrite to write into it anyway (only train/, val/, annotations/, "
            "parts/, classes.txt and synth.json are replaced), or choose another folder"
        )
    remove_owned(out, OWNED)  # only what we write; never anything else in the folder
    return False


def generate(cfg: SynthConfig, progress: bool = True) -> dict[str, Any]:
    """Write the synthetic ImageNet-layout data set described by `cfg` under `cfg.out`.

    The same config (seed included) gives byte-identical files whatever `cfg.workers` is. When
    `cfg.out/synth.json` already records the same content, nothing is written.

    Args:
        cfg: what to generate and where.
        progress: show a progress bar.

    Returns:
        A summary: `out`, `counts` per split, `classes` (wnid -> name), `seconds`, and
        `generated` (False when the existing set was kept).

    Raises:
        UserError: an invalid config, or an output folder that holds something else.
    """
    start = time.perf_counter()
    cfg = resolve_config(cfg)
    out = Path(cfg.out)
    if _check_existing(cfg):
        if has_object_masks(out / "annotations"):
            if progress:
                print(f"{cfg.out} already holds this data set; nothing to do")
            return _summary(cfg, time.perf_counter() - start, generated=False)
        # Made before synth wrote the objects' masks: the same files again, and the masks.
        if progress:
            print(f"{cfg.out} holds this data set without object masks; writing it again")
        remove_owned(out, OWNED)

    indices = [SHAPES.index(name) for name in cfg.classes]
    make_folders(out)
    (out / MARKER).write_text("generation in progress\n")
    (out / "annotations").mkdir()
    if cfg.parts:
        (out / "parts").mkdir()
    for k in indices:
        make_folders(out / "train" / wnid_for(k))
        make_folders(out / "val" / wnid_for(k))
    lines = "".join(f"{wnid_for(k)} {SHAPES[k]}\n" for k in indices)
    (out / "classes.txt").write_text(lines)

    items = [
        ("train", k, i, f"{wnid_for(k)}_{i:05d}")
        for k in indices
        for i in range(cfg.train_per_class)
    ]
    for pos, k in enumerate(indices):  # val stems: one running, 1-based number over the split
        for i in range(cfg.val_per_class):
            items.append(("val", k, i, f"ILSVRC2012_val_{pos * cfg.val_per_class + i + 1:08d}"))
    _run(cfg, items, progress)

    summary = _summary(cfg, time.perf_counter() - start, generated=True)
    record = {"config": _record(cfg), "counts": summary["counts"]}
    record["classes"] = summary["classes"]
    # written last and atomically: its presence = complete
    write_atomic(out / "synth.json", json.dumps(record, indent=2) + "\n")
    (out / MARKER).unlink()
    return summary


def _run(cfg: SynthConfig, items: list, progress: bool) -> None:
    """Render `items`, in chunks, in-process or over a pool of `cfg.workers` processes."""
    import multiprocessing

    from casm_deploy.common.ui import progress as progress_bar

    workers = max(1, cfg.workers)
    size = max(1, min(200, len(items) // (workers * 8)))
    chunks = [(cfg, items[j : j + size]) for j in range(0, len(items), size)]
    bar = progress_bar(disable=not progress)
    with bar:
        task = bar.add_task("synth", total=len(items), info="")
        if workers == 1:
            for chunk in chunks:
                bar.advance(task, _write_chunk(chunk))
            return
        # spawn, not fork: a forked child can inherit a locked OpenCV / OpenMP thread pool.
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers, initializer=_init_worker) as pool:
            for done in pool.imap_unordered(_write_chunk, chunks):
                bar.advance(task, done)


__all__ = ["JPEG_QUALITY", "generate", "make_labelled_sample", "make_sample", "resolve_config"]
