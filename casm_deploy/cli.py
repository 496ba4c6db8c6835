"""The `casm-deploy` command line: it parses arguments into a config and calls the job's `run`.

Heavy imports (torch, cv2) happen inside the commands, so `casm-deploy --help` is instant.
A user mistake (`UserError`) prints one line and exits with status 2, never a traceback.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from casm_deploy import __version__
from casm_deploy.config import (
    DEFAULT_DATA,
    MAX_VISUALIZE_IMAGES,
    PRECISIONS,
    PRESETS,
    RECIPES,
    EvalConfig,
    ExportConfig,
    InferConfig,
    SynthConfig,
    TrainConfig,
    VisualizeConfig,
    train_config,
)
from casm_deploy.errors import UserError

# Help texts are Rich markup ("rich" mode): Rich reads [lowercase...] as a tag and drops it, so
# defaults are written in words. The lines of a help text after its first paragraph are kept as
# they are, which keeps the examples below whole; prose paragraphs are joined by `_reflow`.
# Each example is a line starting with `casm-deploy` (`\` continues it on the next line);
# tests/test_help.py parses every one against the command's options.
WORKFLOW = """Train a classifier-agnostic saliency mapping (CASM) and deploy it.

Workflow (each step reads what the one before wrote, by default):
  casm-deploy data synth                             # data/synth
  casm-deploy train --name demo                      # runs/demo/checkpoint.pt
  casm-deploy export runs/demo/checkpoint.pt --onnx  # export/default/
  casm-deploy infer data/synth/val                   # out/: masks, boxes
  casm-deploy eval runs/demo/checkpoint.pt           # scores: LE, OM, F1

`casm-deploy COMMAND --help` gives each command's options and examples."""

app = typer.Typer(
    name="casm-deploy",
    help=WORKFLOW,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(
    help="Data sets: generate the embedded ImageNet-layout benchmark.",
    epilog="""
Example:
  casm-deploy data synth""",
)
app.add_typer(data_app, name="data")

F = TypeVar("F", bound=Callable[..., Any])


def _reflow(command: F) -> F:
    """Join the lines of each paragraph of the command's docstring: Rich keeps the newlines of
    a help text, so lines wrapped for the source would break mid-sentence in the terminal."""
    paragraphs = inspect.cleandoc(command.__doc__ or "").split("\n\n")
    command.__doc__ = "\n\n".join(" ".join(p.split()) for p in paragraphs)
    return command


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"casm-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    # The group's own options: only --version, which prints and exits before any command.
    pass


_S = SynthConfig()
_T = TrainConfig()
_E = EvalConfig()
_V = VisualizeConfig()
_X = ExportConfig()
_I = InferConfig()


def _call(job: Callable[[], Any]) -> Any:
    try:
        return job()
    except UserError as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    except ValueError as error:  # a config dataclass refused a value
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        raise typer.Exit(130) from None


def _lambda_r(text: str) -> float | None:
    if text == "paper":
        return None
    try:
        return float(text)
    except ValueError:
        raise UserError(f"--lambda-r must be a number or 'paper', not {text!r}") from None


_SIZE, _LAYOUT = "Classes and counts", "Image layout"


@data_app.command(
    "synth",
    epilog="""
Examples:
  # 10 classes, 1,000 training and 100 validation images each, into data/synth
  casm-deploy data synth
  # the first 5 classes only (the unseen-classes test trains on these)
  casm-deploy data synth data/classes5 --num-classes 5
  # two copies side by side, the right one replaced by clutter (paper 2.1)
  casm-deploy data synth data/left --copies 2 --right clutter
  # objects of three parts, any one of which identifies the class
  casm-deploy data synth data/parts --parts 3""",
)
@_reflow
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder.")] = Path(_S.out),
    num_classes: Annotated[
        int,
        typer.Option("--num-classes", help="Use the first N shape classes.", rich_help_panel=_SIZE),
    ] = _S.num_classes,
    classes: Annotated[
        str,
        typer.Option(
            help="Comma-separated subset of classes (names or wnids), instead of --num-classes.",
            rich_help_panel=_SIZE,
        ),
    ] = "",
    train_per_class: Annotated[
        int, typer.Option(help="Training images per class.", rich_help_panel=_SIZE)
    ] = _S.train_per_class,
    val_per_class: Annotated[
        int, typer.Option(help="Validation images per class.", rich_help_panel=_SIZE)
    ] = _S.val_per_class,
    min_side: Annotated[
        int, typer.Option(help="Smallest shorter image side (px).", rich_help_panel=_LAYOUT)
    ] = _S.min_side,
    max_side: Annotated[
        int, typer.Option(help="Largest shorter image side (px).", rich_help_panel=_LAYOUT)
    ] = _S.max_side,
    min_area: Annotated[
        float,
        typer.Option(help="Smallest object area (image fraction).", rich_help_panel=_LAYOUT),
    ] = _S.min_area,
    max_area: Annotated[
        float, typer.Option(help="Largest object area (image fraction).", rich_help_panel=_LAYOUT)
    ] = _S.max_area,
    copies: Annotated[
        int,
        typer.Option(
            help="2: each image is two identical copies side by side (paper 2.1).",
            rich_help_panel=_LAYOUT,
        ),
    ] = _S.copies,
    right: Annotated[
        str,
        typer.Option(
            help="With --copies 2: copy (the right half repeats the left) or clutter (the right "
            "half is background and distractors, no object; only the left box is annotated), to "
            "pre-train a classifier (train --classifier-only --resize stretch) that only looks "
            "at the left copy.",
            rich_help_panel=_LAYOUT,
        ),
    ] = _S.right,
    parts: Annotated[
        int,
        typer.Option(
            help="N > 0: each object is N parts (a shape, a texture patch, a glyph; 1 to 3), any "
            "one of which identifies the class, the shape the easiest; part label maps and boxes "
            "of the validation images in OUT/parts/. 0: one solid shape.",
            rich_help_panel=_LAYOUT,
        ),
    ] = _S.parts,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same files.")] = (
        _S.seed
    ),
    workers: Annotated[int, typer.Option(help="Generator processes.")] = _S.workers,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing data set.")] = False,
) -> None:
    """Generate the embedded benchmark: ImageNet layout, ILSVRC XML boxes, shapes on clutter."""
    from casm_deploy.data.synth import generate

    cfg = SynthConfig(
        out=str(out),
        num_classes=num_classes,
        classes=tuple(c.strip() for c in classes.split(",") if c.strip()),
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        min_side=min_side,
        max_side=max_side,
        min_area=min_area,
        max_area=max_area,
        copies=copies,
        right=right,
        parts=parts,
        seed=seed,
        workers=workers,
        overwrite=overwrite,
    )
    _call(lambda: generate(cfg))


