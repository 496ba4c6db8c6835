"""`casm-deploy eval`: the paper's localisation benchmark (LE / OM / F1), MaxBoxAccV2 and, where
the data has object masks, PxAP (Choe et al., CVPR 2020), baselines, the classification of
masked images by many classifiers (§3.3, Fig. 3) and, with --faithfulness, deletion / insertion
AUC and ROAD against a judge classifier (`faithfulness`).

One streamed pass over the data: each batch is decoded once, every method (the models, then
the centre / full / Grad-CAM and other CAM baselines) masks it, timed (`timed`), and the masks,
with their truth, are added to each of the method's meters (`meters`, chosen by
`methods.choose_meters`). The JSON records and the tables' columns are the meters' results, then
the milliseconds per image the masks took. Memory stays bounded whatever the number of images.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table

from casm_deploy.common.files import make_folders
from casm_deploy.common.paths import check_file
from casm_deploy.common.ui import console, progress
from casm_deploy.config import EvalConfig, config_to_dict
from casm_deploy.data.imagenet import (
    DatasetInfo,
    has_object_masks,
    own_boxes,
    own_object_mask,
    own_parts,
    read_classes,
)
from casm_deploy.data.loader import build_loader
from casm_deploy.data.transforms import check_policy
from casm_deploy.errors import UserError
from casm_deploy.evaluation import boxacc, faithfulness
from casm_deploy.evaluation.leak import mask_only_accuracy
from casm_deploy.evaluation.masking import binarize, inpaint, masked_in, masked_out
from casm_deploy.evaluation.meters import PART_KEYS, Batch
from casm_deploy.evaluation.methods import Method, build_methods, load_classifiers

VARIANTS = ("clean", "masked_in", "masked_out", "inpainted")
# The printed tables' columns are the records' keys: those of Choe et al.'s metrics go to a
# table of their own, with each method's cost (the paper's table, with parts, has no room for
# it), the notes are lines under them, and every other key is a column of the paper's table.
# A key is its own header unless named here: short two-line headers keep that table within 120
# columns (the console's width in logs).
CHOE_KEYS = (*boxacc.KEYS, "PxAP")
COST_KEYS = ("ms_per_image",)
# --faithfulness: a third table, its judge named in the title
FAITHFULNESS_KEYS = (*faithfulness.KEYS, "n_faithfulness_images")
NOTES = ("OM_note", "faithfulness_judge")
HEADERS = {
    "mask_mean": "area",
    "mask_std": "std",
    "mask_entropy": "entropy",
    "mask_tv": "TV",
    "copy_share_lighter": "lighter copy",
    "copy_touch_both": "both copies",
    "part_coverage": "parts",
    "parts_all_touched": "all\nparts",
    "part_share_least": "least\npart",
    "n_part_images": "part\nimages",
    "n_images": "images",
    "ms_per_image": "ms /\nimage",
    "deletion_auc": "deletion\nAUC",
    "insertion_auc": "insertion\nAUC",
    "road_morf": "ROAD\nMoRF",
    "road_lerf": "ROAD\nLeRF",
    "road_combined": "ROAD\ncombined",
    "n_faithfulness_images": "images",
    **{k: k.replace("@", "\nIoU ") for k in boxacc.KEYS},
}


@dataclass(frozen=True)
class Truth:
    """Where the split's ground truth lies, read per batch in the model frame."""

    annotations: Path  # the ILSVRC-style XML boxes
    parts: Path | None  # DATA/parts/ (data of `synth --parts`); None: no part coverage
    wnids: list[str]  # data label -> wnid, of the classes scored
    size: int  # the model frame, S x S
    policy: str  # --resize
    masks: bool = False  # the XMLs have object masks beside them: PxAP is scored

    def boxes(self, samples: list) -> list:
        """Each image's boxes of its own class."""
        return [
            own_boxes(p, self.wnids[y], self.annotations, self.size, self.policy)
            for p, y in samples
        ]

    def object_masks(self, samples: list) -> list | None:
        """Each image's pixels of its own class's objects (bool), or None without masks."""
        if not self.masks:
            return None
        return [
            own_object_mask(p, self.wnids[y], self.annotations, self.size, self.policy)
            for p, y in samples
        ]

    def part_maps(self, samples: list) -> list | None:
        """Each image's part label map, or None without DATA/parts/."""
        if self.parts is None:
            return None
        return [
            own_parts(p, self.annotations, self.parts, self.size, self.policy) for p, _ in samples
        ]


