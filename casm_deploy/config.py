"""One frozen dataclass per command; each option's default, help and checks live here only.

The bottom of the flow: every command's config is built from its options here, and every
command writes its resolved config next to its outputs (`config_to_dict`). A field made with
`opt` is also a command-line option: `cli.py` builds each command's options from its config's
fields. This module imports no torch, so `casm-deploy --help` stays instant.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

from casm_deploy.options import ConfigError, check_fields, is_option, opt, resolved

DEFAULT_DATA = "data/synth"
DEFAULT_TINY_IMAGENET = "data/tiny-imagenet"
# visualize: grid.png is one column of cells per image (8,480 px wide at 64 images of 64 px),
# and all the images go through each model in one batch; 64 keeps both small.
MAX_VISUALIZE_IMAGES = 64


def models_and_data(paths: list[Path]) -> dict[str, Any]:
    """Split `MODEL... [DATA]`: files are models, one folder is the data (default data/synth)."""
    folders = [p for p in paths if p.is_dir()]
    if len(folders) > 1:
        raise ConfigError(f"one data folder at most, got {', '.join(map(str, folders))}")
    models = tuple(str(p) for p in paths if not p.is_dir())
    return {"models": models, "data": str(folders[0]) if folders else DEFAULT_DATA}


_SIZE, _LAYOUT = "Classes and counts", "Image layout"
# The classifier CNNs `train --arch` builds (models/backbones.py has the table of each).
Arch = Literal[
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "convnext_tiny",
    "regnet_y_400mf",
]
# The decoder's final upsampling of the mask: nearest (the reference's) or bilinear.
Upsample = Literal["nearest", "bilinear"]


@dataclass(frozen=True)
class SynthConfig:
    """`casm-deploy data synth`: the embedded ImageNet-layout benchmark."""

    PANELS: ClassVar[tuple[str, ...]] = (_SIZE, _LAYOUT)

    out: str = opt(DEFAULT_DATA, "Output folder.", argument=True, path=True)
    # ignored when `classes` is given; its bound, the shapes' table, synth.resolve_config checks
    num_classes: int = opt(10, "Use the first N shape classes.", panel=_SIZE)
    classes: tuple[str, ...] = opt(  # for unseen-class experiments
        (),
        "Comma-separated subset of classes (names or wnids), instead of --num-classes.",
        panel=_SIZE,
    )
    train_per_class: int = opt(1000, "Training images per class.", panel=_SIZE, at_least=1)
    val_per_class: int = opt(100, "Validation images per class.", panel=_SIZE, at_least=1)
    min_side: int = opt(80, "Smallest shorter image side (px).", panel=_LAYOUT)
    max_side: int = opt(128, "Largest shorter image side (px).", panel=_LAYOUT)
    # object box area as a fraction of the image (one copy)
    min_area: float = opt(0.10, "Smallest object area (image fraction).", panel=_LAYOUT)
    max_area: float = opt(0.60, "Largest object area (image fraction).", panel=_LAYOUT)
    copies: Literal[1, 2] = opt(
        1, "2: each image is two identical copies side by side (paper 2.1).", panel=_LAYOUT
    )
    right: Literal["copy", "clutter"] = opt(
        "copy",
        "With --copies 2: copy (the right half repeats the left) or clutter (the right half is "
        "background and distractors, no object; only the left box is annotated), to pre-train a "
        "classifier (train --classifier-only --resize stretch) that only looks at the left copy.",
        panel=_LAYOUT,
    )
    # bounded by data/parts.py's PART_KINDS, which synth.resolve_config checks
    parts: int = opt(
        0,
        "N > 0: each object is N parts (a shape, a texture patch, a glyph; 1 to 3), any one of "
        "which identifies the class, the shape the easiest; part label maps and boxes of the "
        "validation images in OUT/parts/. 0: one solid shape.",
        panel=_LAYOUT,
    )
    seed: int = opt(0, "Random seed; the same seed gives the same files.", at_least=0)
    workers: int = opt(2, "Generator processes.")
    overwrite: bool = opt(False, "Replace an existing data set.")

    def __post_init__(self) -> None:
        check_fields(self)
        if not 16 <= self.min_side <= self.max_side:
            raise ConfigError(
                f"need 16 <= --min-side <= --max-side, got {self.min_side} and {self.max_side}"
            )
        if not 0 < self.min_area <= self.max_area <= 0.9:
            raise ConfigError(
                f"need 0 < --min-area <= --max-area <= 0.9, got {self.min_area} and {self.max_area}"
            )
        if self.right == "clutter" and self.copies != 2:
            raise ConfigError("--right clutter needs --copies 2 (it replaces the right-hand copy)")
        if self.parts and self.copies != 1:
            raise ConfigError("--parts needs --copies 1 (its part annotations describe one object)")


@dataclass(frozen=True)
class TinyImagenetConfig:
    """`casm-deploy data tiny-imagenet`: Tiny ImageNet's archive to the ImageNet layout."""

    src: str = opt(
        "",
        "The official tiny-imagenet-200.zip, or the folder it was extracted to.",
        argument=True,
        required=True,
        path=True,
    )
    out: str = opt(DEFAULT_TINY_IMAGENET, "Output folder.", argument=True, path=True)
    classes: int = opt(
        0, "Only the first N classes of wnids.txt, in sorted order (0: all).", at_least=0
    )
    wnids: str = opt("", "Only the classes of this file (one wnid a line).", metavar="FILE")
    overwrite: bool = opt(
        False,
        "Replace an existing conversion, or write into a folder of other files (only what a "
        "conversion writes is replaced).",
        negatable=False,
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.classes and self.wnids:
            raise ConfigError("--classes and --wnids choose the classes both: give one of them")


@dataclass(frozen=True)
class Preset:
    """A thinning strategy of the paper's Table 2, with the reference code's settings."""

    fixed_classifier: bool
    hp: float  # probability of drawing the masked-pass classifier from the pool
    smf: int | None  # store a snapshot every `smf` steps; None: only the first one
    lambda_entropy: float
    lambda_classification: float


PRESETS: dict[str, Preset] = {
    "F": Preset(True, 0.0, None, 2.5, 9.0),
    "L": Preset(False, 0.0, None, 14.0, 18.0),
    "FL": Preset(False, 0.5, None, 7.5, 11.0),
    "L100": Preset(False, 0.5, 100, 10.0, 17.0),
    "L1000": Preset(False, 0.5, 1000, 10.0, 17.0),
}


# Recipes: a set of TrainConfig values at once. "default" is the dataclass's own defaults (the
# embedded data on a 2-core CPU); "tiny-imagenet" is this project's for real photos at 64 px
# from scratch on 2 CPU cores (`data tiny-imagenet`), chosen by the sweep of train/RESULTS.md
# section 8; "imagenet" is the reference code's (kondiz/casme train.py and
# train_utils.set_args) for a torchvision ResNet-50 pre-trained on ImageNet, which `--weights`
# must name (a local state-dict file). train/README.md says where each value comes from.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "tiny-imagenet": {
        "resize": "random-resized-crop",  # a flip alone over-fits 500 photos a class
        "crop_scale": 0.35,
        "pretrain_epochs": 20,
        "fill": "mean",
        "lambda_r": 2.0,  # 1.5 and below: every mask grows to the whole photo
    },
    "imagenet": {
        "arch": "resnet50",
        "width": 64,
        "image_size": 224,
        "pretrain_epochs": 0,  # the classifier starts from the pre-trained weights
        "reproduce": "L100",
        "score": "entropy",
        "lambda_r": None,  # the reference's value for the preset (L100: 10)
        "epochs": 60,
        "batch_size": 128,
        "epoch_fraction": 0.2,
        "lr": 1e-3,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "lr_decoder": 1e-3,
        "lr_decay_every": 20,
        "pool_size": 30,
        "grad_clip": 10.0,
        "upsample": "nearest",
        "resize": "random-resized-crop",
        "fill": "mean",
    },
}


