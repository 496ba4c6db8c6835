"""Tiny ImageNet (CS231n: 64x64 JPEG photos of 200 ImageNet classes, one box each) in the
ImageNet layout every command reads: `casm-deploy data tiny-imagenet SRC [OUT]`.

SRC is the official `tiny-imagenet-200.zip` or the folder it was extracted to, read through
`archive.py` (by the layout's names, never extracted):

    <top>/wnids.txt, <top>/words.txt (<wnid> TAB <names, comma separated>)
    <top>/train/<wnid>/images/<wnid>_<i>.JPEG, <top>/train/<wnid>/<wnid>_boxes.txt
    <top>/val/images/val_<i>.JPEG, <top>/val/val_annotations.txt

OUT gets what `imagenet.py` reads, as `data synth` writes it: `train/<wnid>/<wnid>_<i>.JPEG` and
`val/<wnid>/val_<i>.JPEG` (the JPEG bytes as they are; grayscale ones too, which every reader
decodes to RGB), `classes.txt` (each class's first name in words.txt), `annotations/<stem>.xml`
for every image of both splits (so `eval --split train` scores too) and `tiny-imagenet.json`,
the record (settings, the source's identity, counts, skips). Every output path is built here
from a checked wnid (`n` + 8 digits) and file name (`<wnid>_<digits>.JPEG`, `val_<digits>.JPEG`).

The conversion is written into OUT/.tiny-imagenet.partial/ and moved in place at the end, the
record last (`tinyimagenet_out.py`). What is wrong with the data (a missing file, a line that
does not parse, a box outside its image, a damaged zip) is a one-line UserError naming the file
and line; a member that is not to be trusted (`archive.refusal`, an unexpected name, a file
that is not a JPEG this package reads) is skipped with one warning line, and counted.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from casm_deploy.config import TinyImagenetConfig, config_to_dict
from casm_deploy.data.archive import Member, Source, open_source, refusal, shown
from casm_deploy.data.imagefiles import ImageError, check_bytes
from casm_deploy.data.tinyimagenet_out import SETTLED, Output
from casm_deploy.errors import UserError

WNIDS, WORDS, VAL_ANNOTATIONS = "wnids.txt", "words.txt", "val/val_annotations.txt"
WNID = re.compile(r"n[0-9]{8}")  # ASCII digits: \d would take any script's
VAL_NAME = re.compile(r"val_[0-9]+\.JPEG")
IMAGE_CAP = 1 << 20  # a 64x64 JPEG takes a few kB
TEXT_CAP = 64 << 20  # the official words.txt, of 82k wnids, takes 2.6 MB
SUMMARY = ("out", "classes", "counts", "seconds")


@dataclass(frozen=True)
class Box:
    """One line of an annotation file: the image's class and box as Tiny ImageNet gives it,
    right and bottom INCLUSIVE, and where it was read (`file:line`)."""

    wnid: str
    box: tuple[int, int, int, int]
    where: str


@dataclass(frozen=True)
class Job:
    split: str
    wnid: str  # the class folder it comes from ("" for val/images)
    member: Member
    boxes: dict[str, Box]
    annotations: str  # the annotation file's name, for "missing ... line"


def _lines(text: str):
    """(line number, stripped line) of the lines that are not blank."""
    return ((n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip())


def read_wnids(source: Source) -> list[str]:
    """wnids.txt's classes, sorted (their label order).

    Raises:
        UserError: missing, refused, a line that is not a wnid, or no class at all.
    """
    wnids = set()
    for n, line in _lines(source.text(WNIDS, TEXT_CAP)):
        if not WNID.fullmatch(line):
            raise UserError(f"{source.where(WNIDS)}:{n}: not a wnid (n and 8 digits): {line!r:.60}")
        wnids.add(line)
    if not wnids:
        raise UserError(f"{source.where(WNIDS)}: no classes")
    return sorted(wnids)


def choose(cfg: TinyImagenetConfig, wnids: list[str], listed: str) -> list[str]:
    """The classes to convert: those of --wnids FILE, the first --classes N, or all.

    Raises:
        UserError: FILE is missing, names a wnid not in wnids.txt (`listed` names it) or none;
            N is more than there are.
    """
    if cfg.classes > len(wnids):
        raise UserError(f"--classes {cfg.classes}: {listed} has {len(wnids)} classes")
    if not cfg.wnids:
        return wnids[: cfg.classes or len(wnids)]
    try:
        text = Path(cfg.wnids).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--wnids {cfg.wnids}: cannot read ({error})") from None
    chosen = set()
    for n, line in _lines(text):
        if line not in wnids:
            raise UserError(f"{cfg.wnids}:{n}: {line!r:.60} is not a class of {listed}")
        chosen.add(line)
    if not chosen:
        raise UserError(f"{cfg.wnids}: lists no wnid")
    return sorted(chosen)


def read_names(source: Source, chosen: list[str]) -> dict[str, str]:
    """Each chosen class's name: the first of its names in words.txt (its wnid where none)."""
    names = dict.fromkeys(chosen, "")
    for n, line in _lines(source.text(WORDS, TEXT_CAP)):
        wnid, tab, words = line.partition("\t")
        if not tab and not WNID.fullmatch(wnid):  # a wnid alone: no name
            raise UserError(f"{source.where(WORDS)}:{n}: expected '<wnid><TAB><names>'")
        if wnid in names and not names[wnid]:
            names[wnid] = " ".join(words.split(",")[0].split())
    return {wnid: name or wnid for wnid, name in names.items()}


