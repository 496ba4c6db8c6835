"""The `casm-deploy` command line: it parses arguments into a config and calls the job's `run`.

Heavy imports (torch, cv2) happen inside the commands, so `casm-deploy --help` is instant.
A user mistake (`UserError`) prints one line and exits with status 2, never a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from casm_deploy.config import DEFAULT_DATA, PRESETS, SynthConfig, TrainConfig
from casm_deploy.errors import UserError

app = typer.Typer(
    name="casm-deploy",
    help="Train a classifier-agnostic saliency mapping (CASM) and deploy it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Data sets: generate the embedded ImageNet-layout benchmark.")
app.add_typer(data_app, name="data")

_S = SynthConfig()
_T = TrainConfig()


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


@data_app.command("synth")
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder.")] = Path(_S.out),
    num_classes: Annotated[
        int, typer.Option("--num-classes", help="Use the first N shape classes.")
    ] = _S.num_classes,
    classes: Annotated[
        str, typer.Option(help="Comma-separated subset of classes (names or wnids).")
    ] = "",
    train_per_class: Annotated[int, typer.Option(help="Training images per class.")] = (
        _S.train_per_class
    ),
    val_per_class: Annotated[int, typer.Option(help="Validation images per class.")] = (
        _S.val_per_class
    ),
    min_side: Annotated[int, typer.Option(help="Smallest shorter image side (px).")] = (
        _S.min_side
    ),
    max_side: Annotated[int, typer.Option(help="Largest shorter image side (px).")] = (_S.max_side),
    min_area: Annotated[float, typer.Option(help="Smallest object area (image fraction).")] = (
        _S.min_area
    ),
    max_area: Annotated[float, typer.Option(help="Largest object area (image fraction).")] = (
        _S.max_area
    ),
    copies: Annotated[
        int, typer.Option(help="2: each image is two identical copies side by side (paper 2.1).")
    ] = _S.copies,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same files.")] = (
        _S.seed
    ),
    workers: Annotated[int, typer.Option(help="Generator processes.")] = _S.workers,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing data set.")] = False,
) -> None:
    """Generate the embedded benchmark: ImageNet layout, ILSVRC XML boxes, shapes on clutter."""
    from casm_deploy.synth import generate

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
        seed=seed,
        workers=workers,
        overwrite=overwrite,
    )
    _call(lambda: generate(cfg))


@app.command()
def train(
    data: Annotated[
        Path, typer.Argument(help="ImageNet-layout folder; the default is generated if missing.")
    ] = Path(DEFAULT_DATA),
    reproduce: Annotated[
        str, typer.Option(help=f"Thinning strategy of the paper: {'|'.join(PRESETS)}.")
    ] = _T.reproduce,
    score: Annotated[str, typer.Option(help="Mapping score: entropy|classification.")] = _T.score,
    lambda_r: Annotated[
        str,
        typer.Option(
            help="Area weight: a number, or 'paper' for the reference's per-preset ImageNet value."
        ),
    ] = str(_T.lambda_r),
    arch: Annotated[str, typer.Option(help="resnet18|resnet34|resnet50.")] = _T.arch,
    width: Annotated[int, typer.Option(help="Stem channels (torchvision: 64).")] = _T.width,
    image_size: Annotated[int, typer.Option(help="Training image size (px).")] = _T.image_size,
    batch_size: Annotated[int, typer.Option(help="CASM batch size.")] = _T.batch_size,
    epochs: Annotated[int, typer.Option(help="CASM epochs.")] = _T.epochs,
    epoch_fraction: Annotated[
        float, typer.Option(help="Share of the training set seen per CASM epoch.")
    ] = _T.epoch_fraction,
    pretrain_epochs: Annotated[
        int, typer.Option(help="Classifier pre-training epochs on clean images (0: none).")
    ] = _T.pretrain_epochs,
    pretrain_lr: Annotated[float, typer.Option(help="Pre-training Adam peak LR.")] = (
        _T.pretrain_lr
    ),
    lr: Annotated[float, typer.Option(help="Classifier SGD LR in the CASM phase.")] = _T.lr,
    momentum: Annotated[float, typer.Option(help="Classifier SGD momentum.")] = _T.momentum,
    lr_decoder: Annotated[float, typer.Option(help="Decoder Adam LR.")] = _T.lr_decoder,
    lr_decay_every: Annotated[int, typer.Option(help="Epochs between x0.1 LR decays.")] = (
        _T.lr_decay_every
    ),
    weight_decay: Annotated[float, typer.Option(help="Weight decay of both optimisers.")] = (
        _T.weight_decay
    ),
    grad_clip: Annotated[float, typer.Option(help="Decoder gradient-norm clip.")] = _T.grad_clip,
    pool_size: Annotated[int, typer.Option(help="Thinning pool capacity.")] = _T.pool_size,
    hp: Annotated[float | None, typer.Option(help="Override the preset's pool probability.")] = (
        None
    ),
    smf: Annotated[int | None, typer.Option(help="Override the preset's snapshot period.")] = (
        None
    ),
    upsample: Annotated[str, typer.Option(help="Final mask upsampling: nearest|bilinear.")] = (
        _T.upsample
    ),
    weights: Annotated[
        str,
        typer.Option(
            help="Start the classifier from a local torchvision state dict, a casm-deploy "
            "checkpoint, or a torchvision weights name already in torch's cache."
        ),
    ] = "",
    seed: Annotated[int, typer.Option(help="Random seed.")] = _T.seed,
    workers: Annotated[int, typer.Option(help="Data-loading processes.")] = _T.workers,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda (auto: CUDA when available).")] = (
        _T.device
    ),
    channels_last: Annotated[bool, typer.Option(help="Channels-last memory format.")] = (
        _T.channels_last
    ),
    out: Annotated[Path, typer.Option(help="Folder of runs.")] = Path(_T.out),
    name: Annotated[str, typer.Option(help="Run name (default: <preset>-<score>-s<seed>).")] = "",
    resume: Annotated[bool, typer.Option(help="Continue the run from its last checkpoint.")] = (
        False
    ),
) -> None:
    """Pre-train the classifier, then train a CASM into OUT/NAME (checkpoint, metrics.jsonl)."""
    from casm_deploy import train as job

    def go() -> None:
        cfg = TrainConfig(
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
            pretrain_epochs=pretrain_epochs,
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
            grad_clip=grad_clip,
            upsample=upsample,
            hp=hp,
            smf=smf,
        )
        job.run(cfg)

    _call(go)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
