"""`casm-deploy eval`: the paper's localisation benchmark (LE / OM / F1), baselines, and the
classification of masked images by many classifiers (§3.3, Fig. 3).

One streamed pass over the data: each batch is decoded once, every method (the models, then
the centre / full / Grad-CAM baselines) masks it, and the masks go through the one scorer in
`metrics.py`. Memory stays bounded whatever the number of images.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.table import Table

from casm_deploy.checkpoint import load_maskers
from casm_deploy.common.paths import check_file
from casm_deploy.common.ui import console, progress
from casm_deploy.config import EvalConfig, config_to_dict
from casm_deploy.data.datasets import build_loader, check_policy, own_boxes, own_parts, read_classes
from casm_deploy.errors import UserError
from casm_deploy.evaluation.gradcam import gradcam
from casm_deploy.evaluation.masking import binarize, inpaint, masked_in, masked_out
from casm_deploy.evaluation.metrics import (
    LocalizationMeter,
    MaskStats,
    center_box,
    copy_coverage,
    localization_scores,
    masks_to_boxes,
    part_coverage,
)
from casm_deploy.models.mapping import Masker

BASELINES = ("center", "full", "gradcam")
SCORE_KEYS = ("LE", "OM", "F1", "F1a", "mask_mean", "mask_std", "mask_entropy", "mask_tv")
COPY_KEYS = ("copy_share_lighter", "copy_touch_both")  # with --copies only
# When DATA has a parts/ folder (data of `synth --parts`).
PART_KEYS = ("part_coverage", "parts_all_touched", "part_share_least", "n_part_images")
VARIANTS = ("clean", "masked_in", "masked_out", "inpainted")


@dataclass
class Method:
    """A way to get masks for a batch, with the classifier whose top-1 decides OM."""

    name: str
    masks: Callable[[torch.Tensor], tuple]  # images -> masks, logits (None: the first model's)
    labels: list[int]  # data label -> the classifier's label (-1: a class it does not know)
    is_model: bool = False  # a trained mapping (the many-classifiers test applies to these)
    copies: bool = False  # also score the two copies' coverage (eval --copies)
    meter: LocalizationMeter = field(default_factory=LocalizationMeter)
    stats: MaskStats = field(default_factory=MaskStats)
    copy_share_sum: float = 0.0  # sums over images of `metrics.copy_coverage`'s two results
    copy_touch_count: int = 0
    parts: bool = False  # also score how the mask covers the object's parts (DATA/parts/)
    part_touched_sum: float = 0.0  # sums over images of `metrics.part_coverage`'s results
    part_all_count: int = 0
    part_share_sum: float = 0.0
    part_images: int = 0  # images with at least one part in the frame
    unknown_images: int = 0  # images of classes the classifier does not know: no OM for them

    def om_note(self) -> str:
        """Why OM leaves images out ("" when it counts them all): it needs the model's classes."""
        n, unknown = self.meter.n_images, self.unknown_images
        if not unknown:
            return ""
        if unknown == n:
            return f"OM is not defined for these {n} images: the model does not know their classes"
        return (
            f"OM counts only the {n - unknown} images of the model's classes: "
            f"it is not defined for the other {unknown}"
        )

    def result(self) -> dict:
        copies = {}
        if self.copies:
            n = self.meter.n_images
            copies = {
                "copy_share_lighter": self.copy_share_sum / n if n else None,
                "copy_touch_both": self.copy_touch_count / n if n else None,
            }
        parts = {}
        if self.parts:
            n = self.part_images
            parts = {
                "part_coverage": self.part_touched_sum / n if n else None,
                "parts_all_touched": self.part_all_count / n if n else None,
                "part_share_least": self.part_share_sum / n if n else None,
                "n_part_images": n,
            }
        note = {"OM_note": self.om_note()} if self.unknown_images else {}
        return {
            **{k: v for k, v in self.meter.result().items() if k != "n_images"},
            **self.stats.result(),
            **copies,
            **parts,
            **note,
            "n_images": self.meter.n_images,
        }


def label_map(model_wnids: list[str], data_wnids: list[str]) -> list[int]:
    """For each data label, the model's label of the same wnid, or -1 (an unseen class)."""
    index = {wnid: i for i, wnid in enumerate(model_wnids)}
    return [index.get(wnid, -1) for wnid in data_wnids]


def class_mismatch(name: str, model_wnids: list[str], data_wnids: list[str]) -> str:
    """A one-line warning when a model's classes and the data's differ ("" when they match)."""
    unknown = len(set(data_wnids) - set(model_wnids))
    absent = len(set(model_wnids) - set(data_wnids))
    parts = []
    if unknown:
        parts.append(
            f"{unknown} of the data's {len(data_wnids)} classes are not the model's "
            "(OM leaves their images out)"
        )
    if absent:
        parts.append(f"{absent} of its {len(model_wnids)} classes are not in the data")
    return f"warning: {name}: {'; '.join(parts)}" if parts else ""