def read_boxes(source: Source, rel: str, known: set[str], wnid: str = "") -> dict[str, Box]:
    """An annotation file: `<file> x0 y0 x1 y1` lines of class `wnid` (a class's
    <wnid>_boxes.txt), or `<file> <wnid> x0 y0 x1 y1` (val_annotations.txt), by file name.

    Raises:
        UserError: missing, refused, or a line that does not parse, lists a file again, has
            an unknown wnid or a box whose right or bottom is left of or above its start.
    """
    boxes: dict[str, Box] = {}
    for n, line in _lines(source.text(rel, TEXT_CAP)):
        where, fields = f"{source.where(rel)}:{n}", line.split()
        form = "<file> x0 y0 x1 y1" if wnid else "<file> <wnid> x0 y0 x1 y1"
        try:
            if len(fields) != len(form.split()):
                raise ValueError
            x0, y0, x1, y1 = (int(f) for f in fields[-4:])
        except ValueError:
            raise UserError(f"{where}: expected '{form}', got {line!r:.80}") from None
        name, line_wnid = fields[0], wnid or fields[1]
        if line_wnid not in known:
            raise UserError(f"{where}: {line_wnid!r:.40} is not a class of {WNIDS}")
        if x1 < x0 or y1 < y0:
            raise UserError(f"{where}: box {x0} {y0} {x1} {y1} ends before it starts")
        if name in boxes:
            raise UserError(f"{where}: {name!r:.60} listed again (first at {boxes[name].where})")
        boxes[name] = Box(line_wnid, (x0, y0, x1, y1), where)
    return boxes


def plan(source: Source, wnids: list[str], chosen: list[str]) -> list[Job]:
    """Every image member of the chosen classes, with its annotation file's boxes.

    Raises:
        UserError: a class's folder, its boxes file, val/images or val_annotations.txt is
            missing, or an annotation file is wrong (`read_boxes`).
    """
    known, jobs = set(wnids), []
    for wnid in chosen:
        rel = f"train/{wnid}/{wnid}_boxes.txt"
        boxes = read_boxes(source, rel, known, wnid)
        for member in _listing(source, f"train/{wnid}/images"):
            jobs.append(Job("train", wnid, member, boxes, rel.rpartition("/")[2]))
    boxes = read_boxes(source, VAL_ANNOTATIONS, known)
    for member in _listing(source, "val/images"):
        jobs.append(Job("val", "", member, boxes, VAL_ANNOTATIONS.rpartition("/")[2]))
    return jobs


def _listing(source: Source, folder: str) -> list[Member]:
    members = source.listing(folder)
    if members is None:
        raise UserError(f"{source.where(folder)}/: missing (not Tiny ImageNet's layout?)")
    return members