# Option groups of `train` --help: few options each, and the long flag names (with their
# --no- forms) in small groups, so that at 80 columns each group's help column stays wide.
_METHOD, _MODEL, _PHASES, _OPTIM, _INPUT, _HARDWARE, _RUN = (
    "Method",
    "Model",
    "Phases",
    "Optimisers",
    "Data",
    "Hardware",
    "Run",
)


@app.command(
    epilog="""
Examples:
  # the default recipe on data/synth (generated if missing) into runs/demo
  casm-deploy train --name demo
  # Baseline F, the paper's fixed-classifier thinning
  casm-deploy train --reproduce F --name demo-f
  # continue a run that was stopped, from its last checkpoint
  casm-deploy train --name demo --resume
  # the paper's ImageNet training of a pre-trained ResNet-50
  casm-deploy train /data/imagenet --recipe imagenet \\
      --weights /path/to/resnet50-11ad3fa6.pth
  # two phases, as make demo: a classifier, then CASM from it
  casm-deploy train --name demo-classifier --classifier-only
  casm-deploy train --name demo --pretrain-epochs 0 \\
      --weights runs/demo-classifier/checkpoint.pt""",
)
@_reflow
def train(
    ctx: typer.Context,
    data: Annotated[
        Path, typer.Argument(help="ImageNet-layout folder; the default is generated if missing.")
    ] = Path(DEFAULT_DATA),
    recipe: Annotated[
        str,
        typer.Option(
            help=f"{' or '.join(RECIPES)}: a set of values at once; the options given beside it "
            "override it. default: this project's recipe for the embedded data on a CPU; "
            "imagenet: the reference code's ImageNet training of a pre-trained ResNet-50 at "
            "224 px (needs --weights; train/README.md lists its values).",
            rich_help_panel=_METHOD,
        ),
    ] = _T.recipe,
    reproduce: Annotated[
        str,
        typer.Option(
            help=f"Thinning strategy of the paper: {', '.join(PRESETS)} (F: Baseline F, a "
            "fixed classifier).",
            rich_help_panel=_METHOD,
        ),
    ] = _T.reproduce,
    score: Annotated[
        str,
        typer.Option(help="Mapping score: entropy or classification.", rich_help_panel=_METHOD),
    ] = _T.score,
    lambda_r: Annotated[
        str,
        typer.Option(
            help="Area weight: a number, or 'paper' for the reference's per-preset ImageNet value.",
            rich_help_panel=_METHOD,
        ),
    ] = str(_T.lambda_r),
    hp: Annotated[
        float | None,
        typer.Option(help="Override the preset's pool probability.", rich_help_panel=_METHOD),
    ] = None,
    smf: Annotated[
        int | None,
        typer.Option(help="Override the preset's snapshot period.", rich_help_panel=_METHOD),
    ] = None,
    pool_size: Annotated[
        int, typer.Option(help="Thinning pool capacity.", rich_help_panel=_METHOD)
    ] = _T.pool_size,
    pool_device: Annotated[
        str,
        typer.Option(
            help="Where the pool's snapshots live on a GPU: device (no copy per draw), pinned "
            "(pinned host memory, copied without blocking), auto (device when the pool takes "
            "at most a fifth of the GPU's memory). Training on the CPU keeps them in memory.",
            rich_help_panel=_METHOD,
        ),
    ] = _T.pool_device,
    upsample: Annotated[
        str,
        typer.Option(help="Final mask upsampling: nearest or bilinear.", rich_help_panel=_METHOD),
    ] = _T.upsample,
    unshared: Annotated[
        bool,
        typer.Option(
            help="Give the mapping an encoder of its own (a copy of the classifier when the "
            "CASM phase starts, trained with the decoder), instead of sharing the classifier's.",
            rich_help_panel=_METHOD,
        ),
    ] = _T.unshared,
    fill: Annotated[
        str,
        typer.Option(
            help="What masked-out pixels become: black, or mean (the ImageNet mean colour, as "
            "the reference's training has them).",
            rich_help_panel=_METHOD,
        ),
    ] = _T.fill,
    arch: Annotated[
        str, typer.Option(help="resnet18, resnet34 or resnet50.", rich_help_panel=_MODEL)
    ] = _T.arch,
    width: Annotated[
        int, typer.Option(help="Stem channels (torchvision: 64).", rich_help_panel=_MODEL)
    ] = _T.width,
    image_size: Annotated[
        int, typer.Option(help="Training image size (px).", rich_help_panel=_MODEL)
    ] = _T.image_size,
    weights: Annotated[
        str,
        typer.Option(
            help="Start the classifier from a local torchvision state dict, a casm-deploy "
            "checkpoint, or a torchvision weights name already in torch's cache.",
            rich_help_panel=_MODEL,
        ),
    ] = "",
    pretrain_epochs: Annotated[
        int,
        typer.Option(
            help="Classifier pre-training epochs on clean images (0: none).",
            rich_help_panel=_PHASES,
        ),
    ] = _T.pretrain_epochs,
    classifier_only: Annotated[
        bool,
        typer.Option(
            help="Only pre-train a classifier (independent classifiers for eval --classifiers).",
            rich_help_panel=_PHASES,
        ),
    ] = False,
    epochs: Annotated[int, typer.Option(help="CASM epochs.", rich_help_panel=_PHASES)] = (
        _T.epochs
    ),
    epoch_fraction: Annotated[
        float,
        typer.Option(
            help="Share of the training set seen per CASM epoch.", rich_help_panel=_PHASES
        ),
    ] = _T.epoch_fraction,
    pretrain_batch_size: Annotated[
        int,
        typer.Option(help="Pre-training batch size (per process).", rich_help_panel=_OPTIM),
    ] = _T.pretrain_batch_size,
    pretrain_lr: Annotated[
        float, typer.Option(help="Pre-training Adam peak LR.", rich_help_panel=_OPTIM)
    ] = _T.pretrain_lr,
    batch_size: Annotated[
        int, typer.Option(help="CASM batch size (per process).", rich_help_panel=_OPTIM)
    ] = _T.batch_size,
    lr: Annotated[
        float, typer.Option(help="Classifier SGD LR in the CASM phase.", rich_help_panel=_OPTIM)
    ] = _T.lr,
    momentum: Annotated[
        float, typer.Option(help="Classifier SGD momentum.", rich_help_panel=_OPTIM)
    ] = _T.momentum,
    lr_decoder: Annotated[
        float, typer.Option(help="Decoder Adam LR.", rich_help_panel=_OPTIM)
    ] = _T.lr_decoder,
    lr_decay_every: Annotated[
        int, typer.Option(help="Epochs between x0.1 LR decays.", rich_help_panel=_OPTIM)
    ] = _T.lr_decay_every,
    weight_decay: Annotated[
        float, typer.Option(help="Weight decay of both optimisers.", rich_help_panel=_OPTIM)
    ] = _T.weight_decay,
    grad_clip: Annotated[
        float, typer.Option(help="Decoder gradient-norm clip.", rich_help_panel=_OPTIM)
    ] = _T.grad_clip,
    resize: Annotated[
        str,
        typer.Option(
            help="center-crop (shorter side, random crop and flip; validation: centre crop), "
            "stretch (the whole image to S x S, no crop, no flip, validation too: keeps the "
            "left/right layout of synth --copies 2 data; torch loader only) or "
            "random-resized-crop (torchvision's RandomResizedCrop and a flip, the reference's "
            "ImageNet augmentation; validation: centre crop).",
            rich_help_panel=_INPUT,
        ),
    ] = _T.resize,
    loader: Annotated[
        str, typer.Option(help="Data loader: torch, dali or auto.", rich_help_panel=_INPUT)
    ] = _T.loader,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Data-loading processes (0: in the main process). Default: 1 on the CPU; on "
            "CUDA the cores, shared by the node's GPUs.",
            show_default=False,
            rich_help_panel=_INPUT,
        ),
    ] = _T.workers,
    skip_bad_images: Annotated[
        bool,
        typer.Option(
            "--skip-bad-images",
            help="Skip training images that do not decode (each is replaced by the next "
            "image; metrics.jsonl lists them) instead of stopping the run. Torch loader only.",
            rich_help_panel=_INPUT,
        ),
    ] = _T.skip_bad_images,
    device: Annotated[
        str,
        typer.Option(
            help="auto, cpu or cuda (auto: CUDA when available).", rich_help_panel=_HARDWARE
        ),
    ] = _T.device,
    amp: Annotated[
        str,
        typer.Option(
            help="Mixed precision: off, bf16 or fp16 (fp16: CUDA, with a gradient scaler).",
            rich_help_panel=_HARDWARE,
        ),
    ] = _T.amp,
    channels_last: Annotated[
        bool, typer.Option(help="Channels-last memory format.", rich_help_panel=_HARDWARE)
    ] = _T.channels_last,
    out: Annotated[Path, typer.Option(help="Folder of runs.", rich_help_panel=_RUN)] = Path(_T.out),
    name: Annotated[
        str,
        typer.Option(
            help="Run name; default: preset, score and seed, as l100-entropy-s0 (with "
            "--classifier-only: classifier-s0).",
            rich_help_panel=_RUN,
        ),
    ] = "",
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue the run from its last checkpoint, with the settings it started with "
            "(before its first checkpoint: start it afresh).",
            rich_help_panel=_RUN,
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Random seed.", rich_help_panel=_RUN)] = _T.seed,
) -> None:
    """Pre-train the classifier, then train a CASM into OUT/NAME (checkpoint, metrics.jsonl).

    Several processes: `torchrun --nproc-per-node N -m casm_deploy train ...` (DDP: gloo on
    CPU, NCCL on GPU); --batch-size is per process.
    """
    from casm_deploy.training import train as job

    def go() -> None:
        values = dict(
            data=str(data),
            out=str(out),
            name=name,
            arch=arch,
            width=width,
            image_size=image_size,
            weights=weights,
            resume=resume,
            seed=seed,
            workers=workers,
            device=device,
            channels_last=channels_last,
            amp=amp,
            loader=loader,
            resize=resize,
            fill=fill,
            skip_bad_images=skip_bad_images,
            pretrain_epochs=pretrain_epochs,
            pretrain_batch_size=pretrain_batch_size,
            classifier_only=classifier_only,
            pretrain_lr=pretrain_lr,
            reproduce=reproduce,
            score=score,
            lambda_r=_lambda_r(lambda_r),
            epochs=epochs,
            batch_size=batch_size,
            epoch_fraction=epoch_fraction,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            lr_decoder=lr_decoder,
            lr_decay_every=lr_decay_every,
            pool_size=pool_size,
            pool_device=pool_device,
            grad_clip=grad_clip,
            upsample=upsample,
            unshared=unshared,
            hp=hp,
            smf=smf,
        )
        # The options given on the command line override the recipe; the others take its values.
        # (By the source's name: Typer ships its own copy of click's ParameterSource.)
        given = {
            key: value
            for key, value in values.items()
            if getattr(ctx.get_parameter_source(key), "name", "DEFAULT") != "DEFAULT"
        }
        job.run(train_config(recipe, **given))

    _call(go)


