"""The `casm-deploy` command line: it parses arguments into a config and calls the job's `run`.

The top of the flow. Each command's options are made from its config class (config.py) by
commands.command, which also turns the parsed values back into the config.

Heavy imports (torch, cv2) happen inside the commands, so `casm-deploy --help` is instant.
A user mistake (`UserError`) prints one line and exits with status 2, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from casm_deploy.commands import command
from casm_deploy.config import (
    EvalConfig,
    ExportConfig,
    InferConfig,
    MergeConfig,
    SynthConfig,
    TinyImagenetConfig,
    TrainConfig,
    VisualizeConfig,
)
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
    help="Data sets: generate the embedded ImageNet-layout benchmark, or convert Tiny ImageNet.",
    epilog="""
Examples:
  casm-deploy data synth
  casm-deploy data tiny-imagenet tiny-imagenet-200.zip""",
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


@command(
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


@command(
    data_app,
    TinyImagenetConfig,
    "tiny-imagenet",
    epilog="""
Examples:
  # all 200 classes of the official archive into data/tiny-imagenet
  casm-deploy data tiny-imagenet tiny-imagenet-200.zip
  # the first 10 classes (sorted wnids), from the extracted folder
  casm-deploy data tiny-imagenet tiny-imagenet-200 data/tiny10 --classes 10
  # the classes listed in a file, one wnid a line
  casm-deploy data tiny-imagenet tiny-imagenet-200.zip data/mine \\
      --wnids wnids.txt""",
)
def tiny_imagenet(cfg: TinyImagenetConfig) -> None:
    """Convert Tiny ImageNet (tiny-imagenet-200.zip, or the folder it was extracted to) into
    the ImageNet layout: train/ and val/ by class, classes.txt, and ILSVRC XML boxes of every
    image in annotations/.

    The archive is read member by member, never extracted: members that cannot be trusted
    (absolute or `..` names, links, archive bombs, files that are not JPEGs) are skipped with
    a warning. Tiny ImageNet's boxes have inclusive right and bottom edges; they are written
    exclusive, as every box of this package. Running the same command again does nothing.
    Then train, eval and infer read OUT as any ImageNet-layout folder.
    """
    from casm_deploy.data.tinyimagenet import convert

    convert(cfg)


@command(
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


@command(
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
  # the CAM family beside the model; faithfulness judged by another classifier
  casm-deploy eval runs/demo/checkpoint.pt --gradcam-stage 3 \\
      --baseline gradcam,gradcam++,scorecam --faithfulness \\
      --judge runs/c1/checkpoint.pt --limit 200
  # real ImageNet (DATA/val and DATA/annotations)
  casm-deploy eval runs/imagenet/checkpoint.pt /data/imagenet""",
)
def evaluate(cfg: EvalConfig) -> None:
    """Score masks as the paper: LE, OM, F1 on ILSVRC boxes, with baselines and classifiers;
    also MaxBoxAccV2, where the data has object masks PxAP, and with --faithfulness deletion,
    insertion and ROAD."""
    from casm_deploy.evaluation import benchmark as job

    job.run(cfg)


@command(
    app,
    VisualizeConfig,
    epilog="""
Examples:
  # two models: runs/demo/figures/grid.png (Fig. 2), masks.png, index.html
  casm-deploy visualize runs/demo/checkpoint.pt runs/demo-f/checkpoint.pt \\
      --out runs/demo/figures
  # and Grad-CAM of the first model's classifier (stage 3) as a third method
  casm-deploy visualize runs/demo/checkpoint.pt runs/demo-f/checkpoint.pt \\
      --gradcam-stage 3 --out runs/demo/figures""",
)
def visualize(cfg: VisualizeConfig) -> None:
    """Draw the paper's Fig. 2 grid, the masks with their boxes and an HTML gallery.

    DATA may also be any folder of images (no ImageNet layout): then predicted boxes and
    labels only, with no ground truth and no IoU.
    """
    from casm_deploy.evaluation import visualize as job

    for kind, path in job.run(cfg).items():
        typer.echo(f"{kind}: {path}")


@command(
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
    from casm_deploy.deploy.export import job

    report = job.run(cfg)["parity"]
    if not report["passed"]:
        typer.secho(
            f"error: parity {report['verdict']} (details in {Path(cfg.out) / 'export.json'})",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(EXIT_PARITY_FAILED)


@command(
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
  casm-deploy infer photos --model export/fp16/masker.onnx --device cuda
  # share 3 of 8 of the files (a SLURM array task, a Kubernetes indexed job)
  casm-deploy infer photos --out out/photos --shard 3/8""",
)
def infer(cfg: InferConfig) -> None:
    """Masks, boxes and labels for every image file under FOLDER.

    Image files are .jpg .jpeg .png .bmp .webp .tif .tiff in any case; other files are not
    read; a FOLDER without any image file is bad usage (exit 2, before the model is loaded),
    while rerunning a finished run does nothing and exits 0. Writes OUT/masks/<path>.png,
    OUT/boxes.jsonl (one line per file: status ok or error with its reason; boxes as x0, y0,
    x1, y1 in original pixels) and OUT/summary.json.

    Run the same command again after an interruption to do only the files not yet recorded.

    Several processes: under torchrun (`torchrun --nproc-per-node 8 -m casm_deploy infer ...`)
    each rank does its share of the files on its own GPU, cuda:LOCAL_RANK; `--shard K/N` does
    share K of N in a process started any other way. Each writes OUT/parts/; the last to
    finish writes one boxes.jsonl and summary.json from them (README: Inference on many GPUs).

    Exit status: 0 every file ok; 3 some files could not be read or written (see boxes.jsonl);
    2 bad usage (missing folder or model, a folder without image files, OUT holding another
    run's results or in use by another run, a link where an output file should be); 4 OUT's
    disk stopped taking writes (full, over quota, read-only, I/O error): what is recorded
    stays valid, and the same command resumes once there is room.
    """
    from casm_deploy.deploy.infer import job
    from casm_deploy.deploy.infer.outfolder import OutUnwritable

    try:
        summary = job.run(cfg)
    except OutUnwritable as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(EXIT_OUT_UNWRITABLE) from None
    if summary["error"]:
        raise typer.Exit(EXIT_SOME_FAILED)


@command(
    app,
    MergeConfig,
    epilog="""
Example:
  # after the shards of `casm-deploy infer photos --out out/photos --shard K/8`
  casm-deploy merge out/photos""",
)
def merge(cfg: MergeConfig) -> None:
    """Join the parts of a sharded infer run into OUT/boxes.jsonl and OUT/summary.json.

    The last shard to finish does this itself; run it when that shard could not (it was
    killed after its share) or to check a job. It refuses while a shard still runs on OUT, and
    merges only when every image file of the run's folder is recorded: otherwise it names the
    shards whose files are missing (exit 1) and changes nothing.
    """
    from casm_deploy.deploy.infer import job

    try:
        summary = job.merge_out(cfg)
    except job.MissingShards as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    if summary.get("error"):
        raise typer.Exit(EXIT_SOME_FAILED)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