def constant_masks(box: list[int], size: int) -> Callable[[torch.Tensor], tuple]:
    """Masks that are 1 inside `box` and 0 elsewhere, for every image (centre / full).

    They come with no logits: OM then uses those of the first model on the same batch.
    """
    mask = torch.zeros(1, 1, size, size)
    mask[..., box[1] : box[3], box[0] : box[2]] = 1.0
    return lambda images: (mask.expand(len(images), 1, size, size), None)


def select_classes(data_wnids: list[str], model_wnids: list[str], which: str) -> list[str]:
    """The data's classes to score: all, those the model was trained on, or the others."""
    if which == "all":
        return list(data_wnids)
    known = set(model_wnids)
    chosen = [w for w in data_wnids if (w in known) == (which == "seen")]
    if not chosen:
        raise UserError(f"--classes {which}: the data has no class the first model has {which}")
    return chosen


def build_methods(
    cfg: EvalConfig, data_wnids: list[str], parts: bool = False
) -> tuple[list[Method], int, list[str]]:
    """The models of `cfg.models`, then the baselines on the first model's classifier.

    Also returns the data classes to score (`cfg.classes` against the first model's classes).
    `parts`: every method also scores part coverage.
    """
    if not cfg.models:
        raise UserError("eval needs at least one model (a checkpoint)")
    unknown = sorted(set(cfg.baselines) - set(BASELINES))
    if unknown:
        raise UserError(f"unknown --baseline {', '.join(unknown)}; use {', '.join(BASELINES)}")
    models = load_maskers(cfg.models)
    size = models[0].spec["image_size"]
    data_wnids = select_classes(data_wnids, models[0].spec["wnids"], cfg.classes)
    for m in models:
        warning = class_mismatch(m.name, m.spec["wnids"], data_wnids)
        if warning and cfg.classes == "all":  # seen / unseen choose the difference on purpose
            console.print(warning, soft_wrap=True)
    methods = [
        Method(
            m.name,
            m.masker,
            label_map(m.spec["wnids"], data_wnids),
            is_model=True,
            copies=cfg.copies,
            parts=parts,
        )
        for m in models
    ]
    first: Masker = methods[0].masks
    labels = methods[0].labels
    for baseline in cfg.baselines:
        if baseline == "center":
            fn = constant_masks(center_box(size, size), size)
        elif baseline == "full":
            fn = constant_masks([0, 0, size, size], size)
        else:
            fn = lambda images: gradcam(first, images, cfg.gradcam_stage)  # noqa: E731
        methods.append(Method(baseline, fn, labels, copies=cfg.copies, parts=parts))
    return methods, size, data_wnids


def load_classifiers(paths: tuple[str, ...], data_wnids: list[str]) -> list[tuple]:
    """(name, masker, label map) of each classifier checkpoint (its encoder is what is used)."""
    return [(m.name, m.masker, label_map(m.spec["wnids"], data_wnids)) for m in load_maskers(paths)]


@torch.no_grad()
def run(cfg: EvalConfig) -> dict:
    """Score every method on `cfg.data`; print the tables; write `cfg.json` when given.

    The data's classes: its classes.txt, else its train/ folders, else (a test set of its own)
    the folders of `cfg.split`. LE and F1 need only the boxes; OM needs the model's classes.
    When DATA has a parts/ folder (`data synth --parts`), every image of the split needs its
    part label map and list there, and part coverage is scored too (`metrics.part_coverage`).

    Returns:
        {"scores": {method: {LE, OM, F1, F1a, mask_*, n_images; with `cfg.copies` also
                             copy_share_lighter, copy_touch_both; when DATA has a parts/
                             folder also part_coverage, parts_all_touched, part_share_least,
                             n_part_images; OM_note when some images are of classes the
                             model does not know (OM leaves them out)}},
         "classifiers": {mask model: {classifier: {clean, masked_in, masked_out, inpainted}}},
         "leak": {mask model: `leak.mask_only_accuracy`'s dict} with `cfg.leak_control`}
    """
    if cfg.json:
        check_file(Path(cfg.json), "--json")
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
    parts = root / "parts"
    has_parts = parts.is_dir()
    if has_parts:
        console.print(f"{parts}: also scoring part coverage ({', '.join(PART_KEYS[:3])})")
    methods, size, wnids = build_methods(cfg, info.wnids, parts=has_parts)
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
    # counts[mask model][classifier][variant] = [right, seen] over images of known classes
    counts = {
        m.name: {c[0]: {v: [0, 0] for v in VARIANTS} for c in classifiers}
        for m in methods
        if m.is_model
    }

    with progress(transient=True) as bars:
        task = bars.add_task(f"eval {cfg.split}", total=len(loader), info="")
        for images, labels, indices in loader:
            samples = [loader.dataset.samples[i] for i in indices.tolist()]
            gt_boxes = [own_boxes(p, wnids[y], annotations, size, cfg.resize) for p, y in samples]
            if cfg.copies:
                check_two_copies(samples, gt_boxes)
            part_maps = (
                [own_parts(p, annotations, parts, size, cfg.resize) for p, _ in samples]
                if has_parts
                else None
            )
            outputs = [method.masks(images) for method in methods]
            first_logits = outputs[0][1]  # the first method is always a model
            for method, (masks, logits) in zip(methods, outputs, strict=True):
                logits = first_logits if logits is None else logits
                score_batch(method, masks, logits, labels, gt_boxes, part_maps)
                if method.name in counts and classifiers:
                    count_classifications(counts[method.name], classifiers, images, masks, labels)
            bars.advance(task)

    scores = {m.name: m.result() for m in methods}
    for method in methods:
        if method.is_model and method.unknown_images:
            console.print(f"{method.name}: {method.om_note()}")
    accuracy = {
        mask: {
            clf: {v: (r / n if n else None) for v, (r, n) in by_variant.items()}
            for clf, by_variant in by_clf.items()
        }
        for mask, by_clf in counts.items()
        if classifiers
    }
    leak = {}
    if cfg.leak_control:  # a second pass, over the training split too: only when asked
        from casm_deploy.evaluation.leak import mask_only_accuracy

        for method in methods:
            if method.is_model:
                console.print(f"leak control: a classifier of {method.name}'s masks alone")
                leak[method.name] = mask_only_accuracy(
                    method.masks, cfg.data, wnids, size, policy=cfg.resize,
                    workers=cfg.workers, limit=cfg.limit,
                )  # fmt: skip
    print_tables(scores, accuracy, leak, methods[0].name, cfg, parts=has_parts)
    if cfg.json:
        write_json(Path(cfg.json), scores, accuracy, leak, methods[0].name, cfg)
    return {"scores": scores, "classifiers": accuracy, "leak": leak}