def _models_and_data(paths: list[Path]) -> tuple[tuple[str, ...], str]:
    """Split `MODEL... [DATA]`: files are models, one folder is the data (default data/synth)."""
    folders = [p for p in paths if p.is_dir()]
    if len(folders) > 1:
        raise UserError(f"one data folder at most, got {', '.join(map(str, folders))}")
    models = tuple(str(p) for p in paths if not p.is_dir())
    return models, str(folders[0]) if folders else DEFAULT_DATA


def _split_commas(values: list[str]) -> tuple[str, ...]:
    return tuple(v.strip() for value in values for v in value.split(",") if v.strip())


@app.command(
    "eval",
    epilog="""
Examples:
  # one CASM on the validation images of data/synth
  casm-deploy eval runs/demo/checkpoint.pt
  # two models and the baselines, as make demo; the first one's scores to JSON
  casm-deploy eval runs/demo/checkpoint.pt runs/demo-f/checkpoint.pt \\
      --baseline center,full,gradcam --json runs/demo/eval.json
  # a model trained on data/classes5, on the 5 classes it never saw
  casm-deploy eval runs/l100-c5/checkpoint.pt data/synth --classes unseen
  # independent classifiers judge the masked images (c1 from train
  # --classifier-only --seed 1 --name c1, c2 likewise), and the leak control
  casm-deploy eval runs/demo/checkpoint.pt --leak-control \\
      --classifiers runs/c1/checkpoint.pt,runs/c2/checkpoint.pt
  # real ImageNet (DATA/val and DATA/annotations)
  casm-deploy eval runs/imagenet/checkpoint.pt /data/imagenet""",
)
@_reflow
def evaluate(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="MODEL... [DATA]: checkpoints, then optionally the data folder "
            f"(default {DEFAULT_DATA}).",
            show_default=False,
        ),
    ],
    annotations: Annotated[
        str, typer.Option(help="ILSVRC XML folder (default: DATA/annotations).")
    ] = "",
    split: Annotated[str, typer.Option(help="Which split of DATA to score.")] = _E.split,
    resize: Annotated[
        str, typer.Option(help="center-crop (shorter side, then crop) or stretch.")
    ] = _E.resize,
    baseline: Annotated[
        list[str],
        typer.Option(help="center, full and/or gradcam (repeat or comma-separate)."),
    ] = [],  # noqa: B006 (Typer reads the default, never mutates it)
    gradcam_stage: Annotated[
        int,
        typer.Option(
            help="Encoder stage Grad-CAM reads, 1-4 (4, the last, is 2x2 at 64 px; "
            "3 localises best on the demo, benchmarks/RESULTS.md)."
        ),
    ] = _E.gradcam_stage,
    classifiers: Annotated[
        str,
        typer.Option(
            help="Comma-separated checkpoints whose classifiers judge clean, masked-in, "
            "masked-out and inpainted images (train them with train --classifier-only)."
        ),
    ] = "",
    classes: Annotated[
        str,
        typer.Option(
            help="all, seen or unseen: score only the data's classes the first model was "
            "trained on (seen) or only the others (unseen), for the unseen-classes test."
        ),
    ] = _E.classes,
    leak_control: Annotated[
        bool,
        typer.Option(
            "--leak-control",
            help="Also train a classifier on each model's binarised masks alone (training "
            "split; no image) and report its validation accuracy against chance: above "
            "chance, the mask's outline gives the class away.",
        ),
    ] = _E.leak_control,
    batch: Annotated[int, typer.Option(help="Images per batch.")] = _E.batch_size,
    workers: Annotated[int, typer.Option(help="Data-loading processes.")] = _E.workers,
    limit: Annotated[
        int, typer.Option(help="Score the first N images only (0: all; not negative).")
    ] = 0,
    copies: Annotated[
        bool,
        typer.Option(
            "--copies",
            help="For data of synth --copies 2 (two boxes per image): also report "
            "copy_share_lighter (mean share of mask mass on the copy with less of it; 0.5: both "
            "equally) and copy_touch_both (share of binarised masks reaching into both boxes). "
            "Use with --resize stretch, which keeps both copies whole.",
        ),
    ] = _E.copies,
    json: Annotated[
        str,
        typer.Option(
            help="Write the first model's scores here (keys LE, OM, F1, F1a, mask_mean, "
            "mask_std, mask_entropy, mask_tv, n_images; with --copies also copy_share_lighter, "
            "copy_touch_both; when DATA has a parts/ folder (data synth --parts) also "
            "part_coverage, parts_all_touched, part_share_least, n_part_images; OM_note when "
            "some images are of classes the model does not know, which OM leaves out); other "
            "methods beside it."
        ),
    ] = "",
) -> None:
    """Score masks as the paper: LE, OM, F1 on ILSVRC boxes, with baselines and classifiers."""
    from casm_deploy.evaluation import benchmark as job

    def go() -> None:
        models, data = _models_and_data(paths)
        cfg = EvalConfig(
            models=models,
            data=data,
            annotations=annotations,
            split=split,
            resize=resize,
            baselines=_split_commas(baseline),
            gradcam_stage=gradcam_stage,
            classifiers=_split_commas([classifiers]),
            classes=classes,
            leak_control=leak_control,
            batch_size=batch,
            workers=workers,
            limit=limit,
            json=json,
            copies=copies,
        )
        job.run(cfg)

    _call(go)


