"""One frozen dataclass per command; the defaults live here and nowhere else.

This module imports no torch, so `casm-deploy --help` stays instant. Every command writes
its resolved config next to its outputs (`config_to_dict`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

DEFAULT_DATA = "data/synth"
# visualize: grid.png is one column of cells per image (8,480 px wide at 64 images of 64 px),
# and all the images go through each model in one batch; 64 keeps both small.
MAX_VISUALIZE_IMAGES = 64


def _flag(name: str) -> str:
    """The command-line option of a config field: batch_size -> batch-size."""
    return name.replace("_", "-")


def _at_least(cfg: Any, name: str, low: int, option: str = "") -> None:
    """Refuse `cfg.<name>` below `low` (None passes: an unset override), naming the option."""
    value = getattr(cfg, name)
    if value is not None and value < low:
        raise ValueError(f"{option or '--' + _flag(name)} must be at least {low}, not {value}")


@dataclass(frozen=True)
class SynthConfig:
    """`casm-deploy data synth`: the embedded ImageNet-layout benchmark."""

    out: str = DEFAULT_DATA
    num_classes: int = 10  # the first N shape classes (ignored when `classes` is given)
    classes: tuple[str, ...] = ()  # a subset by name or wnid, for unseen-class experiments
    train_per_class: int = 1000
    val_per_class: int = 100
    min_side: int = 80  # shorter image side, pixels
    max_side: int = 128
    min_area: float = 0.10  # object box area as a fraction of the image (one copy)
    max_area: float = 0.60
    copies: int = 1  # 2: each image is two identical copies side by side (paper §2.1)
    # With copies == 2: "copy" (the right half repeats the left) or "clutter" (the right half is
    # background and distractors of the same size, no object), to pre-train a classifier that
    # only ever sees the object on the left.
    right: str = "copy"
    # > 0: each object is that many parts (synth.PART_KINDS: shape, texture, glyph), any one of
    # which identifies the class; 0: one solid shape per object.
    parts: int = 0
    seed: int = 0
    workers: int = 2
    overwrite: bool = False


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
# embedded data on a 2-core CPU); "imagenet" is the reference code's (kondiz/casme train.py and
# train_utils.set_args) for a torchvision ResNet-50 pre-trained on ImageNet, which `--weights`
# must name (a local state-dict file). train/README.md says where each value comes from.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
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


@dataclass(frozen=True)
class TrainConfig:
    """`casm-deploy train`: classifier pre-training, then the CASM phase (Algorithm 1).

    The defaults are this project's recipe for the embedded data on a 2-core CPU: a half-width
    ResNet-18 at 64 px. The paper's ImageNet settings are the `imagenet` recipe (RECIPES).
    """

    data: str = DEFAULT_DATA
    out: str = "runs"
    name: str = ""  # run folder name; empty: derived from the preset and the seed
    arch: str = "resnet18"
    width: int = 32  # channels of the stem; torchvision's ResNets use 64
    image_size: int = 64
    weights: str = ""  # a local torchvision state-dict file, or a torchvision weights name
    resume: bool = False
    seed: int = 0
    # Data-loading processes (0: load in the main process). None: 1 on the CPU, where the model
    # needs the cores; on CUDA the cores this process may use, shared by the GPUs of the node.
    workers: int | None = None
    loader: str = "torch"  # torch | dali | auto (the data module picks)
    device: str = "auto"  # auto: CUDA when available, else CPU
    channels_last: bool = True
    amp: str = "off"  # off | bf16 | fp16 (fp16: CUDA only, with a gradient scaler)
    # center-crop: shorter side to S, a random S x S crop and a random flip (validation: the
    # centre crop); stretch: the whole image to S x S, no crop, no flip, in training and
    # validation alike (the two-copies experiment needs its left/right layout kept);
    # random-resized-crop: torchvision's RandomResizedCrop(S) and a flip, the reference's
    # ImageNet augmentation (validation: the centre crop).
    resize: str = "center-crop"
    # What a masked-out pixel becomes: black (0 in [0, 1]), or the ImageNet mean colour, as the
    # reference's training does by masking the normalised image.
    fill: str = "black"
    # A training file that does not decode is skipped (replaced by the next sample, and listed
    # in metrics.jsonl) instead of stopping the run. Validation images are never skipped.
    skip_bad_images: bool = False

    # Classifier pre-training on clean images (Adam, one-cycle schedule).
    classifier_only: bool = False  # stop after pre-training (classifiers for the Fig. 3 test)
    pretrain_epochs: int = 10
    pretrain_lr: float = 2e-3
    pretrain_batch_size: int = 64

    # CASM phase.
    reproduce: str = "L100"
    score: str = "entropy"  # or "classification" (the "C" rows of Table 2)
    # Area weight. The reference's per-preset values (None, `--lambda-r paper`) aim at ~50%
    # salient pixels on ImageNet; on the embedded data 2.5 gives F and L100 the same mask area
    # (~0.33, the objects' box area) with the entropy score: train/README.md has the sweep.
    lambda_r: float | None = 2.5
    epochs: int = 12
    batch_size: int = 64
    epoch_fraction: float = 0.5  # share of the training set seen per epoch (reference: 0.2)
    lr: float = 1e-2  # classifier SGD (reference: 1e-3 for a pre-trained ResNet-50)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_decoder: float = 1e-3  # decoder Adam
    lr_decay_every: int = 8  # epochs between x0.1 decays (reference: 20 of 60-70)
    pool_size: int = 30
    # Where the pool's snapshots live: device (the training device: no copy per draw), pinned
    # (pinned host memory, copied without blocking at each draw), auto (the device when the
    # whole pool takes at most a fifth of its memory, else pinned; the CPU when training there).
    pool_device: str = "auto"
    grad_clip: float = 10.0
    upsample: str = "nearest"  # final decoder upsampling: "nearest" (reference) or "bilinear"
    unshared: bool = False  # the mapping gets an encoder of its own (Table 2 (i)-(k))
    hp: float | None = None  # override the preset
    smf: int | None = None  # override the preset
    # The recipe the other fields started from (RECIPES); options given beside it override it.
    recipe: str = "default"

    def __post_init__(self) -> None:
        if self.reproduce not in PRESETS:
            raise ValueError(
                f"--reproduce must be one of {', '.join(PRESETS)}, not {self.reproduce!r}"
            )
        if self.score not in ("entropy", "classification"):
            raise ValueError(f"--score must be entropy or classification, not {self.score!r}")
        if self.upsample not in ("nearest", "bilinear"):
            raise ValueError(f"--upsample must be nearest or bilinear, not {self.upsample!r}")
        if not 0 < self.epoch_fraction <= 1:
            raise ValueError(f"--epoch-fraction must be in (0, 1], not {self.epoch_fraction}")
        if self.amp not in ("off", "bf16", "fp16"):
            raise ValueError(f"--amp must be off, bf16 or fp16, not {self.amp!r}")
        if self.loader not in ("torch", "dali", "auto"):
            raise ValueError(f"--loader must be torch, dali or auto, not {self.loader!r}")
        if self.resize not in ("center-crop", "stretch", "random-resized-crop"):
            raise ValueError(
                f"--resize must be center-crop, stretch or random-resized-crop, not {self.resize!r}"
            )
        if self.fill not in ("black", "mean"):
            raise ValueError(f"--fill must be black or mean, not {self.fill!r}")
        if self.pool_device not in ("auto", "device", "pinned"):
            raise ValueError(
                f"--pool-device must be auto, device or pinned, not {self.pool_device!r}"
            )
        if self.recipe not in RECIPES:
            raise ValueError(f"--recipe must be one of {', '.join(RECIPES)}, not {self.recipe!r}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers must be 0 or more, not {self.workers}")
        for name in ("batch_size", "pretrain_batch_size", "image_size", "width", "pool_size"):
            _at_least(self, name, 1)
        # lr_decay_every and smf divide step and epoch numbers
        for name in ("epochs", "pretrain_epochs", "lr_decay_every", "smf"):
            _at_least(self, name, 0 if name.endswith("epochs") else 1)
        if not self.grad_clip > 0:
            raise ValueError(f"--grad-clip must be positive, not {self.grad_clip}")
        # a learning rate of 0 holds that part still (a test of what the others do)
        for name in ("lr", "pretrain_lr", "lr_decoder", "weight_decay", "lambda_r"):
            _at_least(self, name, 0)
        if not 0 <= self.momentum < 1:
            raise ValueError(f"--momentum must be in [0, 1), not {self.momentum}")
        if self.hp is not None and not 0 <= self.hp <= 1:
            raise ValueError(f"--hp must be in [0, 1], not {self.hp}")

    @property
    def preset(self) -> Preset:
        return PRESETS[self.reproduce]

    @property
    def fixed_classifier(self) -> bool:
        return self.preset.fixed_classifier

    @property
    def resolved_hp(self) -> float:
        return self.preset.hp if self.hp is None else self.hp

    @property
    def resolved_smf(self) -> int | None:
        return self.preset.smf if self.smf is None else self.smf

    @property
    def resolved_lambda_r(self) -> float:
        if self.lambda_r is not None:
            return self.lambda_r
        p = self.preset
        return p.lambda_entropy if self.score == "entropy" else p.lambda_classification

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        if self.classifier_only:
            return f"classifier-s{self.seed}"
        unshared = "-unshared" if self.unshared else ""
        return f"{self.reproduce.lower()}-{self.score}{unshared}-s{self.seed}"

    @property
    def casm_epochs(self) -> int:
        return 0 if self.classifier_only else self.epochs


def train_config(recipe: str = "default", **given: Any) -> TrainConfig:
    """The TrainConfig of `recipe`, with the values in `given` (the options a user gave) on top.

    Raises:
        ValueError: an unknown recipe, or a value TrainConfig refuses; the imagenet recipe
            without `weights` (its classifier must start from pre-trained ImageNet weights).
    """
    if recipe not in RECIPES:
        raise ValueError(f"--recipe must be one of {', '.join(RECIPES)}, not {recipe!r}")
    cfg = TrainConfig(**{**RECIPES[recipe], **given, "recipe": recipe})
    if recipe == "imagenet" and not cfg.weights:
        raise ValueError(
            "--recipe imagenet starts from a pre-trained classifier: pass --weights with a local "
            "torchvision ResNet-50 state dict (for example resnet50-11ad3fa6.pth)"
        )
    return cfg


@dataclass(frozen=True)
class EvalConfig:
    """`casm-deploy eval`: the paper's localisation benchmark and the many-classifiers test."""

    models: tuple[str, ...] = ()  # checkpoints to score
    data: str = DEFAULT_DATA
    annotations: str = ""  # empty: DATA/annotations
    split: str = "val"
    resize: str = "center-crop"  # or "stretch" (the reference's --break-ratio)
    baselines: tuple[str, ...] = ()  # any of center, full, gradcam
    gradcam_stage: int = 4  # the encoder stage Grad-CAM reads (1-4; 4 is the last)
    classifiers: tuple[str, ...] = ()  # checkpoints whose classifiers judge the masked images
    classes: str = "all"  # all | seen | unseen: the data's classes the first model was trained on
    leak_control: bool = False  # train a classifier on each model's binarised masks alone
    batch_size: int = 64
    workers: int = 1
    limit: int = 0  # score the first N images only (0: all)
    json: str = ""  # write the scores here
    copies: bool = False  # data of `synth --copies 2`: also score how the mask covers both copies

    def __post_init__(self) -> None:
        _at_least(self, "batch_size", 1, "--batch")
        _at_least(self, "workers", 0)
        _at_least(self, "limit", 0)
        if self.gradcam_stage not in (1, 2, 3, 4):
            raise ValueError(f"--gradcam-stage must be 1-4, not {self.gradcam_stage}")
        if self.classes not in ("all", "seen", "unseen"):
            raise ValueError(f"--classes must be all, seen or unseen, not {self.classes!r}")


