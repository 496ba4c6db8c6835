"""An ImageNet-layout data set on disk: its classes, its image lists, and its annotations.

`train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG` (as `synth.py` writes them, or ImageNet itself),
`classes.txt`, the ILSVRC XML boxes in `annotations/` (with, where they exist, the objects'
pixel masks beside them as `<stem>.png`) and, for a parts set, the part label maps in `parts/`.
The loaders (`loader.build_loader`) read the images; validation and the benchmark read the
boxes, masks and label maps here, brought to the model frame as the images are
(`transforms.py`).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from casm_deploy.data.imagefiles import EXTENSIONS
from casm_deploy.data.transforms import transform_labels, validation_policy
from casm_deploy.errors import UserError


@dataclass(frozen=True)
class DatasetInfo:
    """Classes of a data set in label order: `wnids[i]` is label i (sorted folder names)."""

    root: Path
    wnids: list[str]
    names: list[str]


def read_classes(root: str | Path, split: str = "") -> DatasetInfo:
    """Class list of an ImageNet-layout folder: `classes.txt` if present, else `train/` folders,
    else (when a `split` is given, as eval does) that split's folders: a test set of its own
    classes needs no class list to be scored on its boxes.

    Raises:
        UserError: the folder is missing or has neither a class list nor a `train/` folder
            (nor a `split` folder, when one is given).
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such data folder (run `casm-deploy data synth {root}`)")
    listing = root / "classes.txt"
    if listing.is_file():
        entries = []
        for line_no, line in enumerate(listing.read_text().splitlines(), 1):
            if not line.strip():
                continue
            wnid, _, name = line.strip().partition(" ")
            if not wnid:
                raise UserError(f"{listing}:{line_no}: expected '<wnid> <name>'")
            entries.append((wnid, name.strip() or wnid))
        entries.sort()
    elif (root / "train").is_dir():
        entries = [(p.name, p.name) for p in sorted((root / "train").iterdir()) if p.is_dir()]
    elif split and (root / split).is_dir():
        entries = [(p.name, p.name) for p in sorted((root / split).iterdir()) if p.is_dir()]
    else:
        raise UserError(f"{root}: no classes.txt and no train/ folder; not an ImageNet layout")
    if not entries:
        raise UserError(f"{root}: no classes found")
    return DatasetInfo(root, [w for w, _ in entries], [n for _, n in entries])


def list_images(root: str | Path, split: str, wnids: list[str]) -> list[tuple[Path, int]]:
    """`(path, label)` for every image under `root/split/<wnid>/`, sorted, labels by `wnids`.

    Raises:
        UserError: the split folder is missing or empty.
    """
    folder = Path(root) / split
    if not folder.is_dir():
        raise UserError(f"{folder}: missing (expected {split}/<wnid>/*.JPEG)")
    samples = []
    for label, wnid in enumerate(wnids):
        class_dir = folder / wnid
        if not class_dir.is_dir():
            continue
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in EXTENSIONS)
        samples.extend((p, label) for p in files)
    if not samples:
        raise UserError(f"{folder}: no images of the known classes")
    return samples


@dataclass(frozen=True)
class Annotation:
    """One ILSVRC / PASCAL VOC XML file: image size and `(wnid, [x0, y0, x1, y1])` objects."""

    width: int
    height: int
    objects: list[tuple[str, list[float]]]

    def boxes_of(self, wnid: str) -> list[list[float]]:
        return [box for name, box in self.objects if name == wnid]