@torch.no_grad()
def run(cfg: EvalConfig) -> dict:
    """Score every method on `cfg.data`; print the tables; write `cfg.json` when given.

    The data's classes: its classes.txt, else its train/ folders, else (a test set of its own)
    the folders of `cfg.split`. LE, F1 and MaxBoxAccV2 need only the boxes; OM needs the
    model's classes. When the annotations folder has object masks (`<stem>.png` beside the XMLs,
    as `data synth` writes), every image of the split needs its mask and PxAP is scored too.
    When DATA has a parts/ folder (`data synth --parts`), every image of the split needs its
    part label map and list there, and part coverage is scored too (`coverage.part_coverage`).

    Returns:
        {"scores": {method: {LE, OM, F1, F1a, mask_*, MaxBoxAccV2, MaxBoxAcc@0.3 / 0.5 / 0.7,
                             n_images; with object masks also PxAP; with `cfg.copies` also
                             copy_share_lighter, copy_touch_both; when DATA has a parts/
                             folder also part_coverage, parts_all_touched, part_share_least,
                             n_part_images; OM_note when some images are of classes the
                             model does not know (OM leaves them out), or a masks-only
                             model predicts none (no OM); with `cfg.faithfulness` also
                             deletion_auc, insertion_auc, road_morf, road_lerf, road_combined,
                             faithfulness_judge, n_faithfulness_images; last, ms_per_image:
                             milliseconds per image spent making the masks}},
         "classifiers": {mask model: {classifier: {clean, masked_in, masked_out, inpainted}}},
         "leak": {mask model: `leak.mask_only_accuracy`'s dict} with `cfg.leak_control`}
    """
    if cfg.json:
        check_file(Path(cfg.json), "--json")
    info, annotations, parts, masks = open_split(cfg)
    methods, size, wnids = build_methods(cfg, info.wnids, parts=parts is not None, masks=masks)
    classifiers = load_classifiers(cfg.classifiers, wnids)
    loader = build_loader(
        cfg.data,
        cfg.split,
        wnids,
        size,
        cfg.batch_size,
        train=False,
        workers=cfg.workers,
        policy=cfg.resize,
        limit=cfg.limit,
    )
    truth = Truth(annotations, parts, wnids, size, cfg.resize, masks)
    counts = score_split(cfg, loader, truth, methods, classifiers)

    scores = {m.name: m.result() for m in methods}
    for method in methods:
        if method.is_model and scores[method.name].get("OM_note"):
            console.print(f"{method.name}: {scores[method.name]['OM_note']}")
    accuracy = classifier_accuracy(counts) if classifiers else {}
    leak = leak_control(cfg, methods, wnids, size) if cfg.leak_control else {}
    print_tables(scores, accuracy, leak, methods[0].name, cfg)
    if cfg.json:
        write_json(Path(cfg.json), scores, accuracy, leak, methods[0].name, cfg)
    return {"scores": scores, "classifiers": accuracy, "leak": leak}


def open_split(cfg: EvalConfig) -> tuple[DatasetInfo, Path, Path | None, bool]:
    """The data's classes, its annotations folder, its parts/ folder (None without one), and
    whether the annotations have object masks.

    Raises:
        UserError: no annotations folder, or an unknown resize policy.
    """
    info = read_classes(cfg.data, split=cfg.split)
    root = Path(cfg.data)
    if not (root / "classes.txt").is_file() and not (root / "train").is_dir():
        console.print(
            f"{root}: no classes.txt and no train/: the classes are {cfg.split}/'s folder names"
        )
    annotations = Path(cfg.annotations) if cfg.annotations else Path(cfg.data) / "annotations"
    if not annotations.is_dir():
        raise UserError(f"{annotations}: no annotations folder (pass --annotations DIR)")
    check_policy(cfg.resize)
    masks = has_object_masks(annotations)  # then every image needs its own (PxAP)
    parts = root / "parts"
    if not parts.is_dir():
        return info, annotations, None, masks
    console.print(f"{parts}: also scoring part coverage ({', '.join(PART_KEYS[:3])})")
    return info, annotations, parts, masks


def score_split(
    cfg: EvalConfig, loader, truth: Truth, methods: list[Method], classifiers: list[tuple]
) -> dict:
    """The one streamed pass: every method masks each batch once, into its meters.

    Returns:
        counts[mask model][classifier][variant] = [right, seen] over images of known classes.
    """
    counts = {
        m.name: {c[0]: {v: [0, 0] for v in VARIANTS} for c in classifiers}
        for m in methods
        if m.is_model
    }
    with progress(transient=True) as bars:
        task = bars.add_task(f"eval {cfg.split}", total=len(loader), info="")
        for images, labels, indices in loader:
            samples = [loader.dataset.samples[i] for i in indices.tolist()]
            gt_boxes = truth.boxes(samples)
            if cfg.copies:
                check_two_copies(samples, gt_boxes)
            part_maps = truth.part_maps(samples)
            object_masks = truth.object_masks(samples)
            outputs = [timed(method, images) for method in methods]
            first_logits = outputs[0][1]  # the first method is always a model (None: masks-only)
            for method, (masks, logits) in zip(methods, outputs, strict=True):
                if not method.is_model:  # a baseline: OM by the first model's classifier
                    logits = first_logits
                score_batch(
                    method, masks, logits, labels, gt_boxes, part_maps, object_masks, images
                )
                if method.name in counts and classifiers:
                    count_classifications(counts[method.name], classifiers, images, masks, labels)
            bars.advance(task)
    return counts


