"""The `casm-deploy` command line: it parses arguments into a config and calls the job's `run`.

The top of the flow. Each command's options are made from its config class (config.py): a
field's default, help, --help group and conversion are declared there once, and `_command`
turns them into Typer parameters and the parsed values back into the config.

Heavy imports (torch, cv2) happen inside the commands, so `casm-deploy --help` is instant.
A user mistake (`UserError`) prints one line and exits with status 2, never a traceback.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from casm_deploy.config import (
    EvalConfig,
    ExportConfig,
    InferConfig,
    SynthConfig,
    TrainConfig,
    VisualizeConfig,
)
from casm_deploy.errors import UserError
from casm_deploy.options import choices_of, field_types, make_config
from casm_deploy.version import __version__

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

EXIT_PARITY_FAILED = 3  # `export`: the files were written but one failed its parity check
EXIT_SOME_FAILED = 3  # `infer`: every file is recorded, but some could not be processed
EXIT_OUT_UNWRITABLE = 4  # `infer`: OUT's disk stopped taking writes (full, quota, read-only)


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


def _call(job: Callable[[], Any]) -> Any:
    try:
        return job()
    except UserError as error:  # config.py's ConfigError included: a value a config refused
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    except ValueError as error:  # a value a job's own code refused
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        raise typer.Exit(130) from None


def _options(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` that are command-line parameters (those with a help text), in the
    order --help shows them: by the class's PANELS (ungrouped first), a recipe first in its
    panel (it applies before the others), then as declared."""
    rank = {panel: i for i, panel in enumerate(getattr(cls, "PANELS", ()))}
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("help")]
    return sorted(
        fields, key=lambda f: (rank.get(f.metadata["panel"], -1), not f.metadata["recipes"])
    )


def _cli_type(f: dataclasses.Field, kind: Any) -> Any:
    """What the command line parses for field `f` of type `kind`, before `_value` converts it."""
    m = f.metadata
    many = kind == tuple[str, ...]
    if m["path"]:
        return list[Path] if many else Path
    if many:  # comma-separated, and repeatable where the field says so
        return list[str] if m["repeat"] else str
    if m["parse"] is not None:
        return str
    choices = choices_of(kind)
    return type(choices[0]) if choices else kind  # a Literal's values are checked by the config


def _cli_default(f: dataclasses.Field, cli_type: Any) -> Any:
    if f.metadata["required"]:
        return inspect.Parameter.empty
    if cli_type is Path:
        return Path(f.default)
    if cli_type == list[str]:
        return list(f.default)
    if cli_type is str and isinstance(f.default, tuple):
        return ",".join(f.default)
    return str(f.default) if cli_type is str else f.default


def _parameter(f: dataclasses.Field, kind: Any) -> inspect.Parameter:
    """The Typer parameter of field `f`, from its metadata (options.opt)."""
    m = f.metadata
    cli_type = _cli_type(f, kind)
    shared = dict(help=m["help"], show_default=m["show_default"], metavar=m["metavar"])
    if m["argument"]:
        info = typer.Argument(hidden=m["hidden"], **shared)
    else:
        flags = m["flag"]
        if cli_type is bool and not m["negatable"] and not flags:
            flags = ("--" + f.name.replace("_", "-"),)  # named once: no --no- form
        info = typer.Option(*flags, hidden=m["hidden"], rich_help_panel=m["panel"], **shared)
    return inspect.Parameter(
        m["name"] or f.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=_cli_default(f, cli_type),
        annotation=Annotated[cli_type, info],
    )


def _value(f: dataclasses.Field, kind: Any, given: Any) -> dict[str, Any]:
    """The config values of what was given for field `f` of type `kind`: its `parse` (a value,
    or a dict of several fields' values), a path as text, a comma list as a tuple."""
    parse = f.metadata["parse"]
    if parse is not None:
        value = parse(given)
        return value if isinstance(value, dict) else {f.name: value}
    if kind == tuple[str, ...]:
        items = [given] if isinstance(given, str) else given
        return {f.name: tuple(v.strip() for item in items for v in item.split(",") if v.strip())}
    return {f.name: str(given) if isinstance(given, Path) else given}


