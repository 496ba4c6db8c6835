"""The methods `eval` scores: each model of the checkpoints, then the baselines.

A Method is a way to get masks for a batch (a trained mapping, from its checkpoint or its
exported file, the centre or full box, or Grad-CAM or another CAM (`cams`) on the first model's
classifier) with the label map of the classifier whose top-1 decides OM, the meters
`benchmark.score_batch` adds each batch to (`choose_meters`: which, by the options and the
data), and the time its masks took (`ms_per_image`, the last key of its record). With
--faithfulness every method is also judged by one classifier (`faithfulness_settings`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from casm_deploy.checkpoint import load_masker
from casm_deploy.common.ui import console
from casm_deploy.config import EvalConfig
from casm_deploy.errors import UserError
from casm_deploy.evaluation.cams import CAMS, Logits, cam_method
from casm_deploy.evaluation.exported import ExportedMasker, is_exported
from casm_deploy.evaluation.faithfulness import Faithfulness, FaithfulnessSettings, Judge
from casm_deploy.evaluation.gradcam import gradcam
from casm_deploy.evaluation.meters import (
    Copies,
    Images,
    Localisation,
    MaskStatistics,
    MaxBoxAcc,
    Meter,
    Parts,
    PxAP,
    results,
)
from casm_deploy.evaluation.metrics import center_box
from casm_deploy.models.mapping import SaliencyModel
from casm_deploy.models.spec import ModelSpec

BASELINES = ("center", "full", "gradcam", *CAMS)
# the baselines that read the first model's classifier inside: they need its checkpoint
CLASSIFIER_BASELINES = ("gradcam", *CAMS)


def choose_meters(
    copies: bool = False,
    parts: bool = False,
    masks: bool = False,
    faithfulness: FaithfulnessSettings | None = None,
) -> list[Meter]:
    """A fresh set of the meters a method is scored with, in the order of its record's keys.

    `copies`: the two copies' coverage (eval --copies); `parts`: the parts' coverage (data with
    parts/); `masks`: PxAP (annotations with object masks); `faithfulness`: deletion / insertion
    AUC and ROAD against its judge (eval --faithfulness). A new metric is one line here.
    """
    chosen: list[Meter] = [Localisation(), MaskStatistics(), MaxBoxAcc()]
    if masks:
        chosen.append(PxAP())
    if copies:
        chosen.append(Copies())
    if parts:
        chosen.append(Parts())
    if faithfulness is not None:
        chosen.append(Faithfulness(faithfulness))
    return [*chosen, Images()]  # the record ends with OM's note and the number of images


@dataclass
class Method:
    """A way to get masks for a batch, with the classifier whose top-1 decides OM, the meters
    its masks are added to (`benchmark.score_batch`), and the time making them took."""

    name: str
    masks: Callable[[torch.Tensor], tuple]  # images -> masks, logits (None: the first model's)
    labels: list[int]  # data label -> the classifier's label (-1: a class it does not know)
    is_model: bool = False  # a trained mapping (the many-classifiers test applies to these)
    meters: list[Meter] = field(default_factory=choose_meters)
    seconds: float = 0.0  # spent in `masks`, over `timed_images` images (`benchmark.timed`)
    timed_images: int = 0

    def result(self) -> dict:
        """Every meter's results, in one record (`meters.results`), then `ms_per_image`: the
        milliseconds per image spent making the masks (None when none was timed)."""
        n = self.timed_images
        return {**results(self.meters), "ms_per_image": 1000 * self.seconds / n if n else None}


def label_map(model_wnids: Sequence[str], data_wnids: list[str]) -> list[int]:
    """For each data label, the model's label of the same wnid, or -1 (an unseen class)."""
    index = {wnid: i for i, wnid in enumerate(model_wnids)}
    return [index.get(wnid, -1) for wnid in data_wnids]


def class_mismatch(name: str, model_wnids: Sequence[str], data_wnids: list[str]) -> str:
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


def select_classes(data_wnids: list[str], model_wnids: Sequence[str], which: str) -> list[str]:
    """The data's classes to score: all, those the model was trained on, or the others."""
    if which == "all":
        return list(data_wnids)
    known = set(model_wnids)
    chosen = [w for w in data_wnids if (w in known) == (which == "seen")]
    if not chosen:
        raise UserError(f"--classes {which}: the data has no class the first model has {which}")
    return chosen


