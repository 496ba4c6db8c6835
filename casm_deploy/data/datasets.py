"""Reading an ImageNet-layout data set: classes, image lists, ILSVRC boxes, and the torch loader.

`build_loader` is the one entry point the training uses (the torch loader here, DALI's in
dali.py); it yields `(images, labels, indices)` with images float in [0, 1], (B, 3, S, S),
channels-last. Loaders only decode and resize: the normalisation lives inside the Masker. Box
and part label map transforms mirror the image transforms exactly.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from casm_deploy.errors import UserError

if TYPE_CHECKING:
    from casm_deploy.data.dali import DALILoader

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
RESIZE_POLICIES = ("center-crop", "stretch")  # the paper's appendix: crop, or break the ratio
# Training also knows torchvision's RandomResizedCrop (the reference's ImageNet augmentation),
# whose validation images, and so boxes, take the centre crop.
TRAIN_RESIZES = (*RESIZE_POLICIES, "random-resized-crop")
# RandomResizedCrop's defaults: the crop's share of the image area, and its aspect ratio.
RRC_SCALE, RRC_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
LOADERS = ("torch", "dali", "auto")  # auto: DALI when it imports, else torch


def check_policy(policy: str) -> str:
    """`policy` if it is a resize policy the images and the boxes both know, else a UserError."""
    if policy not in RESIZE_POLICIES:
        raise UserError(f"unknown resize policy {policy!r}: use center-crop or stretch")
    return policy


def validation_policy(resize: str) -> str:
    """The policy of the validation images (and boxes) of a run trained with `resize`."""
    return "center-crop" if resize == "random-resized-crop" else check_policy(resize)


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
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
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
    import cv2

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
    if not png.is_file():
        raise UserError(f"{png}: part label map not found")
    labels = cv2.imdecode(np.fromfile(png, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if labels is None:
        raise UserError(f"{png}: cannot decode the part label map")
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise UserError(
            f"{png}: not a one-channel uint8 label map (shape {labels.shape}, {labels.dtype})"
        )
    if labels.shape != (height, width):
        raise UserError(
            f"{png}: the label map is {labels.shape[1]}x{labels.shape[0]}, "
            f"its image {width}x{height}"
        )
    top = int(labels.max())
    if top > len(listed):
        raise UserError(f"{png}: has label {top}, but {sidecar.name} lists {len(listed)} parts")
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


def decode_image(path: str | Path) -> np.ndarray:
    """Decode an image file into RGB uint8 (H, W, 3).

    Raises:
        UserError: the file cannot be decoded (the message names it).
    """
    import cv2

    try:
        data = np.fromfile(path, dtype=np.uint8)  # np.fromfile + imdecode: non-ASCII names work
    except OSError as error:  # e.g. a file removed or unreadable since it was listed
        raise UserError(f"{path}: cannot read image ({error.strerror or error})") from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise UserError(f"{path}: cannot decode image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def resize_shorter(image: np.ndarray, size: int, interpolation: int | None = None) -> np.ndarray:
    """Resize so that the shorter side is `size` (area interpolation when shrinking, linear
    when growing, unless `interpolation`, a cv2 flag, says otherwise)."""
    import cv2

    h, w = image.shape[:2]
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if interpolation is None:
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (new_w, new_h), interpolation=interpolation)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return image[top : top + size, left : left + size]


def stretch(image: np.ndarray, size: int, interpolation: int | None = None) -> np.ndarray:
    """Resize to `size` x `size`, breaking the ratio (area interpolation unless told)."""
    import cv2

    if interpolation is None:
        interpolation = cv2.INTER_AREA
    return cv2.resize(image, (size, size), interpolation=interpolation)


def transform_labels(labels: np.ndarray, size: int, policy: str = "center-crop") -> np.ndarray:
    """Map a label map (H, W) of an image into the `size` x `size` model frame, as the image.

    The geometry of the validation images (`resize_shorter` then `center_crop`, or `stretch`),
    sampled nearest-neighbour so that labels stay labels. cv2's INTER_NEAREST_EXACT samples
    at pixel centres, like the images' area / linear resize; plain INTER_NEAREST is about half
    an output pixel off, towards the top left.
    """
    import cv2

    nearest = cv2.INTER_NEAREST_EXACT
    if validation_policy(policy) == "stretch":
        return stretch(labels, size, nearest)
    return center_crop(resize_shorter(labels, size, nearest), size)


def random_resized_crop_box(
    height: int, width: int, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """`(top, left, h, w)` of a RandomResizedCrop window, as torchvision's `get_params` draws it.

    Ten tries at a random area share (RRC_SCALE) and log-uniform aspect ratio (RRC_RATIO) that
    fits; failing those, the largest centred window whose ratio is within RRC_RATIO.
    """
    area = height * width
    log_ratio = np.log(RRC_RATIO)
    for _ in range(10):
        target = area * rng.uniform(*RRC_SCALE)
        ratio = np.exp(rng.uniform(*log_ratio))
        w, h = round(np.sqrt(target * ratio)), round(np.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    ratio = width / height
    if ratio < RRC_RATIO[0]:
        w, h = width, round(width / RRC_RATIO[0])
    elif ratio > RRC_RATIO[1]:
        h, w = height, round(height * RRC_RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A RandomResizedCrop(size) of `image`: a random window, resized to size x size."""
    import cv2

    top, left, h, w = random_resized_crop_box(*image.shape[:2], rng)
    window = image[top : top + h, left : left + w]
    interpolation = cv2.INTER_AREA if min(h, w) > size else cv2.INTER_LINEAR
    return cv2.resize(window, (size, size), interpolation=interpolation)