def score_batch(method: Method, masks, logits, labels, gt_boxes, part_maps=None) -> None:
    """LE / OM / F1 and mask statistics of one batch, into the method's meters.

    `part_maps`: the images' part label maps in the model frame, for `method.parts`.
    """
    masks_np = masks[:, 0].float().cpu().numpy()
    predicted = logits.argmax(1).tolist()
    for mask, box, gt, label, guess in zip(
        masks_np, masks_to_boxes(masks_np), gt_boxes, labels.tolist(), predicted, strict=True
    ):
        scores = localization_scores(mask, box, gt)
        known = method.labels[label]
        correct = None if known < 0 else guess == known
        method.unknown_images += known < 0
        method.meter.update(scores["hit"], scores["f1"], scores["f1a"], correct)
        if method.copies:
            share, touches_both = copy_coverage(mask, gt)
            method.copy_share_sum += share
            method.copy_touch_count += int(touches_both)
    if method.parts:
        for mask, labels_in_frame in zip(masks_np, part_maps, strict=True):
            coverage = part_coverage(mask, labels_in_frame)
            if coverage is None:  # the crop cut every part away: nothing to count
                continue
            method.part_images += 1
            method.part_touched_sum += coverage.touched
            method.part_all_count += int(coverage.all_touched)
            method.part_share_sum += coverage.share_least
    method.stats.update(masks)


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


def print_tables(
    scores: dict, accuracy: dict, leak: dict, first: str, cfg: EvalConfig, parts: bool = False
) -> None:
    table = Table(title=f"{cfg.data} ({cfg.split}, {cfg.resize})")
    table.add_column("method", no_wrap=True)
    copy_keys = COPY_KEYS if cfg.copies else ()
    copy_headers = ("lighter copy", "both copies") if cfg.copies else ()
    part_keys = PART_KEYS if parts else ()
    # Short two-line headers: the table has to fit 120 columns (the console's width in logs).
    part_headers = ("parts", "all\nparts", "least\npart", "part\nimages") if parts else ()
    headers = ["LE", "OM", "F1", "F1a", "area", "std", "entropy", "TV"]
    headers += [*copy_headers, *part_headers, "images"]
    for header in headers:
        table.add_column(header, justify="right")
    for name, result in scores.items():
        cells = [
            f"{result[k]:.3f}" if isinstance(result[k], float) else str(result[k])
            for k in (*SCORE_KEYS, *copy_keys, *part_keys, "n_images")
        ]
        table.add_row(name, *["-" if c == "None" else c for c in cells])
    console.print(table)
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


def write_json(
    path: Path, scores: dict, accuracy: dict, leak: dict, first: str, cfg: EvalConfig
) -> None:
    """`path` holds the first model's scores, with exactly the documented keys; the other
    methods go to `<stem>.<method>.json` beside it, the classifier accuracies to
    `<stem>.classifiers.json`, the leak control to `<stem>.leak.json`, and the resolved config
    to `<stem>.config.json`."""
    path.parent.mkdir(parents=True, exist_ok=True)
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