@dataclass(frozen=True)
class VisualizeConfig:
    """`casm-deploy visualize`: a Fig. 2 grid and an HTML gallery with boxes and IoU."""

    models: tuple[str, ...] = ()
    data: str = DEFAULT_DATA
    out: str = "runs/visualize"
    annotations: str = ""  # empty: DATA/annotations
    resize: str = "center-crop"
    num_images: int = 8  # at most MAX_VISUALIZE_IMAGES
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.num_images <= MAX_VISUALIZE_IMAGES:
            raise ValueError(
                f"--num-images must be 1-{MAX_VISUALIZE_IMAGES}, not {self.num_images} (the grid "
                "is one column per image and all of them go through the model at once)"
            )


PRECISIONS = ("fp32", "fp16", "bf16", "int8")


@dataclass(frozen=True)
class ExportConfig:
    """`casm-deploy export`: TorchScript / ONNX / torch.export files, metadata and a parity check.

    Parity is always checked, against the eager fp32 model, on real validation images of the
    checkpoint's training data (or `data`) plus random inputs.
    """

    checkpoint: str = ""
    out: str = "export/default"
    torchscript: bool = True
    onnx: bool = False  # int8 and --triton imply it
    pt2: bool = False  # a torch.export program, TorchScript's successor
    triton: bool = False  # a Triton model repository in OUT/triton
    precision: str = "fp32"
    opset: int = 18  # the lowest the dynamo exporter supports; bf16 needs 22
    max_batch: int = 256  # Triton's max_batch_size; the graphs take any batch
    device: str = "cpu"  # where the export is traced and checked: cpu or cuda
    data: str = ""  # parity (val) and int8 calibration (train) images; empty: the training data
    parity_images: int = 64  # real images (val, topped up from train when val is smaller)
    parity_random: int = 16  # uniform random images on top
    calibration_images: int = 128  # int8: training images that set the activation ranges
    triton_name: str = "casm_masker"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}"
            )
        if self.opset < 18:
            raise ValueError(f"--opset must be at least 18 (the dynamo exporter), not {self.opset}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, not {self.device!r}")
        if self.max_batch < 1:
            raise ValueError(f"--max-batch must be at least 1, not {self.max_batch}")
        if self.parity_images < 64:
            raise ValueError(f"parity needs at least 64 real images, not {self.parity_images}")
        _at_least(self, "parity_random", 0)
        if self.calibration_images < 1:
            raise ValueError(f"calibration needs at least 1 image, not {self.calibration_images}")

    @property
    def writes_onnx(self) -> bool:
        return self.onnx or self.triton or self.precision == "int8"