def read_annotation(path: str | Path) -> Annotation:
    """Parse an ILSVRC XML annotation.

    Raises:
        UserError: the file is missing or malformed (the message names it).
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
        size = root.find("size")
        width, height = int(size.findtext("width")), int(size.findtext("height"))
        objects = []
        for obj in root.iter("object"):
            box = obj.find("bndbox")
            coords = [float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            objects.append((obj.findtext("name").strip(), coords))
    except FileNotFoundError:
        raise UserError(f"{path}: annotation not found") from None
    except (ET.ParseError, AttributeError, TypeError, ValueError) as error:
        raise UserError(f"{path}: not a valid ILSVRC annotation ({error})") from None
    return Annotation(width, height, objects)


def transform_box(
    box: list[float], width: int, height: int, size: int, policy: str = "center-crop"
) -> list[int]:
    """Map a box of a `width` x `height` image into the `size` x `size` model frame.

    `center-crop`: shorter side to `size`, then the centre crop (the default of the paper's
    appendix); `stretch`: straight to `size` x `size` ("break ratio"); a run trained with
    `random-resized-crop` validates on the centre crop. Truncates to int as the reference
    `score.py` does; the result may extend outside the frame.
    """
    if validation_policy(policy) == "stretch":
        sx, sy, cut_x, cut_y = size / width, size / height, 0.0, 0.0
    else:
        scale = size / min(width, height)
        sx = sy = scale
        cut_x, cut_y = (width * scale - size) / 2, (height * scale - size) / 2
    x0, y0, x1, y1 = box
    return [int(sx * x0 - cut_x), int(sy * y0 - cut_y), int(sx * x1 - cut_x), int(sy * y1 - cut_y)]


def own_boxes(
    image_path: Path, wnid: str, annotations: Path, size: int, policy: str = "center-crop"
) -> list[list[int]]:
    """The boxes of class `wnid` in `annotations/<image stem>.xml`, mapped to the model frame.

    Raises:
        UserError: the annotation is missing, malformed, or has no box of that class.
    """
    annotation = read_annotation(Path(annotations) / f"{Path(image_path).stem}.xml")
    boxes = annotation.boxes_of(wnid)
    if not boxes:
        raise UserError(f"{image_path}: its annotation has no box of class {wnid}")
    return [transform_box(b, annotation.width, annotation.height, size, policy) for b in boxes]


def read_parts(parts: Path, stem: str, width: int, height: int) -> np.ndarray:
    """The part label map of one image, `parts/<stem>.png`, checked against `parts/<stem>.json`.

    The PNG is a one-channel uint8 map at the image's original size, `width` x `height`
    (0: no part, k + 1: the pixels of part k); the JSON lists the parts,
    `{"parts": [{"name": ..., "box": [x0, y0, x1, y1]}, ...], "favourite": k}`.

    Raises:
        UserError: either file is missing or malformed, the map is not `width` x `height`,
            or it has a label the JSON lists no part for (the message names the file).
    """
    sidecar = Path(parts) / f"{stem}.json"
    try:
        listed = json.loads(sidecar.read_text())["parts"]
        if not isinstance(listed, list) or not listed:
            raise ValueError('"parts" is not a non-empty list')
        for part in listed:
            if not isinstance(part["name"], str) or len(part["box"]) != 4:
                raise ValueError("a part needs a name and a box [x0, y0, x1, y1]")
    except FileNotFoundError:
        raise UserError(f"{sidecar}: part annotation not found") from None
    except OSError as error:
        raise UserError(f"{sidecar}: cannot read ({error.strerror or error})") from None
    except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise UserError(f"{sidecar}: not a valid part annotation ({error})") from None

    png = Path(parts) / f"{stem}.png"
    labels = _read_label_map(png, width, height, "part label map")
    top = int(labels.max())
    if top > len(listed):
        raise UserError(f"{png}: has label {top}, but {sidecar.name} lists {len(listed)} parts")
    return labels


def _read_label_map(png: Path, width: int, height: int, kind: str) -> np.ndarray:
    """A one-channel uint8 PNG at the image's size, `width` x `height` (`kind` names it).

    Raises:
        UserError: the file is missing, undecodable, not one-channel uint8, or of another size.
    """
    import cv2

    if not png.is_file():
        raise UserError(f"{png}: {kind} not found")
    labels = cv2.imdecode(np.fromfile(png, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if labels is None:
        raise UserError(f"{png}: cannot decode the {kind}")
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise UserError(
            f"{png}: not a one-channel uint8 label map (shape {labels.shape}, {labels.dtype})"
        )
    if labels.shape != (height, width):
        raise UserError(
            f"{png}: the label map is {labels.shape[1]}x{labels.shape[0]}, "
            f"its image {width}x{height}"
        )
    return labels


def own_parts(
    image_path: Path, annotations: Path, parts: Path, size: int, policy: str = "center-crop"
) -> np.ndarray:
    """The part label map of an image (`read_parts`), brought to the model frame like the image.

    The image's original size is its annotation's, the one its boxes are transformed from.

    Raises:
        UserError: the annotation or either part file is missing or malformed.
    """
    stem = Path(image_path).stem
    annotation = read_annotation(Path(annotations) / f"{stem}.xml")
    labels = read_parts(parts, stem, annotation.width, annotation.height)
    return transform_labels(labels, size, policy)


def has_object_masks(annotations: Path) -> bool:
    """Whether the annotations folder holds object masks (`<stem>.png` beside the XMLs)."""
    return next(Path(annotations).glob("*.png"), None) is not None


def read_object_masks(annotations: Path, stem: str, annotation: Annotation) -> np.ndarray:
    """The object mask of one image, `annotations/<stem>.png`, beside its XML `annotation`.

    A one-channel uint8 map at the image's size (the XML's): 0 where no object is, k on the
    pixels of the XML's k-th object (as `data synth` writes them).

    Raises:
        UserError: the file is missing or malformed, is not the image's size, or has a label
            the XML lists no object for (the message names the file).
    """
    png = Path(annotations) / f"{stem}.png"
    labels = _read_label_map(png, annotation.width, annotation.height, "object mask")
    top, listed = int(labels.max()), len(annotation.objects)
    if top > listed:
        raise UserError(f"{png}: has label {top}, but {stem}.xml lists {listed} objects")
    return labels


def own_object_mask(
    image_path: Path, wnid: str, annotations: Path, size: int, policy: str = "center-crop"
) -> np.ndarray:
    """The pixels of the objects of class `wnid` in an image (`read_object_masks`), as a bool
    `size` x `size` map in the model frame, brought there like the image (`transform_labels`).

    Raises:
        UserError: the annotation or the mask is missing or malformed.
    """
    stem = Path(image_path).stem
    annotation = read_annotation(Path(annotations) / f"{stem}.xml")
    labels = transform_labels(read_object_masks(annotations, stem, annotation), size, policy)
    own = [k + 1 for k, (name, _) in enumerate(annotation.objects) if name == wnid]
    return np.isin(labels, own)