@app.command(
    epilog="""
Example:
  # the Fig. 2 grid of two models: runs/demo/figures/grid.png and an HTML page
  casm-deploy visualize runs/demo/checkpoint.pt runs/demo-f/checkpoint.pt \\
      --out runs/demo/figures""",
)
@_reflow
def visualize(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="MODEL... [DATA]: checkpoints, then optionally the data folder (ImageNet layout, "
            "or any folder of images).",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path(_V.out),
    annotations: Annotated[
        str, typer.Option(help="ILSVRC XML folder (default: DATA/annotations).")
    ] = "",
    resize: Annotated[
        str,
        typer.Option(
            help="center-crop or stretch (annotated data only; a plain folder's images are "
            "used whole)."
        ),
    ] = _V.resize,
    num_images: Annotated[
        int,
        typer.Option(
            help=f"How many validation images, or images of a plain folder (1 to "
            f"{MAX_VISUALIZE_IMAGES})."
        ),
    ] = _V.num_images,
    seed: Annotated[int, typer.Option(help="Which images (a seeded choice).")] = _V.seed,
) -> None:
    """Draw the paper's Fig. 2 grid and an HTML gallery with predicted and true boxes.

    DATA may also be any folder of images (no ImageNet layout): then predicted boxes and
    labels only, with no ground truth and no IoU.
    """
    from casm_deploy.evaluation import visualize as job

    def go() -> None:
        models, data = _models_and_data(paths)
        written = job.run(
            VisualizeConfig(
                models=models,
                data=data,
                out=str(out),
                annotations=annotations,
                resize=resize,
                num_images=num_images,
                seed=seed,
            )
        )
        for kind, path in written.items():
            typer.echo(f"{kind}: {path}")

    _call(go)