def timed(method: Method, images: torch.Tensor) -> tuple:
    """`method.masks(images)`, its wall-clock time and images added to the method's
    (`Method.seconds`, `Method.timed_images`: its `ms_per_image`)."""
    start = time.perf_counter()
    masks, logits = method.masks(images)
    if masks.is_cuda:  # what was launched, finished (eval runs on the CPU today)
        torch.cuda.synchronize(masks.device)
    method.seconds += time.perf_counter() - start
    method.timed_images += len(images)
    return masks, logits


def classifier_accuracy(counts: dict) -> dict:
    """`score_split`'s counts as accuracies: {mask model: {classifier: {variant: right / seen}}}."""
    return {
        mask: {
            clf: {v: (r / n if n else None) for v, (r, n) in by_variant.items()}
            for clf, by_variant in by_clf.items()
        }
        for mask, by_clf in counts.items()
    }


def leak_control(cfg: EvalConfig, methods: list[Method], wnids: list[str], size: int) -> dict:
    """A second pass, over the training split too (only when asked): for each model, how well
    a classifier of its binarised masks alone tells the class (`leak.mask_only_accuracy`)."""
    leak = {}
    for method in methods:
        if method.is_model:
            console.print(f"leak control: a classifier of {method.name}'s masks alone")
            leak[method.name] = mask_only_accuracy(
                method.masks, cfg.data, wnids, size, policy=cfg.resize,
                workers=cfg.workers, limit=cfg.limit,
            )  # fmt: skip
    return leak


def score_batch(
    method: Method,
    masks,
    logits,
    labels,
    gt_boxes,
    part_maps=None,
    object_masks=None,
    images=None,
) -> None:
    """One batch of `method`'s masks, with their truth, added to each of its meters.

    `logits`: those of the classifier whose top-1 decides OM (None: none); `labels`: the data's;
    `gt_boxes`, `part_maps`, `object_masks`: each image's boxes of its class, part label map
    and object pixels in the model frame (None where the data has none); `images`: the batch's
    images in [0, 1] (the faithfulness meter runs its judge on them).
    """
    batch = Batch(
        masks,
        gt_boxes,
        [method.labels[label] for label in labels.tolist()],  # -1: a class it does not know
        logits,
        object_masks=object_masks,
        part_maps=part_maps,
        images=images,
        data_labels=labels.tolist(),
    )
    for meter in method.meters:
        meter.update(batch)


def check_two_copies(samples: list, gt_boxes: list) -> None:
    """--copies scores two-copies images: each must have exactly two boxes of its class."""
    for (path, _), boxes in zip(samples, gt_boxes, strict=True):
        if len(boxes) != 2:
            raise UserError(
                f"{path}: --copies needs exactly two boxes of the image's class (data made "
                f"with `data synth --copies 2`); its annotation has {len(boxes)}"
            )


def count_classifications(counts, classifiers, images, masks, labels) -> None:
    """Each classifier's top-1 on clean, masked-in, masked-out and inpainted masked-out images."""
    binary = binarize(masks)
    out = masked_out(images, binary)
    variants = {
        "clean": images,
        "masked_in": masked_in(images, binary),
        "masked_out": out,
        "inpainted": inpaint(out, binary),
    }
    for name, classifier, label_of in classifiers:
        targets = torch.tensor([label_of[y] for y in labels.tolist()])
        known = targets >= 0
        if not known.any():
            continue
        for variant, batch in variants.items():
            logits, _ = classifier.encoder(classifier.normalize(batch[known]))
            right = int(logits.argmax(1).eq(targets[known]).sum())
            counts[name][variant][0] += right
            counts[name][variant][1] += int(known.sum())