def _config(cls: type, ctx: typer.Context, values: dict[str, Any]) -> Any:
    """The config of the options given on the command line; the others keep their defaults (or
    their recipe's values: make_config)."""
    kinds, given = field_types(cls), {}
    for f in _options(cls):
        name = f.metadata["name"] or f.name
        # By the source's name: Typer ships its own copy of click's ParameterSource.
        if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT":
            given.update(_value(f, kinds[f.name], values[name]))
    return make_config(cls, **given)


def _command(group: typer.Typer, cls: type, name: str = "", epilog: str = "") -> Callable:
    """Register `body(cfg)` as a command of `group` whose parameters are the fields of `cls`;
    it runs, under `_call`, on the config built from the parsed values."""

    def register(body: Callable[[Any], None]) -> Callable[..., None]:
        def command(ctx: typer.Context, **values: Any) -> None:
            _call(lambda: body(_config(cls, ctx, values)))

        kinds = field_types(cls)
        context = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        params = [context, *(_parameter(f, kinds[f.name]) for f in _options(cls))]
        command.__signature__ = inspect.Signature(params, return_annotation=None)
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__name__ = body.__name__
        # Rich keeps the newlines of a help text: join the lines of each docstring paragraph,
        # wrapped for the source, so that they do not break mid-sentence in the terminal.
        paragraphs = inspect.cleandoc(body.__doc__ or "").split("\n\n")
        command.__doc__ = "\n\n".join(" ".join(p.split()) for p in paragraphs)
        group.command(name or None, epilog=epilog)(command)
        return command

    return register


@_command(
    data_app,
    SynthConfig,
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
def synth(cfg: SynthConfig) -> None:
    """Generate the embedded benchmark: ImageNet layout, ILSVRC XML boxes and object masks,
    shapes on clutter."""
    from casm_deploy.data.synth import generate

    generate(cfg)


@_command(
    app,
    TrainConfig,
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
def train(cfg: TrainConfig) -> None:
    """Pre-train the classifier, then train a CASM into OUT/NAME (checkpoint, metrics.jsonl).

    Several processes: `torchrun --nproc-per-node N -m casm_deploy train ...` (DDP: gloo on
    CPU, NCCL on GPU); --batch-size is per process.
    """
    from casm_deploy.training import train as job

    job.run(cfg)


@_command(
    app,
    EvalConfig,
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
def evaluate(cfg: EvalConfig) -> None:
    """Score masks as the paper: LE, OM, F1 on ILSVRC boxes, with baselines and classifiers;
    also MaxBoxAccV2 and, where the data has object masks, PxAP."""
    from casm_deploy.evaluation import benchmark as job

    job.run(cfg)


@_command(
    app,
    VisualizeConfig,
    epilog="""
Example:
  # the Fig. 2 grid of two models: runs/demo/figures/grid.png and an HTML page
  casm-deploy visualize runs/demo/checkpoint.pt runs/demo-f/checkpoint.pt \\
      --out runs/demo/figures""",
)
def visualize(cfg: VisualizeConfig) -> None:
    """Draw the paper's Fig. 2 grid and an HTML gallery with predicted and true boxes.

    DATA may also be any folder of images (no ImageNet layout): then predicted boxes and
    labels only, with no ground truth and no IoU.
    """
    from casm_deploy.evaluation import visualize as job

    for kind, path in job.run(cfg).items():
        typer.echo(f"{kind}: {path}")


@_command(
    app,
    ExportConfig,
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
def export(cfg: ExportConfig) -> None:
    """Export a checkpoint to TorchScript, ONNX, torch.export; check parity with eager fp32.

    Writes OUT/masker.ts (and .onnx, .pt2) with their metadata and OUT/export.json. Exit status:
    0 when every file passes its parity check (a precision this machine cannot run is reported
    as skipped), 3 when one fails it or none could run here, 2 on bad input (a missing or
    unsafe checkpoint, no parity data).
    """
    from casm_deploy.deploy import export as job

    report = job.run(cfg)["parity"]
    if not report["passed"]:
        typer.secho(
            f"error: parity {report['verdict']} (details in {Path(cfg.out) / 'export.json'})",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(EXIT_PARITY_FAILED)


@_command(
    app,
    InferConfig,
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
def infer(cfg: InferConfig) -> None:
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

    try:
        summary = job.run(cfg)
    except OutUnwritable as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(EXIT_OUT_UNWRITABLE) from None
    if summary["error"]:
        raise typer.Exit(EXIT_SOME_FAILED)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