EXIT_PARITY_FAILED = 3  # `export`: the files were written but one failed its parity check


_FORMATS, _PARITY, _TRITON = "Formats", "Parity check and calibration", "Triton"


@app.command(
    epilog="""
Examples:
  # TorchScript and ONNX in fp32, into export/default, where infer looks
  casm-deploy export runs/demo/checkpoint.pt --onnx --out export/default
  # an int8 ONNX file for ONNX Runtime on the CPU, and TorchScript
  casm-deploy export runs/demo/checkpoint.pt --out export/int8 \\
      --precision int8
  # fp16, meant for a GPU, traced and checked there
  casm-deploy export runs/demo/checkpoint.pt --out export/fp16 \\
      --precision fp16 --onnx --device cuda
  # a Triton model repository: export/triton/triton/casm_masker
  casm-deploy export runs/demo/checkpoint.pt --out export/triton --triton""",
)
@_reflow
def export(
    checkpoint: Annotated[
        Path, typer.Argument(help="A casm-deploy checkpoint (runs/NAME/checkpoint.pt).")
    ],
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path(_X.out),
    onnx: Annotated[
        bool,
        typer.Option(
            "--onnx",
            help="Also write masker.onnx (int8 and --triton imply it).",
            rich_help_panel=_FORMATS,
        ),
    ] = _X.onnx,
    torchscript: Annotated[
        bool, typer.Option(help="Write masker.ts (TorchScript).", rich_help_panel=_FORMATS)
    ] = _X.torchscript,
    pt2: Annotated[
        bool,
        typer.Option(
            "--pt2",
            help="Also write masker.pt2, a torch.export program.",
            rich_help_panel=_FORMATS,
        ),
    ] = _X.pt2,
    precision: Annotated[
        str,
        typer.Option(
            help=f"Number format of the files: {', '.join(PRECISIONS)}.",
            rich_help_panel=_FORMATS,
        ),
    ] = _X.precision,
    opset: Annotated[
        int,
        typer.Option(help="ONNX opset (18 or more; bf16 uses 22).", rich_help_panel=_FORMATS),
    ] = _X.opset,
    device: Annotated[
        str,
        typer.Option(help="cpu or cuda: where to trace and check.", rich_help_panel=_PARITY),
    ] = _X.device,
    data: Annotated[
        str,
        typer.Option(
            "--data",
            "--parity-data",
            help="ImageNet-layout folder for the parity check (val) and int8 calibration "
            "(train); default: the checkpoint's training data.",
            rich_help_panel=_PARITY,
        ),
    ] = _X.data,
    calibration_images: Annotated[
        int,
        typer.Option(
            help="int8: training images that calibrate the activations.",
            rich_help_panel=_PARITY,
        ),
    ] = _X.calibration_images,
    triton: Annotated[
        bool,
        typer.Option(
            "--triton",
            help="Also write a Triton model repository in OUT/triton.",
            rich_help_panel=_TRITON,
        ),
    ] = _X.triton,
    max_batch: Annotated[
        int, typer.Option(help="Triton's max_batch_size.", rich_help_panel=_TRITON)
    ] = _X.max_batch,
    triton_name: Annotated[
        str, typer.Option(help="Model name in the Triton repository.", rich_help_panel=_TRITON)
    ] = _X.triton_name,
) -> None:
    """Export a checkpoint to TorchScript, ONNX, torch.export; check parity with eager fp32.

    Writes OUT/masker.ts (and .onnx, .pt2) with their metadata and OUT/export.json. Exit status:
    0 when every file passes its parity check (a precision this machine cannot run is reported
    as skipped), 3 when one fails it or none could run here, 2 on bad input (a missing or
    unsafe checkpoint, no parity data).
    """
    from casm_deploy.deploy import export as job

    def go() -> dict[str, Any]:
        cfg = ExportConfig(
            checkpoint=str(checkpoint),
            out=str(out),
            torchscript=torchscript,
            onnx=onnx,
            pt2=pt2,
            triton=triton,
            precision=precision,
            opset=opset,
            max_batch=max_batch,
            device=device,
            data=data,
            calibration_images=calibration_images,
            triton_name=triton_name,
        )
        return job.run(cfg)

    report = _call(go)["parity"]
    if not report["passed"]:
        typer.secho(
            f"error: parity {report['verdict']} (details in {out / 'export.json'})",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(EXIT_PARITY_FAILED)


EXIT_SOME_FAILED = 3  # `infer`: every file is recorded, but some could not be processed
EXIT_OUT_UNWRITABLE = 4  # `infer`: OUT's disk stopped taking writes (full, quota, read-only)


@app.command(
    epilog="""
Examples:
  # masks and boxes of the validation images, as make demo, into out/
  casm-deploy infer data/synth/val --model export/default/masker.onnx \\
      --batch 256 --out out --overwrite
  # a folder of photos, with overlays and COCO-style detections; the same
  # command again resumes after a stop
  casm-deploy infer photos --out out/photos --overlay --coco photos.json
  # the same, doing again the files recorded as errors
  casm-deploy infer photos --out out/photos --overlay --retry-errors
  # on a GPU, with an fp16 export and JPEGs decoded there
  casm-deploy infer photos --model export/fp16/masker.onnx --device cuda""",
)
@_reflow
def infer(
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    model: Annotated[
        Path,
        typer.Option(
            help="masker.onnx or masker.ts (casm-deploy export) or a checkpoint. An ONNX file "
            "is data; a TorchScript file is a program: loading and running it runs the code it "
            "holds (it is inspected first, a safeguard, not a sandbox), so use ONNX for model "
            "files you did not make yourself."
        ),
    ] = Path(_I.model),
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path(_I.out),
    batch: Annotated[int, typer.Option(help="Images per model call.")] = _I.batch,
    backend: Annotated[
        str, typer.Option(help="auto, onnx, torchscript or eager (auto: from the file name).")
    ] = _I.backend,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (auto: CUDA if present).")] = (
        _I.device
    ),
    workers: Annotated[
        int,
        typer.Option(help="Decoding and writing threads (0: one per CPU this process may use)."),
    ] = _I.workers,
    decoder: Annotated[
        str,
        typer.Option(
            help="opencv, dali (JPEGs through NVIDIA DALI: nvJPEG on a GPU) or torchvision "
            "(JPEGs through torchvision: nvJPEG on a GPU); auto: on CUDA dali when installed, "
            "else torchvision; opencv on the CPU."
        ),
    ] = _I.decoder,
    masks: Annotated[
        str, typer.Option(help="png (8-bit), npy (float32) or none: OUT/masks/<path>.<ext>.")
    ] = _I.masks,
    mask_size: Annotated[
        str, typer.Option(help="original (each image's size) or model (the input size).")
    ] = _I.mask_size,
    overlay: Annotated[
        bool,
        typer.Option(
            "--overlay",
            help="Also OUT/overlays/<path>.jpg: the image dimmed by its mask, with the box, "
            "class name and score.",
        ),
    ] = _I.overlay,
    coco: Annotated[str, typer.Option(help="Also write COCO-style detections to this file.")] = (
        _I.coco
    ),
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Delete OUT's earlier results and start over.")
    ] = _I.overwrite,
    expect_sha256: Annotated[
        str,
        typer.Option(
            metavar="HEX",
            help="Pin the model file: refuse it unless its SHA-256 is HEX (compared before "
            "anything in it is parsed or loaded).",
        ),
    ] = _I.expect_sha256,
    retry_errors: Annotated[
        bool,
        typer.Option("--retry-errors", help="Do the files recorded as errors again."),
    ] = _I.retry_errors,
    max_megapixels: Annotated[
        float,
        typer.Option(
            help="Refuse larger images (width x height), before decoding them; also caps the "
            "file size. Bounds each decoding thread's memory."
        ),
    ] = _I.max_megapixels,
) -> None:
    """Masks, boxes and labels for every image file under FOLDER.

    Image files are .jpg .jpeg .png .bmp .webp .tif .tiff in any case; other files are not
    read; a FOLDER without any image file is bad usage (exit 2, before the model is loaded),
    while rerunning a finished run does nothing and exits 0. Writes OUT/masks/<path>.png,
    OUT/boxes.jsonl (one line per file: status ok or error with its reason; boxes as x0, y0,
    x1, y1 in original pixels) and OUT/summary.json.

    Run the same command again after an interruption to do only the files not yet recorded.

    Exit status: 0 every file ok; 3 some files could not be read or written (see boxes.jsonl);
    2 bad usage (missing folder or model, a folder without image files, OUT holding another
    run's results or in use by another run, a link where an output file should be); 4 OUT's
    disk stopped taking writes (full, over quota, read-only, I/O error): what is recorded
    stays valid, and the same command resumes once there is room.
    """
    from casm_deploy.deploy import infer as job
    from casm_deploy.deploy.outfolder import OutUnwritable

    def go() -> dict[str, Any]:
        cfg = InferConfig(
            dir=str(folder),
            model=str(model),
            out=str(out),
            batch=batch,
            backend=backend,
            device=device,
            workers=workers,
            decoder=decoder,
            masks=masks,
            mask_size=mask_size,
            overlay=overlay,
            coco=coco,
            overwrite=overwrite,
            expect_sha256=expect_sha256,
            retry_errors=retry_errors,
            max_megapixels=max_megapixels,
        )
        try:
            return job.run(cfg)
        except OutUnwritable as error:
            typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
            raise typer.Exit(EXIT_OUT_UNWRITABLE) from None

    summary = _call(go)
    if summary["error"]:
        raise typer.Exit(EXIT_SOME_FAILED)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