def _exclusive(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Tiny ImageNet's box (right and bottom inclusive: 0..63 covers a 64-px image; over the
    5,000 boxes of the 100-class half's val split, x1 and y1 reach 63, never 64, and x0
    reaches 0) as this package's boxes are (right and bottom exclusive, as
    `draw.tight_box` makes them and `metrics.box_area` measures them): x1 + 1, y1 + 1."""
    x0, y0, x1, y1 = box
    return x0, y0, x1 + 1, y1 + 1


def annotation_xml(split: str, stem: str, wnid: str, width: int, height: int, box) -> str:
    """An ILSVRC-style XML annotation of one object (`box` with exclusive right and bottom)."""
    x0, y0, x1, y1 = box
    return (
        f"<annotation>\n\t<folder>{split}</folder>\n\t<filename>{stem}</filename>\n"
        "\t<source>\n\t\t<database>Tiny ImageNet</database>\n\t</source>\n"
        f"\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n"
        "\t\t<depth>3</depth>\n\t</size>\n\t<segmented>0</segmented>\n"
        f"\t<object>\n\t\t<name>{wnid}</name>\n\t\t<pose>Unspecified</pose>\n"
        "\t\t<truncated>0</truncated>\n\t\t<difficult>0</difficult>\n\t\t<bndbox>\n"
        f"\t\t\t<xmin>{x0}</xmin>\n\t\t\t<ymin>{y0}</ymin>\n"
        f"\t\t\t<xmax>{x1}</xmax>\n\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        "</annotation>\n"
    )


def _screen(source: Source, job: Job, chosen: set[str]) -> tuple[str, Box | None]:
    """Why the job's member is skipped ("" when it is not), and its box (None: a val image of
    a class not chosen, left out silently).

    Raises:
        UserError: an image with no line in its annotation file.
    """
    name = job.member.rel.rpartition("/")[2]
    valid = VAL_NAME.fullmatch(name) if job.split == "val" else _train_name(name, job.wnid)
    if not valid:
        return "not a Tiny ImageNet image name", None
    reason = refusal(job.member, IMAGE_CAP)
    if reason:
        return reason, None
    box = job.boxes.get(name)
    if box is None:
        raise UserError(f"{source.where(job.member.rel)}: missing {job.annotations} line")
    return "", box if box.wnid in chosen else None


def _train_name(name: str, wnid: str) -> bool:
    stem, _, digits = name.removesuffix(".JPEG").rpartition("_")
    return name.endswith(".JPEG") and stem == wnid and digits.isdigit() and digits.isascii()


def _check_jpeg(data: bytes) -> tuple[str, int, int, bool]:
    """Why `data` is not a JPEG this package reads ("" when it is), its width and height from
    its header, and whether it is grayscale."""
    import cv2

    if not data.startswith(b"\xff\xd8\xff"):
        return "not a JPEG (no FF D8 FF start)", 0, 0, False
    try:
        encoded = check_bytes(data)
    except ImageError as error:
        return f"not a usable JPEG ({error})", 0, 0, False
    if encoded.orientation != 1:  # the readers would turn it, and its box would not follow
        return f"has an EXIF orientation ({encoded.orientation})", 0, 0, False
    flags = cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION
    pixels = cv2.imdecode(encoded.data, flags)
    if pixels is None or pixels.shape != (encoded.height, encoded.width):
        return "not a JPEG OpenCV decodes", 0, 0, False
    return "", encoded.width, encoded.height, encoded.mode == "L"


def convert_one(source: Source, job: Job, box: Box, stage: str) -> tuple[str, bool]:
    """Write one image and its annotation under `stage`; returns why it was skipped ("" when
    it was not) and whether it is grayscale.

    Raises:
        UserError: a damaged member, or a box outside its image.
    """
    data = source.read(job.member, IMAGE_CAP)
    reason, width, height, gray = _check_jpeg(data)
    if reason:
        return reason, False
    x0, y0, x1, y1 = box.box
    name = job.member.rel.rpartition("/")[2]  # checked by _screen: a plain name
    if x0 < 0 or y0 < 0 or x1 > width - 1 or y1 > height - 1:
        raise UserError(
            f"{box.where}: box {x0} {y0} {x1} {y1} outside the {width}x{height} image {name} "
            "(coordinates run from 0 to width - 1 and height - 1)"
        )
    stem = name.removesuffix(".JPEG")
    with open(os.path.join(stage, job.split, box.wnid, name), "xb") as f:
        f.write(data)
    xml = annotation_xml(job.split, stem, box.wnid, width, height, _exclusive(box.box))
    with open(os.path.join(stage, "annotations", f"{stem}.xml"), "x") as f:
        f.write(xml)
    return "", gray


def _run(source: Source, jobs: list[Job], chosen: list[str], stage: Path, progress: bool):
    """Convert `jobs` into `stage`; returns the counts and the skipped members' lines."""
    from casm_deploy.common.ui import progress as progress_bar

    counts = dict.fromkeys(("train", "val", "grayscale"), 0)
    skipped, wanted, folder = [], set(chosen), str(stage)
    bar = progress_bar(disable=not progress)
    with bar:
        task = bar.add_task("tiny-imagenet", total=len(jobs), info="")
        for job in jobs:
            reason, box = _screen(source, job, wanted)
            if not reason and box is not None:
                reason, gray = convert_one(source, job, box, folder)
                counts["grayscale"] += gray and not reason
            if reason:
                skipped.append(warn(source.where(job.member.rel), reason, bar))
            elif box is not None:
                counts[job.split] += 1
            bar.advance(task)
    return counts, skipped