class ImageDataset(Dataset):
    """Decoded, resized uint8 (S, S, 3) images with their labels and indices.

    Training: shorter side to S, random S x S crop, random horizontal flip; with the
    `random-resized-crop` policy, a RandomResizedCrop(S) and the flip. Validation: shorter side
    to S and the centre crop. With the `stretch` policy, the whole image goes to S x S in
    training too, with no crop and no flip. The randomness of a sample depends only on
    (seed, epoch, index), so runs are reproducible whatever the number of workers, and resumable.
    """

    def __init__(
        self,
        samples: list[tuple[Path, int]],
        size: int,
        train: bool,
        seed: int = 0,
        policy: str = "center-crop",
    ):
        self.samples, self.size, self.train, self.seed = samples, size, train, seed
        if policy not in TRAIN_RESIZES:
            raise UserError(f"unknown resize policy {policy!r}: use {', '.join(TRAIN_RESIZES)}")
        self.policy = policy if train else validation_policy(policy)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, int]:
        path, label = self.samples[index]
        image = decode_image(path)
        if self.policy == "stretch":
            # Training as well: no crop and no flip, so the left/right layout of two-copies
            # images (synth --copies 2) survives; a flip would swap the copies.
            return stretch(image, self.size), label, index
        if not self.train:
            return center_crop(resize_shorter(image, self.size), self.size), label, index
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.policy == "random-resized-crop":
            image = random_resized_crop(image, self.size, rng)
        else:
            image = resize_shorter(image, self.size)
            h, w = image.shape[:2]
            top, left = rng.integers(0, h - self.size + 1), rng.integers(0, w - self.size + 1)
            image = image[top : top + self.size, left : left + self.size]
        if rng.random() < 0.5:
            image = image[:, ::-1]
        return np.ascontiguousarray(image), label, index


# --skip-bad-images skips at most this many files in a row: past that the data set is broken,
# not a few of its files.
MAX_SKIPPED_IN_A_ROW = 100