def print_tables(scores: dict, accuracy: dict, leak: dict, first: str, cfg: EvalConfig) -> None:
    keys = list(dict.fromkeys(k for result in scores.values() for k in result))
    second = (*CHOE_KEYS, *COST_KEYS)
    others = (*second, *FAITHFULNESS_KEYS, *NOTES)
    print_localisation(scores, cfg, [k for k in keys if k not in others])
    print_box_and_pixel_scores(scores, [k for k in keys if k in second])
    if "faithfulness_judge" in keys:
        print_faithfulness(scores, [k for k in keys if k in FAITHFULNESS_KEYS])
    if cfg.baselines:
        console.print(f"OM of the baselines uses the classifier of {first}.")
    for mask_model, by_classifier in accuracy.items():
        table = Table(title=f"accuracy of classifiers on images masked by {mask_model}")
        table.add_column("classifier", no_wrap=True)
        for variant in VARIANTS:
            table.add_column(variant, justify="right")
        for name, by_variant in by_classifier.items():
            table.add_row(
                name, *["-" if by_variant[v] is None else f"{by_variant[v]:.3f}" for v in VARIANTS]
            )
        console.print(table)
    if leak:
        table = Table(title="leak control: a classifier of the binarised masks alone (val)")
        for header in ("masks of", "accuracy", "chance", "train masks", "val masks"):
            table.add_column(header, justify="left" if header == "masks of" else "right")
        for name, r in leak.items():
            row = (f"{r['accuracy']:.3f}", f"{r['chance']:.3f}", str(r["n_train"]), str(r["n_val"]))
            table.add_row(name, *row)
        console.print(table)
        console.print(
            "Above chance, the mask's outline tells the class: masked-out accuracies then "
            "partly measure that leak."
        )


def cell(value) -> str:
    """A table cell: a float to 3 places, None as "-"."""
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def print_localisation(scores: dict, cfg: EvalConfig, keys: list[str]) -> None:
    """The paper's table: LE / OM / F1, the mask statistics, copy or part coverage, and any
    other meter's results."""
    console.print(score_table(f"{cfg.data} ({cfg.split}, {cfg.resize})", scores, keys))


def print_box_and_pixel_scores(scores: dict, keys: list[str]) -> None:
    """MaxBoxAccV2, its MaxBoxAcc at each IoU threshold and, with object masks, PxAP; then
    each method's milliseconds per image making its masks."""
    masks = "PxAP" in keys
    title = "MaxBoxAccV2 and PxAP" if masks else "MaxBoxAccV2"
    title = f"{title} (Choe et al., CVPR 2020), and the masks' cost"
    console.print(score_table(title, scores, keys))
    if not masks:
        console.print(
            "PxAP: not measured, the annotations have no object masks (<stem>.png beside each "
            "XML, as data synth writes them)."
        )


def print_faithfulness(scores: dict, keys: list[str]) -> None:
    """Deletion and insertion AUC (RISE) and ROAD against the judge, for each image's true
    class; which way is better, and the images of classes the judge does not know."""
    first = next(iter(scores.values()))
    judge = first["faithfulness_judge"]
    title = f"faithfulness (RISE, ROAD): {judge}'s probability of each image's true class"
    console.print(score_table(title, scores, keys))
    console.print(
        "Lower is better for deletion AUC and ROAD MoRF, higher for insertion AUC, ROAD LeRF "
        "and ROAD combined.",
        soft_wrap=True,
    )
    left_out = first["n_images"] - first["n_faithfulness_images"]
    if left_out:
        console.print(f"faithfulness leaves out {left_out} images of classes {judge} does not know")


def score_table(title: str, scores: dict, keys: list[str]) -> Table:
    """A row per method, a column per key (`HEADERS`: its header)."""
    table = Table(title=title)
    table.add_column("method", no_wrap=True)
    for key in keys:
        table.add_column(HEADERS.get(key, key), justify="right")
    for name, result in scores.items():
        table.add_row(name, *[cell(result.get(k)) for k in keys])
    return table


def write_json(
    path: Path, scores: dict, accuracy: dict, leak: dict, first: str, cfg: EvalConfig
) -> None:
    """`path` holds the first model's scores, with exactly the documented keys; the other
    methods go to `<stem>.<method>.json` beside it, the classifier accuracies to
    `<stem>.classifiers.json`, the leak control to `<stem>.leak.json`, and the resolved config
    to `<stem>.config.json`."""
    make_folders(path.parent)
    path.write_text(json.dumps(scores[first], indent=2) + "\n")
    for name, result in scores.items():
        if name != first:
            path.with_name(f"{path.stem}.{name}.json").write_text(json.dumps(result, indent=2))
    if accuracy:
        path.with_name(f"{path.stem}.classifiers.json").write_text(json.dumps(accuracy, indent=2))
    if leak:
        path.with_name(f"{path.stem}.leak.json").write_text(json.dumps(leak, indent=2))
    path.with_name(f"{path.stem}.config.json").write_text(
        json.dumps(config_to_dict(cfg), indent=2) + "\n"
    )