def _lambda_r(text: str) -> float | None:
    """`--lambda-r`: a number, or "paper" (None: the reference's value for the preset)."""
    if text == "paper":
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--lambda-r must be a number or 'paper', not {text!r}") from None


# Option groups of `train` --help: few options each, and the long flag names (with their
# --no- forms) in small groups, so that at 80 columns each group's help column stays wide.
_METHOD, _MODEL, _PHASES, _OPTIM = "Method", "Model", "Phases", "Optimisers"
_INPUT, _HARDWARE, _RUN = "Data", "Hardware", "Run"


@dataclass(frozen=True)
class TrainConfig:
    """`casm-deploy train`: classifier pre-training, then the CASM phase (Algorithm 1).

    The defaults are this project's recipe for the embedded data on a 2-core CPU: a half-width
    ResNet-18 at 64 px. The paper's ImageNet settings are the `imagenet` recipe (RECIPES).

    The options, one section per --help group (PANELS; within a group in the order --help
    shows them), then what the run uses that they resolve to: the preset's values, the
    mapping's encoder, the run's name, made once by `__post_init__`. A recipe is applied before
    (`options.make_config`, where the command line makes the config): a made config holds the
    recipe's values, and config.json the options alone, which --resume reads back.
    """

    PANELS: ClassVar[tuple[str, ...]] = (_METHOD, _MODEL, _PHASES, _OPTIM, _INPUT, _HARDWARE, _RUN)
    # The order of the options in config.json and in the checkpoint's `config` (config_to_dict),
    # the one they had before the fields were grouped: a run's files stay as they were. A new
    # option needs no entry: it follows these.
    FILE_ORDER: ClassVar[tuple[str, ...]] = (
        "data", "out", "name", "arch", "width", "image_size", "weights", "resume", "seed",
        "workers", "loader", "device", "channels_last", "amp", "resize", "crop_scale", "fill",
        "skip_bad_images", "classifier_only", "pretrain_epochs", "pretrain_lr",
        "pretrain_batch_size", "reproduce", "score", "lambda_r", "epochs", "batch_size",
        "epoch_fraction", "lr", "momentum", "weight_decay", "lr_decoder", "lr_decay_every",
        "pool_size", "pool_device", "grad_clip", "upsample", "unshared", "mapping_arch",
        "mapping_width", "hp", "smf", "recipe",
    )  # fmt: skip

    data: str = opt(
        DEFAULT_DATA,
        "ImageNet-layout folder; the default is generated if missing.",
        argument=True,
        path=True,
    )

    # --- Method: the recipe, the thinning strategy (PRESETS), the mapping -------------------
    # The recipe the other fields started from (RECIPES); options given beside it override it.
    recipe: Literal["default", "tiny-imagenet", "imagenet"] = opt(  # the keys of RECIPES
        "default",
        f"{', '.join(RECIPES)}: a set of values at once; the options given beside it override "
        "it. default: this project's recipe for the embedded data on a CPU; tiny-imagenet: for "
        "real photos at 64 px on a CPU (data tiny-imagenet); imagenet: the reference code's "
        "ImageNet training of a pre-trained ResNet-50 at 224 px (needs --weights; "
        "train/README.md lists its values).",
        panel=_METHOD,
        recipes=RECIPES,
    )
    # black is 0 in [0, 1]; the reference's training masks the normalised image (mean)
    fill: Literal["black", "mean"] = opt(
        "black",
        "What masked-out pixels become: black, or mean (the ImageNet mean colour, as the "
        "reference's training has them).",
        panel=_METHOD,
    )
    reproduce: Literal["F", "L", "FL", "L100", "L1000"] = opt(  # the keys of PRESETS
        "L100",
        f"Thinning strategy of the paper: {', '.join(PRESETS)} (F: Baseline F, a fixed "
        "classifier).",
        panel=_METHOD,
    )
    # classification: the "C" rows of Table 2
    score: Literal["entropy", "classification"] = opt(
        "entropy", "Mapping score: entropy or classification.", panel=_METHOD
    )
    # Area weight. The reference's per-preset values (None, `--lambda-r paper`) aim at ~50%
    # salient pixels on ImageNet; on the embedded data 2.5 gives F and L100 the same mask area
    # (~0.33, the objects' box area) with the entropy score: train/README.md has the sweep.
    lambda_r: float | None = opt(
        2.5,
        "Area weight: a number, or 'paper' for the reference's per-preset ImageNet value.",
        panel=_METHOD,
        parse=_lambda_r,
        at_least=0,
    )
    pool_size: int = opt(30, "Thinning pool capacity.", panel=_METHOD, at_least=1)
    pool_device: Literal["auto", "device", "pinned"] = opt(
        "auto",
        "Where the pool's snapshots live on a GPU: device (no copy per draw), pinned (pinned host "
        "memory, copied without blocking), auto (device when the pool takes at most a fifth of "
        "the GPU's memory). Training on the CPU keeps them in memory.",
        panel=_METHOD,
    )
    # final decoder upsampling: nearest is the reference's
    upsample: Upsample = opt(
        "nearest", "Final mask upsampling: nearest or bilinear.", panel=_METHOD
    )
    unshared: bool = opt(  # Table 2 (i)-(k)
        False,
        "Give the mapping an encoder of its own (a copy of the classifier when the CASM phase "
        "starts, trained with the decoder), instead of sharing the classifier's.",
        panel=_METHOD,
    )
    # A mapping of its own: no classifier is needed to make a mask (export --masks-only).
    mapping_arch: str = opt(  # "": the classifier's arch, and only with --unshared
        "",
        "Give the mapping an encoder of its own of this arch (one of --arch's), freshly "
        "initialised and trained by the mapping's loss; implies --unshared.",
        panel=_METHOD,
        show_default=False,
    )
    mapping_width: int | None = opt(  # None: the classifier's width
        None,
        "Width of the mapping's own encoder (as --width; default: the classifier's); implies "
        "--unshared.",
        panel=_METHOD,
        show_default=False,
        at_least=1,
    )
    hp: float | None = opt(None, "Override the preset's pool probability.", panel=_METHOD)
    # divides step numbers
    smf: int | None = opt(None, "Override the preset's snapshot period.", panel=_METHOD, at_least=1)

    # --- Model: the classifier ------------------------------------------------------------
    arch: Arch = opt(
        "resnet18", f"The classifier, a torchvision CNN: {', '.join(get_args(Arch))}.", panel=_MODEL
    )
    # a multiplier in 64ths: the default halves torchvision's every layer
    width: int = opt(
        32,
        "Width: 64 is torchvision's own (a ResNet's stem channels); other values scale every "
        "layer by width/64.",
        panel=_MODEL,
        at_least=1,
    )
    image_size: int = opt(64, "Training image size (px).", panel=_MODEL, at_least=1)
    weights: str = opt(
        "",
        "Start the classifier from a local torchvision state dict, a casm-deploy checkpoint, or "
        "a torchvision weights name already in torch's cache.",
        panel=_MODEL,
    )

    # --- Phases: the classifier's pre-training on clean images, then CASM ------------------
    classifier_only: bool = opt(  # classifiers for the Fig. 3 test
        False,
        "Only pre-train a classifier (independent classifiers for eval --classifiers).",
        panel=_PHASES,
    )
    pretrain_epochs: int = opt(
        10, "Classifier pre-training epochs on clean images (0: none).", panel=_PHASES, at_least=0
    )
    epochs: int = opt(12, "CASM epochs.", panel=_PHASES, at_least=0)
    # share of the training set seen per epoch (reference: 0.2)
    epoch_fraction: float = opt(
        0.5, "Share of the training set seen per CASM epoch.", panel=_PHASES
    )

    # --- Optimisers: pre-training's Adam (one-cycle), then CASM's SGD and Adam ------------
    pretrain_lr: float = opt(2e-3, "Pre-training Adam peak LR.", panel=_OPTIM, at_least=0)
    pretrain_batch_size: int = opt(
        64, "Pre-training batch size (per process).", panel=_OPTIM, at_least=1
    )
    batch_size: int = opt(64, "CASM batch size (per process).", panel=_OPTIM, at_least=1)
    # a learning rate of 0 holds that part still (a test of what the others do)
    lr: float = opt(  # reference: 1e-3 for a pre-trained ResNet-50
        1e-2, "Classifier SGD LR in the CASM phase.", panel=_OPTIM, at_least=0
    )
    momentum: float = opt(0.9, "Classifier SGD momentum.", panel=_OPTIM)
    weight_decay: float = opt(1e-4, "Weight decay of both optimisers.", panel=_OPTIM, at_least=0)
    lr_decoder: float = opt(1e-3, "Decoder Adam LR.", panel=_OPTIM, at_least=0)
    # reference: 20 of 60-70; it divides epoch numbers
    lr_decay_every: int = opt(8, "Epochs between x0.1 LR decays.", panel=_OPTIM, at_least=1)
    grad_clip: float = opt(10.0, "Decoder gradient-norm clip.", panel=_OPTIM)

    # --- Data: loading and augmentation ---------------------------------------------------
    # Data-loading processes (0: load in the main process). None: 1 on the CPU, where the model
    # needs the cores; on CUDA the cores this process may use, shared by the GPUs of the node.
    workers: int | None = opt(
        None,
        "Data-loading processes (0: in the main process). Default: 1 on the CPU; on CUDA the "
        "cores, shared by the node's GPUs.",
        panel=_INPUT,
        show_default=False,
        at_least=0,
    )
    # auto: the data module picks
    loader: Literal["torch", "dali", "auto"] = opt(
        "torch", "Data loader: torch, dali or auto.", panel=_INPUT
    )
    # The whole image to S x S keeps the two-copies experiment's left/right layout;
    # random-resized-crop is torchvision's RandomResizedCrop(S), the reference's augmentation.
    resize: Literal["center-crop", "stretch", "random-resized-crop"] = opt(
        "center-crop",
        "center-crop (shorter side, random crop and flip; validation: centre crop), stretch (the "
        "whole image to S x S, no crop, no flip, validation too: keeps the left/right layout of "
        "synth --copies 2 data; torch loader only) or random-resized-crop (torchvision's "
        "RandomResizedCrop and a flip, the reference's ImageNet augmentation; validation: "
        "centre crop).",
        panel=_INPUT,
    )
    # torchvision's 0.08 suits ImageNet's large photos; on 64 px photos it removes too much
    crop_scale: float = opt(
        0.08,
        "Smallest share of the image area a random-resized-crop window takes (torchvision: 0.08).",
        panel=_INPUT,
    )
    # A skipped file is replaced by the next sample; validation images are never skipped.
    skip_bad_images: bool = opt(
        False,
        "Skip training images that do not decode (each is replaced by the next image; "
        "metrics.jsonl lists them) instead of stopping the run. Torch loader only.",
        panel=_INPUT,
        negatable=False,
    )

    # --- Hardware -------------------------------------------------------------------------
    device: str = opt("auto", "auto, cpu or cuda (auto: CUDA when available).", panel=_HARDWARE)
    channels_last: bool = opt(True, "Channels-last memory format.", panel=_HARDWARE)
    amp: Literal["off", "bf16", "fp16"] = opt(
        "off",
        "Mixed precision: off, bf16 or fp16 (fp16: CUDA, with a gradient scaler).",
        panel=_HARDWARE,
    )

    # --- Run: its folder, its seed, resuming ----------------------------------------------
    out: str = opt("runs", "Folder of runs.", panel=_RUN, path=True)
    name: str = opt(  # empty: derived from the preset and the seed (run_name)
        "",
        "Run name; default: preset, score and seed, as l100-entropy-s0 (with --classifier-only: "
        "classifier-s0).",
        panel=_RUN,
    )
    resume: bool = opt(
        False,
        "Continue the run from its last checkpoint, with the settings it started with (before "
        "its first checkpoint: start it afresh).",
        panel=_RUN,
    )
    seed: int = opt(0, "Random seed.", panel=_RUN)

    # --- Resolved from the options by __post_init__, once: what the run uses ----------------
    fixed_classifier: bool = resolved()  # the preset's: Baseline F never trains the classifier
    pool_probability: float = resolved()  # --hp, or the preset's
    snapshot_every: int | None = resolved()  # --smf, or the preset's (None: the first only)
    area_weight: float = resolved()  # --lambda-r, or the preset's for --score ('paper')
    # the mapping's encoder: its own of a given arch or width, freshly initialised (own_mapping),
    # a copy of the classifier (--unshared alone), or the classifier's (shared_encoder)
    own_mapping: bool = resolved()
    shared_encoder: bool = resolved()
    mapping_encoder: tuple[str, int] | None = resolved()  # (arch, width); None when shared
    casm_epochs: int = resolved()  # --epochs, none with --classifier-only
    run_name: str = resolved()  # --name, or one made of the preset, the score and the seed

    def __post_init__(self) -> None:
        check_fields(self)
        if not 0 < self.crop_scale <= 1:
            raise ConfigError(f"--crop-scale must be in (0, 1], not {self.crop_scale}")
        if not 0 < self.epoch_fraction <= 1:
            raise ConfigError(f"--epoch-fraction must be in (0, 1], not {self.epoch_fraction}")
        if not self.grad_clip > 0:
            raise ConfigError(f"--grad-clip must be positive, not {self.grad_clip}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum must be in [0, 1), not {self.momentum}")
        if self.hp is not None and not 0 <= self.hp <= 1:
            raise ConfigError(f"--hp must be in [0, 1], not {self.hp}")
        if self.mapping_arch and self.mapping_arch not in get_args(Arch):
            raise ConfigError(
                f"--mapping-arch must be one of {', '.join(get_args(Arch))}, "
                f"not {self.mapping_arch!r}"
            )
        if self.recipe == "imagenet" and not self.weights:
            raise ConfigError(
                "--recipe imagenet starts from a pre-trained classifier: pass --weights with a "
                "local torchvision ResNet-50 state dict (for example resnet50-11ad3fa6.pth)"
            )

        self._resolve()

    def _resolve(self) -> None:
        """Set the resolved fields from the options (a frozen dataclass may set its own)."""
        put = functools.partial(object.__setattr__, self)
        preset = PRESETS[self.reproduce]
        put("fixed_classifier", preset.fixed_classifier)
        put("pool_probability", preset.hp if self.hp is None else self.hp)
        put("snapshot_every", preset.smf if self.smf is None else self.smf)
        paper = preset.lambda_entropy if self.score == "entropy" else preset.lambda_classification
        put("area_weight", paper if self.lambda_r is None else self.lambda_r)
        put("own_mapping", bool(self.mapping_arch) or self.mapping_width is not None)
        put("shared_encoder", not (self.unshared or self.own_mapping))
        width = self.width if self.mapping_width is None else self.mapping_width
        own = (self.mapping_arch or self.arch, width)
        put("mapping_encoder", None if self.shared_encoder else own)
        put("casm_epochs", 0 if self.classifier_only else self.epochs)
        put("run_name", self.name or self._default_name())

    def _default_name(self) -> str:
        if self.classifier_only:
            return f"classifier-s{self.seed}"
        mapping = ""
        if self.own_mapping:
            arch, width = self.mapping_encoder
            mapping = f"-map-{arch}-w{width}"
        elif self.unshared:
            mapping = "-unshared"
        return f"{self.reproduce.lower()}-{self.score}{mapping}-s{self.seed}"