def warn(where: str, reason: str, bar=None) -> str:
    """Print one warning line about a member that is skipped; returns it."""
    from casm_deploy.common.ui import console

    line = f"{where}: {reason}; skipped"
    (bar.console if bar is not None else console).print(
        f"warning: {line}", markup=False, highlight=False, soft_wrap=True
    )
    return line


def convert(cfg: TinyImagenetConfig, progress: bool = True) -> dict[str, Any]:
    """Convert Tiny ImageNet at `cfg.src` into the ImageNet layout under `cfg.out`.

    When `cfg.out`'s record already says the same classes of the same source, nothing is done.

    Returns:
        A summary: `out`, `classes` (wnid -> name), `counts` (train, val, grayscale, skipped),
        `seconds`, and `converted` (False when the existing conversion was kept).

    Raises:
        UserError: a source that cannot be converted, or an OUT that holds something else or
            cannot be written.
    """
    with open_source(cfg.src, WNIDS) as source:
        unsafe = "an absolute name or one with '..'"
        skipped = [warn(f"{source.path}:{shown(name)}", unsafe) for name in source.unsafe]
        wnids = read_wnids(source)
        chosen = choose(cfg, wnids, source.where(WNIDS))
        try:
            summary = _convert_into(cfg, source, wnids, chosen, skipped, progress)
        except OSError as error:  # OUT's side: what the source's reading raises is a UserError
            named = f" {error.filename}" if error.filename else ""
            raise UserError(f"{cfg.out}: cannot write{named} ({error.strerror or error})") from None
    if summary["converted"] and progress:
        counts = summary["counts"]
        print(
            f"{cfg.out}: {len(chosen)} classes, {counts['train']:,} train and "
            f"{counts['val']:,} val images ({counts['grayscale']:,} grayscale), "
            f"{counts['skipped']:,} skipped, in {summary['seconds']:.1f} s"
        )
    elif progress:
        print(f"{cfg.out} already holds this conversion; nothing to do")
    return summary


def _convert_into(
    cfg: TinyImagenetConfig,
    source: Source,
    wnids: list[str],
    chosen: list[str],
    skipped: list[str],
    progress: bool,
) -> dict[str, Any]:
    """`convert` once the classes are chosen: OUT checked, then the conversion staged and
    settled (`tinyimagenet_out.Output`), or nothing done when OUT already holds it."""
    start = time.perf_counter()
    key = {"source": source.identity(), "wnids": chosen}
    out = Output(Path(cfg.out), key, cfg.overwrite, source.root)
    if out.state == SETTLED:
        old = out.recorded()
        return {k: old.get(k) for k in SUMMARY} | {"out": cfg.out, "converted": False}
    folders = ["annotations", *(f"{s}/{wnid}" for s in ("train", "val") for wnid in chosen)]
    with out.staging(folders) as stage:
        names = read_names(source, chosen)
        counts, more = _run(source, plan(source, wnids, chosen), chosen, stage, progress)
        counts["skipped"] = len(skipped) + len(more)
        seconds = round(time.perf_counter() - start, 3)
        summary = {"out": cfg.out, "classes": names, "counts": counts, "seconds": seconds}
        record = {"config": config_to_dict(cfg), **summary, "skipped": skipped + more}
        out.settle(stage, names, record)
    return {**summary, "converted": True}