def build_methods(
    cfg: EvalConfig, data_wnids: list[str], parts: bool = False, masks: bool = False
) -> tuple[list[Method], int, list[str]]:
    """The models of `cfg.models` (checkpoints or exported files), then the baselines on the
    first model's classifier.

    Also returns the data classes to score (`cfg.classes` against the first model's classes).
    `parts`: every method also scores part coverage; `masks`: PxAP too (`choose_meters`).

    Raises:
        UserError: an unknown baseline, or Grad-CAM or another CAM is asked for and the first
            model is an exported file.
    """
    if not cfg.models:
        raise UserError("eval needs at least one model (a checkpoint)")
    unknown = sorted(set(cfg.baselines) - set(BASELINES))
    if unknown:
        raise UserError(f"unknown --baseline {', '.join(unknown)}; use {', '.join(BASELINES)}")
    inside = [b for b in cfg.baselines if b in CLASSIFIER_BASELINES]
    if inside and is_exported(cfg.models[0]):  # refused before any model is loaded
        raise UserError(
            f"--baseline {inside[0]} reads the first model's classifier inside (a stage's "
            f"feature map and its gradients): give its checkpoint first, not the exported "
            f"{cfg.models[0]}"
        )
    models = load_maskers(cfg.models, exported=True)
    size = models[0].spec.image_size
    data_wnids = select_classes(data_wnids, models[0].spec.wnids, cfg.classes)
    for m in models:
        warning = class_mismatch(m.name, m.spec.wnids, data_wnids)
        if warning and cfg.classes == "all":  # seen / unseen choose the difference on purpose
            console.print(warning, soft_wrap=True)
    judged = faithfulness_settings(cfg, models[0], data_wnids) if cfg.faithfulness else None
    meters = partial(choose_meters, cfg.copies, parts, masks, judged)  # each method its own
    methods = [
        Method(
            m.name, m.masker, label_map(m.spec.wnids, data_wnids), is_model=True, meters=meters()
        )
        for m in models
    ]
    first: SaliencyModel = methods[0].masks
    for baseline in cfg.baselines:
        fn = baseline_masks(baseline, first, size, cfg)
        methods.append(Method(baseline, fn, methods[0].labels, meters=meters()))
    return methods, size, data_wnids


def baseline_masks(
    name: str, first: SaliencyModel, size: int, cfg: EvalConfig
) -> Callable[[torch.Tensor], tuple]:
    """The masks of baseline `name` (BASELINES): a constant box, or a CAM of the first model's
    classifier at `cfg.gradcam_stage` (ScoreCAM's forwards `cfg.batch_size` images each)."""
    if name == "center":
        return constant_masks(center_box(size, size), size)
    if name == "full":
        return constant_masks([0, 0, size, size], size)
    if name == "gradcam":
        return partial(gradcam, first, stage=cfg.gradcam_stage)
    return cam_method(name, first, cfg.gradcam_stage, cfg.batch_size)


def faithfulness_settings(
    cfg: EvalConfig, first: NamedMasker, data_wnids: list[str]
) -> FaithfulnessSettings:
    """--faithfulness: its judge (the classifier of `cfg.judge`, else of the first model, each
    image's true class by wnid), --faithfulness-steps and --road-percentages.

    Raises:
        UserError: the judge would be an exported file (its classifier is not run alone), or
            was trained at another image size than the models.
    """
    if cfg.judge and is_exported(cfg.judge):
        raise UserError(f"--judge {cfg.judge}: an exported file; give a checkpoint (train's)")
    if not cfg.judge and is_exported(first.path):
        raise UserError(
            f"--faithfulness judges with the first model's classifier, and {first.path} is an "
            "exported file: give its checkpoint first, or --judge CKPT"
        )
    judge = load_maskers((cfg.judge,))[0] if cfg.judge else first
    if judge.spec.image_size != first.spec.image_size:
        raise UserError(
            f"--judge {cfg.judge}: trained at {judge.spec.image_size} px, the models at "
            f"{first.spec.image_size} px; judge at the models' size"
        )
    labels = label_map(judge.spec.wnids, data_wnids)
    unknown = sum(k < 0 for k in labels)
    if unknown:
        console.print(
            f"warning: judge {judge.name}: {unknown} of the data's {len(labels)} classes are not "
            "its own (faithfulness leaves their images out)",
            soft_wrap=True,
        )
    return FaithfulnessSettings(
        Judge(judge.name, Logits(judge.masker), labels), cfg.faithfulness_steps, cfg.road_levels
    )


def load_classifiers(paths: tuple[str, ...], data_wnids: list[str]) -> list[tuple]:
    """(name, masker, label map) of each classifier checkpoint (its encoder is what is used)."""
    return [(m.name, m.masker, label_map(m.spec.wnids, data_wnids)) for m in load_maskers(paths)]


@dataclass
class NamedMasker:
    """A loaded model among several to compare, under a unique display name."""

    name: str
    path: str
    masker: SaliencyModel | ExportedMasker
    spec: ModelSpec


def display_name(path: str | Path) -> str:
    """`runs/<name>/checkpoint.pt` -> `<name>`; `export/<name>/masker.onnx` -> `<name>.onnx`
    (and .ts); any other file -> its stem."""
    path = Path(path)
    if not path.parent.name or path.stem not in ("checkpoint", "masker"):
        return path.stem
    return path.parent.name + (path.suffix if path.stem == "masker" else "")


def load_maskers(
    paths: tuple[str, ...] | list[str], wanted: str = "", exported: bool = False
) -> list[NamedMasker]:
    """Load models to compare side by side: unique names (`run`, `run#2`), one image size.
    `exported`: also take exported files (`export`'s .onnx / .ts; only checkpoints otherwise).

    Raises:
        UserError: a file cannot be loaded, or the models were trained at different sizes.
    """
    models: list[NamedMasker] = []
    for path in paths:
        if exported and is_exported(path):
            masker: SaliencyModel | ExportedMasker = ExportedMasker(path)
            spec = masker.spec()
        else:
            masker, spec = load_masker(path, wanted)
        name, base, copy = display_name(path), display_name(path), 1
        while name in {m.name for m in models}:
            copy += 1
            name = f"{base}#{copy}"
        models.append(NamedMasker(name, str(path), masker, spec))
    sizes = {m.spec.image_size for m in models}
    if len(sizes) > 1:
        listing = ", ".join(f"{m.path}: {m.spec.image_size} px" for m in models)
        raise UserError(f"the models must share one image size to be compared ({listing})")
    return models