Resize = Literal["center-crop", "stretch"]  # stretch: the reference's --break-ratio


@dataclass(frozen=True)
class EvalConfig:
    """`casm-deploy eval`: the paper's localisation benchmark and the many-classifiers test."""

    models: tuple[str, ...] = opt(  # checkpoints or exported files to score, and `data`
        (),
        "MODEL... [DATA]: checkpoints or exported files (masker.onnx / masker.ts, run on the "
        f"CPU), then optionally the data folder (default {DEFAULT_DATA}).",
        argument=True,
        name="paths",
        required=True,
        path=True,
        parse=models_and_data,
        show_default=False,
    )
    data: str = DEFAULT_DATA
    annotations: str = opt("", "ILSVRC XML folder (default: DATA/annotations).")
    split: str = opt("val", "Which split of DATA to score.")
    resize: Resize = opt("center-crop", "center-crop (shorter side, then crop) or stretch.")
    baselines: tuple[str, ...] = opt(
        (),
        "Methods to score beside the models (repeat or comma-separate): center (the centre "
        "box), full (the whole image), gradcam (this project's Grad-CAM); and the grad-cam "
        "package's CAMs, each of the first model's classifier (its checkpoint) at "
        "--gradcam-stage for its top-1 class: gradcam++ (Grad-CAM++), xgradcam (XGrad-CAM), "
        "layercam (LayerCAM), hirescam (HiResCAM), eigencam (Eigen-CAM: the stage's first "
        "principal component, whatever the class), scorecam (Score-CAM: a forward per channel "
        "of the stage's map for each image, in batches of --batch; by far the slowest) and "
        "pgc-gradcam (the package's Grad-CAM, which agrees with gradcam). Each method's "
        "ms_per_image says what its masks cost.",
        flag="--baseline",
        repeat=True,
    )
    # the encoder stage Grad-CAM reads (4 is the last)
    gradcam_stage: Literal[1, 2, 3, 4] = opt(
        4,
        "Encoder stage Grad-CAM reads, 1-4 (4, the last, is 2x2 at 64 px; 3 localises best on "
        "the demo, benchmarks/RESULTS.md).",
    )
    classifiers: tuple[str, ...] = opt(  # checkpoints whose classifiers judge the masked images
        (),
        "Comma-separated checkpoints whose classifiers judge clean, masked-in, masked-out and "
        "inpainted images (train them with train --classifier-only).",
    )
    classes: Literal["all", "seen", "unseen"] = opt(
        "all",
        "all, seen or unseen: score only the data's classes the first model was trained on "
        "(seen) or only the others (unseen), for the unseen-classes test.",
    )
    leak_control: bool = opt(
        False,
        "Also train a classifier on each model's binarised masks alone (training split; no "
        "image) and report its validation accuracy against chance: above chance, the mask's "
        "outline gives the class away.",
        negatable=False,
    )
    batch_size: int = opt(64, "Images per batch.", flag="--batch", at_least=1)
    workers: int = opt(1, "Data-loading processes.", at_least=0)
    limit: int = opt(0, "Score the first N images only (0: all; not negative).", at_least=0)
    json: str = opt(
        "",
        "Write the first model's scores here (keys LE, OM, F1, F1a, mask_mean, mask_std, "
        "mask_entropy, mask_tv, MaxBoxAccV2, MaxBoxAcc@0.3, MaxBoxAcc@0.5, MaxBoxAcc@0.7, "
        "n_images; PxAP when the annotations have object masks (<stem>.png beside each XML, as "
        "data synth writes them); with --copies also copy_share_lighter, "
        "copy_touch_both; when DATA has a parts/ folder (data synth --parts) also part_coverage, "
        "parts_all_touched, part_share_least, n_part_images; OM_note when some images are of "
        "classes the model does not know, which OM leaves out, or a masks-only model predicts "
        "none); with --faithfulness also deletion_auc, insertion_auc, road_morf, road_lerf, "
        "road_combined, faithfulness_judge and n_faithfulness_images; ms_per_image, the "
        "milliseconds a method took per image to make its masks (first batch included); other "
        "methods beside it.",
    )
    copies: bool = opt(
        False,
        "For data of synth --copies 2 (two boxes per image): also report copy_share_lighter "
        "(mean share of mask mass on the copy with less of it; 0.5: both equally) and "
        "copy_touch_both (share of binarised masks reaching into both boxes). Use with --resize "
        "stretch, which keeps both copies whole.",
        negatable=False,
    )
    faithfulness: bool = opt(
        False,
        "Also score each method's faithfulness to a classifier (the judge), for each image's "
        "true class, in a third table: RISE's deletion_auc (lower is better) and insertion_auc "
        "(higher), ROAD's road_morf (lower), road_lerf and road_combined (higher). Costly: "
        "2 (steps + 1) forwards and 2 sparse solves per percentage, per image and method.",
        negatable=False,
    )
    judge: str = opt(
        "",
        "With --faithfulness: the classifier checkpoint that judges (default: the first "
        "model's classifier, which CASM was trained against; an independent one is fairer).",
        path=True,
        show_default=False,
    )
    faithfulness_steps: int = opt(
        16,
        "With --faithfulness: deletion and insertion change the pixels in this many steps.",
        at_least=1,
    )
    road_percentages: str = opt(
        "20,40,60,80",
        "With --faithfulness: the percentages of pixels ROAD removes (comma-separated, 1-99); "
        "its scores are means over them.",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.judge and not self.faithfulness:
            raise ConfigError("--judge names the classifier --faithfulness uses: give both")
        _ = self.road_levels  # checked here

    @property
    def road_levels(self) -> tuple[int, ...]:
        """--road-percentages as numbers.

        Raises:
            ConfigError: not a comma-separated list of whole percentages from 1 to 99.
        """
        try:
            levels = tuple(int(p) for p in self.road_percentages.split(",") if p.strip())
        except ValueError:
            levels = ()
        if not levels or not all(1 <= p <= 99 for p in levels):
            raise ConfigError(
                "--road-percentages must be whole numbers from 1 to 99, comma-separated, not "
                f"{self.road_percentages!r}"
            )
        return levels


@dataclass(frozen=True)
class VisualizeConfig:
    """`casm-deploy visualize`: a Fig. 2 grid, the masks with their boxes (masks.png) and an HTML
    gallery with boxes and IoU."""

    models: tuple[str, ...] = opt(
        (),
        "MODEL... [DATA]: checkpoints, then optionally the data folder (ImageNet layout, or any "
        "folder of images).",
        argument=True,
        name="paths",
        required=True,
        path=True,
        parse=models_and_data,
        show_default=False,
    )
    data: str = DEFAULT_DATA
    out: str = opt("runs/visualize", "Output folder.", path=True)
    annotations: str = opt("", "ILSVRC XML folder (default: DATA/annotations).")
    resize: Resize = opt(
        "center-crop",
        "center-crop or stretch (annotated data only; a plain folder's images are used whole).",
    )
    num_images: int = opt(
        8,
        f"How many validation images, or images of a plain folder (1 to {MAX_VISUALIZE_IMAGES}).",
    )
    seed: int = opt(0, "Which images (a seeded choice).")
    # Grad-CAM of the first model's classifier, shown as one more method after the models
    gradcam_stage: Literal[0, 1, 2, 3, 4] = opt(
        0,
        "Also show Grad-CAM of the first model's classifier (a checkpoint) at this encoder "
        "stage, 1-4 (as eval --gradcam-stage); 0: none.",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if not 1 <= self.num_images <= MAX_VISUALIZE_IMAGES:
            raise ConfigError(
                f"--num-images must be 1-{MAX_VISUALIZE_IMAGES}, not {self.num_images} (the grid "
                "is one column per image and all of them go through the model at once)"
            )


Precision = Literal["fp32", "fp16", "bf16", "int8"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
_FORMATS, _PARITY, _TRITON = "Formats", "Parity check and calibration", "Triton"


@dataclass(frozen=True)
class ExportConfig:
    """`casm-deploy export`: TorchScript / ONNX / torch.export files, metadata and a parity check.

    Parity is always checked, against the eager fp32 model, on real validation images of the
    checkpoint's training data (or `data`) plus random inputs.
    """

    PANELS: ClassVar[tuple[str, ...]] = (_FORMATS, _PARITY, _TRITON)

    checkpoint: str = opt(
        "",
        "A casm-deploy checkpoint (runs/NAME/checkpoint.pt).",
        argument=True,
        required=True,
        path=True,
    )
    out: str = opt("export/default", "Output folder.", path=True)
    torchscript: bool = opt(True, "Write masker.ts (TorchScript).", panel=_FORMATS)
    onnx: bool = opt(
        False,
        "Also write masker.onnx (int8 and --triton imply it).",
        panel=_FORMATS,
        negatable=False,
    )
    pt2: bool = opt(  # TorchScript's successor
        False, "Also write masker.pt2, a torch.export program.", panel=_FORMATS, negatable=False
    )
    masks_only: bool = opt(  # SaliencyModel.masks_only(): the mapping's encoder and decoder
        False,
        "Write the mapping without the classifier: inputs `images`, one output `masks` (no "
        "logits, so infer gives no labels). Only for a mapping with an encoder of its own "
        "(trained with --unshared or --mapping-arch); a shared-encoder checkpoint is refused.",
        panel=_FORMATS,
        negatable=False,
    )
    triton: bool = opt(
        False, "Also write a Triton model repository in OUT/triton.", panel=_TRITON, negatable=False
    )
    precision: Precision = opt(
        "fp32", f"Number format of the files: {', '.join(PRECISIONS)}.", panel=_FORMATS
    )
    # 18: the lowest the dynamo exporter supports; bf16 needs 22
    opset: int = opt(18, "ONNX opset (18 or more; bf16 uses 22).", panel=_FORMATS)
    # Triton's max_batch_size; the graphs take any batch
    max_batch: int = opt(256, "Triton's max_batch_size.", panel=_TRITON, at_least=1)
    device: Literal["cpu", "cuda"] = opt(
        "cpu", "cpu or cuda: where to trace and check.", panel=_PARITY
    )
    # empty: the checkpoint's training data
    data: str = opt(
        "",
        "ImageNet-layout folder for the parity check (val) and int8 calibration (train); "
        "default: the checkpoint's training data.",
        panel=_PARITY,
        flag=("--data", "--parity-data"),
    )
    parity_images: int = 64  # real images (val, topped up from train when val is smaller)
    parity_random: int = opt(16, at_least=0)  # uniform random images on top
    calibration_images: int = opt(  # int8: training images that set the activation ranges
        128, "int8: training images that calibrate the activations.", panel=_PARITY
    )
    triton_name: str = opt("casm_masker", "Model name in the Triton repository.", panel=_TRITON)
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self)
        if self.opset < 18:
            raise ConfigError(
                f"--opset must be at least 18 (the dynamo exporter), not {self.opset}"
            )
        if self.parity_images < 64:
            raise ConfigError(f"parity needs at least 64 real images, not {self.parity_images}")
        if self.calibration_images < 1:
            raise ConfigError(f"calibration needs at least 1 image, not {self.calibration_images}")

    @property
    def writes_onnx(self) -> bool:
        return self.onnx or self.triton or self.precision == "int8"


@dataclass(frozen=True)
class InferConfig:
    """`casm-deploy infer`: masks, boxes and labels for every image file under a folder.

    Resumable: OUT/boxes.jsonl records each file once; a rerun does only what is not in it.
    """

    dir: str = opt(
        "",
        "Folder of images (searched recursively).",
        argument=True,
        name="folder",
        required=True,
        path=True,
    )
    model: str = opt(
        "export/default/masker.onnx",
        "masker.onnx or masker.ts (casm-deploy export) or a checkpoint. An ONNX file is data; a "
        "TorchScript file is a program: loading and running it runs the code it holds (it is "
        "inspected first, a safeguard, not a sandbox), so use ONNX for model files you did not "
        "make yourself.",
        path=True,
    )
    out: str = opt("out", "Output folder.", path=True)
    batch: int = opt(256, "Images per model call.", at_least=1)
    backend: Literal["auto", "onnx", "torchscript", "eager"] = opt(
        "auto", "auto, onnx, torchscript or eager (auto: from the file name)."
    )
    device: str = opt("auto", "auto, cpu or cuda (auto: CUDA if present).")
    # decoding and writing threads; 0: one per CPU this process may use (common/cpus.py)
    workers: int = opt(
        0, "Decoding and writing threads (0: one per CPU this process may use).", at_least=0
    )
    decoder: Literal["auto", "opencv", "dali", "torchvision"] = opt(
        "auto",
        "opencv, dali (JPEGs through NVIDIA DALI: nvJPEG on a GPU) or torchvision (JPEGs through "
        "torchvision: nvJPEG on a GPU); auto: on CUDA dali when installed, else torchvision; "
        "opencv on the CPU.",
    )
    masks: Literal["png", "npy", "none"] = opt(
        "png", "png (8-bit), npy (float32) or none: OUT/masks/<path>.<ext>."
    )
    mask_size: Literal["original", "model"] = opt(
        "original", "original (each image's size) or model (the input size)."
    )
    overlay: bool = opt(
        False,
        "Also OUT/overlays/<path>.jpg: the image dimmed by its mask, with the box, class name "
        "and score.",
        negatable=False,
    )
    coco: str = opt("", "Also write COCO-style detections to this file.")
    overwrite: bool = opt(False, "Delete OUT's earlier results and start over.", negatable=False)
    expect_sha256: str = opt(  # checked before the model file is read
        "",
        "Pin the model file: refuse it unless its SHA-256 is HEX (compared before anything in "
        "it is parsed or loaded).",
        metavar="HEX",
    )
    retry_errors: bool = opt(False, "Do the files recorded as errors again.", negatable=False)
    # larger images are refused unread, which bounds each worker's memory; 120 MP is
    # data/imagefiles.py's MAX_PIXELS (why: there), the limit of everything else that reads images
    max_megapixels: float = opt(
        120.0,
        "Refuse larger images (width x height), before decoding them; also caps the file size. "
        "Bounds each decoding thread's memory.",
    )

    shard: str = opt(
        "",
        "Do share K of N of the files (K from 0; a stable hash of each path), as rank K of a "
        "torchrun job of N would: one process of a SLURM array, a Kubernetes indexed job or a "
        "shell loop. Each writes OUT/parts/; the last to finish merges them into boxes.jsonl "
        "and summary.json (casm-deploy merge OUT by hand).",
        metavar="K/N",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.max_megapixels > 0:
            raise ConfigError(f"--max-megapixels must be positive, not {self.max_megapixels}")
        match = re.fullmatch(r"(\d+)/(\d+)", self.shard)
        if self.shard and not (match and int(match[1]) < int(match[2])):
            raise ConfigError(f"--shard {self.shard!r}: give K/N with 0 <= K < N, e.g. 0/4")

    @property
    def max_pixels(self) -> int:
        """--max-megapixels in pixels: the limit of infer's reading and of its overlays."""
        return round(self.max_megapixels * 1e6)


@dataclass(frozen=True)
class MergeConfig:
    """`casm-deploy merge`: join the parts of a sharded infer run (torchrun or --shard)."""

    out: str = opt("out", "The infer output folder (infer's --out).", argument=True, path=True)
    coco: str = opt("", "Also write COCO-style detections here (default: the shards' --coco).")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass's options (tuples become lists; its `resolved`
    fields left out), in its class's FILE_ORDER where it has one, then as declared."""
    options = [f.name for f in dataclasses.fields(cfg) if is_option(f)]
    order = getattr(cfg, "FILE_ORDER", ())
    names = [n for n in order if n in options] + [n for n in options if n not in order]
    return {name: json_ready(getattr(cfg, name)) for name in names}


def json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


def config_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Rebuild a config from `config_to_dict` output, ignoring keys it no longer has."""
    names = {f.name for f in dataclasses.fields(cls) if is_option(f)}
    kwargs = {}
    for key, value in values.items():
        if key in names:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


__all__ = [
    "DEFAULT_DATA",
    "EvalConfig",
    "ExportConfig",
    "InferConfig",
    "MergeConfig",
    "MAX_VISUALIZE_IMAGES",
    "PRECISIONS",
    "PRESETS",
    "Preset",
    "RECIPES",
    "SynthConfig",
    "TrainConfig",
    "VisualizeConfig",
    "config_from_dict",
    "config_to_dict",
    "models_and_data",
]