class CheckedDataset(Dataset):
    """An ImageDataset whose files that do not decode come back as problems, not exceptions.

    A DataLoader worker's exception reaches the main process wrapped in the worker's traceback,
    many lines long; returned as data, TorchLoader raises it there as the one-line UserError it
    is, whatever the number of workers. With `skip`, a bad file is replaced by the next sample
    that decodes, so batches keep their size and every shard its number of batches.
    Items: `(image, label, index, problems)`, the problems the bad files' messages, one a line
    ("" when none); index -1 when no file decoded (the image and label are then placeholders).
    """

    def __init__(self, dataset: ImageDataset, skip: bool = False):
        self.dataset, self.skip = dataset, skip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, int, str]:
        n, problems = len(self.dataset), []
        for k in range(min(n, MAX_SKIPPED_IN_A_ROW + 1) if self.skip else 1):
            try:
                image, label, got = self.dataset[(index + k) % n]
                return image, label, got, "\n".join(problems)
            except UserError as error:
                problems.append(str(error))
        size = self.dataset.size
        return np.zeros((size, size, 3), np.uint8), 0, -1, "\n".join(problems)


def epoch_order(
    n: int, *, shuffle: bool, seed: int, epoch: int, fraction: float = 1.0, multiple: int = 1
) -> list[int]:
    """The sample indices of one epoch over all shards, in loading order (every loader's order).

    Shuffled: a permutation seeded by (seed, epoch), cut to `fraction` of the samples, then to a
    multiple of `multiple` (the number of shards, when the last batch is dropped, so that every
    shard gets as many batches). Not shuffled: 0..n-1.
    """
    if not shuffle:
        return list(range(n))
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    keep = max(1, int(n * fraction))
    if keep >= multiple:
        keep -= keep % multiple
    return order[:keep]