@dataclass(frozen=True)
class InferConfig:
    """`casm-deploy infer`: masks, boxes and labels for every image file under a folder.

    Resumable: OUT/boxes.jsonl records each file once; a rerun does only what is not in it.
    """

    dir: str = ""
    model: str = "export/default/masker.onnx"
    out: str = "out"
    batch: int = 256
    backend: str = "auto"  # auto: from the model file's suffix
    device: str = "auto"  # auto: CUDA when there is one
    workers: int = 0  # decoding and writing threads; 0: one per CPU this process may use (cpus.py)
    # opencv, dali or torchvision for JPEGs (auto: on CUDA dali when installed, else
    # torchvision's nvJPEG; opencv on the CPU)
    decoder: str = "auto"
    masks: str = "png"  # png (8-bit), npy (float32) or none
    mask_size: str = "original"  # original (each image's size) or model (S x S)
    overlay: bool = False  # also OUT/overlays/<path>.jpg: the image, its mask and box
    coco: str = ""  # also write COCO-style detections here
    overwrite: bool = False  # start over: delete OUT's earlier results
    expect_sha256: str = ""  # refuse a model file of another SHA-256 (checked before it is read)
    retry_errors: bool = False  # do the files recorded as errors again
    # larger images are refused unread, which bounds each worker's memory (why 120: images.py)
    max_megapixels: float = 120.0

    def __post_init__(self) -> None:
        if not self.max_megapixels > 0:
            raise ValueError(f"--max-megapixels must be positive, not {self.max_megapixels}")
        if self.batch < 1:
            raise ValueError(f"--batch must be at least 1, not {self.batch}")
        if self.workers < 0:
            raise ValueError(f"--workers must be 0 (a CPU each) or more, not {self.workers}")
        if self.masks not in ("png", "npy", "none"):
            raise ValueError(f"--masks must be png, npy or none, not {self.masks!r}")
        if self.decoder not in ("auto", "opencv", "dali", "torchvision"):
            raise ValueError(
                f"--decoder must be auto, opencv, dali or torchvision, not {self.decoder!r}"
            )
        if self.mask_size not in ("original", "model"):
            raise ValueError(f"--mask-size must be original or model, not {self.mask_size!r}")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return json_ready(dataclasses.asdict(cfg))


def json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


def config_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Rebuild a config from `config_to_dict` output, ignoring keys it no longer has."""
    names = {f.name: f for f in dataclasses.fields(cls)}
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
    "train_config",
]