def shard_bounds(n: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """The `[start, end)` block of an n-sample list that shard `shard_id` reads.

    Contiguous blocks, split as DALI's file reader splits its list, so both loaders shard alike.
    """
    return n * shard_id // num_shards, n * (shard_id + 1) // num_shards


class TorchLoader:
    """Iterates `(images, labels, indices)` batches from an ImageDataset.

    Images are float in [0, 1], (B, 3, S, S) in channels-last memory, and labels int64, both on
    `device`; indices stay on the CPU. The decoded batch is NHWC uint8: it crosses to a GPU as
    uint8 (4x fewer bytes than float) from pinned memory without blocking, and becomes float
    there; its NCHW view is channels-last without a copy.

    A file that does not decode raises a UserError naming it; with `skip_bad`, it is replaced
    by the next sample that decodes (`CheckedDataset`) and listed in `bad_files` (the messages
    of the files skipped in the last pass, each once).
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        shuffle: bool,
        workers: int,
        fraction: float = 1.0,
        drop_last: bool = False,
        shard_id: int = 0,
        num_shards: int = 1,
        device: str | torch.device = "cpu",
        skip_bad: bool = False,
    ):
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.workers, self.fraction, self.drop_last = workers, fraction, drop_last
        self.shard_id, self.num_shards = shard_id, num_shards
        self.device = torch.device(device)
        self.skip_bad = skip_bad
        self.bad_files: list[str] = []

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = epoch

    @property
    def samples(self) -> list[tuple[Path, int]]:
        return self.dataset.samples

    def indices(self) -> list[int]:
        """This epoch's sample indices for this shard, in loading order."""
        order = epoch_order(
            len(self.dataset),
            shuffle=self.shuffle,
            seed=self.dataset.seed,
            epoch=self.dataset.epoch,
            fraction=self.fraction,
            multiple=self.num_shards if self.drop_last else 1,
        )
        start, end = shard_bounds(len(order), self.shard_id, self.num_shards)
        return order[start:end]

    def __len__(self) -> int:
        n = len(self.indices())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        loader = DataLoader(
            CheckedDataset(self.dataset, self.skip_bad),
            batch_size=self.batch_size,
            sampler=self.indices(),
            num_workers=self.workers,
            drop_last=self.drop_last,
            prefetch_factor=4 if self.workers else None,
            pin_memory=self.device.type == "cuda",
        )
        self.bad_files = []
        for images, labels, indices, problems in loader:
            self._check(indices, problems)
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            images = images.permute(0, 3, 1, 2).float().div_(255)  # NHWC uint8 -> NCHW view
            yield images, labels, indices

    def _check(self, indices: torch.Tensor, problems: list[str]) -> None:
        """Raise the batch's first bad file as a UserError, or (`skip_bad`) list its bad files."""
        for index, problem in zip(indices.tolist(), problems, strict=True):
            if not problem:
                continue
            lines = problem.splitlines()
            if not self.skip_bad:
                raise UserError(lines[0])
            if index < 0:
                raise UserError(f"{lines[0]}, and the {len(lines) - 1} files after it too")
            self.bad_files += [line for line in lines if line not in self.bad_files]


def build_loader(
    root: str | Path,
    split: str,
    wnids: list[str],
    image_size: int,
    batch_size: int,
    *,
    train: bool,
    workers: int = 1,
    seed: int = 0,
    fraction: float = 1.0,
    policy: str = "center-crop",
    loader: str = "torch",
    limit: int = 0,
    shard_id: int = 0,
    num_shards: int = 1,
    device: str = "cpu",
    skip_bad: bool = False,
) -> TorchLoader | DALILoader:
    """The training and validation data loader: a TorchLoader or a `dali.DALILoader`.

    Both yield the same `(images, labels, indices)` batches and have `len`, `set_epoch` and
    `samples`. `loader`: "torch", "dali", or "auto" (DALI when it imports, else torch).
    `limit` keeps the first N images of the split (0: all of them). `shard_id` / `num_shards`
    (global rank / world size) give each process its block of every epoch; `device` is where
    the batches go (cpu, auto, cuda, cuda:N): DALI decodes there, the torch loader decodes on
    the CPU and sends its batches there. `skip_bad`: a file that does not decode is skipped
    (the torch loader's `bad_files` lists them) instead of stopping the pass with a UserError.

    Raises:
        UserError: an unknown loader, "dali" where DALI does not import, or "dali" for training
            with the "stretch" policy or with `skip_bad`.
    """
    if loader not in LOADERS:
        raise UserError(f"--loader {loader!r}: choose one of {', '.join(LOADERS)}")
    if not 0 <= shard_id < num_shards:
        raise UserError(f"shard {shard_id} of {num_shards}: need 0 <= shard_id < num_shards")
    if policy not in TRAIN_RESIZES:
        raise UserError(f"unknown resize policy {policy!r}: use {', '.join(TRAIN_RESIZES)}")
    if train and policy == "stretch" and loader != "torch":
        # DALILoader's training pipeline always takes a random crop and flip; only the torch
        # loader trains on whole stretched images.
        if loader == "dali":
            raise UserError(
                "--loader dali cannot train with --resize stretch (its training pipeline always "
                "crops and flips); use --loader torch"
            )
        loader = "torch"
    if skip_bad and loader != "torch":
        # DALI fails the whole pipeline on a file it cannot decode; it cannot skip one.
        if loader == "dali":
            raise UserError("--loader dali cannot skip bad images; use --loader torch")
        loader = "torch"
    if loader != "torch":
        from casm_deploy.data.dali import dali_available

        if dali_available():
            loader = "dali"
        elif loader == "dali":
            raise UserError(
                "--loader dali: NVIDIA DALI does not import here; "
                "install it with `pip install nvidia-dali-cuda120` or use --loader torch"
            )
        else:
            loader = "torch"
    samples = list_images(root, split, wnids)
    if limit > 0:
        samples = samples[:limit]
    if loader == "dali":
        from casm_deploy.data.dali import DALILoader

        return DALILoader(
            samples,
            image_size,
            batch_size,
            train=train,
            workers=workers,
            seed=seed,
            fraction=fraction,
            policy=policy,
            shard_id=shard_id,
            num_shards=num_shards,
            device=device,
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dataset = ImageDataset(samples, image_size, train=train, seed=seed, policy=policy)
    return TorchLoader(
        dataset,
        batch_size,
        shuffle=train,
        workers=workers,
        fraction=fraction,
        drop_last=train,
        shard_id=shard_id,
        num_shards=num_shards,
        device=device,
        skip_bad=skip_bad,
    )
