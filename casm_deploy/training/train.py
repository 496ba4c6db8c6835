"""Training: classifier pre-training on clean images, then CASM (Algorithm 1 of the paper).

`run(cfg)` is the entry point (cli.py's `train`): it claims the run folder (`rundir`), joins
the torchrun job if any (`distributed`), builds the models, the loaders (`loaders`) and the
`state.TrainState`, or resumes it from the checkpoint, then runs each phase's epochs
(`engine`) and saves the state at every epoch end (`checkpoint.save_training`). One CASM step
(`casm.CASM.step`): a classifier step on clean images, the thinning pool (`pool`), the mask
from detached features, a masked-out pass through the current classifier or a snapshot from
the pool, a classifier step on the masked-out loss (Eq. 8), and a decoder step on the entropy
(or classification) score plus the area term on non-trivially confused images. Optional mixed
precision (`--amp`, `amp`) and multi-process data-parallel training under torchrun.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from casm_deploy.checkpoint import (
    RUN_CHECKPOINT,
    load_training,
    model_spec,
    save_training,
)
from casm_deploy.common.paths import check_folder
from casm_deploy.common.ui import console, progress
from casm_deploy.config import DEFAULT_DATA, SynthConfig, TrainConfig, config_to_dict
from casm_deploy.data.imagenet import read_classes
from casm_deploy.data.synth import generate
from casm_deploy.evaluation.localisation import center_baseline
from casm_deploy.models.backbones import WEIGHTS_WANTED, load_encoder_weights, weights_file
from casm_deploy.models.mapping import SaliencyModel, build_masker
from casm_deploy.torchfile import load_file
from casm_deploy.training.amp import bf16_cpu_warning, cpu_flags
from casm_deploy.training.casm import CASM
from casm_deploy.training.distributed import (
    Distributed,
    average_buffers,
    barrier,
    broadcast_module,
    distributed_from_env,
    in_process_group,
    init_distributed,
    leave_process_group,
)
from casm_deploy.training.engine import (
    casm_one_epoch,
    epoch_line,
    evaluate,
    pretrain_one_epoch,
    print_summary,
    skipped_files,
)
from casm_deploy.training.loaders import Loaders, build_loaders
from casm_deploy.training.rundir import (
    LOG,
    append_log,
    claim_run_dir,
    remove_temporaries,
    resumed_config,
    start_log,
    trim_log,
)
from casm_deploy.training.state import TrainState, build_state


def run(cfg: TrainConfig) -> Path:
    """Train a CASM into `cfg.out/<run name>/` and return that folder.

    Writes `config.json`, `metrics.jsonl` (one line per epoch of either phase) and
    `checkpoint.pt` (atomically, at every epoch end), plus `pool-<step>.pt`, the thinning
    pool that the checkpoint names, when the pool is used. The folder is locked while the run
    goes on (`.lock`); the temporaries of writes that a kill interrupted are removed at start.
    `cfg.resume` before the first checkpoint starts the run afresh.

    Under torchrun (`torchrun --nproc-per-node N -m casm_deploy train ...`) every process trains
    on its own shard of each epoch with the same weights (gradients averaged at every step);
    rank 0 alone validates, writes the files and shows progress while the others wait.
    """
    run_dir = Path(cfg.out) / cfg.run_name
    check_folder(Path(cfg.out), "--out")
    check_folder(run_dir, "run folder")
    main = distributed_from_env().main
    with claim_run_dir(run_dir, main) as locked:
        cfg = resumed_config(cfg, run_dir, main)
        if main:
            remove_temporaries(run_dir, locked=locked)

        # Every rank has made the checks above before any rank can pass this line (torchrun's
        # rendezvous), so no rank sees the files that rank 0 writes next.
        joined = in_process_group()
        job, device = init_distributed(cfg.device)
        try:
            if job.main:
                generate_missing_default_data(cfg)
            barrier()  # the others wait for the data rank 0 may be generating
            return _train(cfg, job, device)
        finally:
            leave_process_group(joined)


def generate_missing_default_data(cfg: TrainConfig) -> None:
    """Generate the embedded data set when training on its default path and it is missing."""
    if Path(cfg.data) == Path(DEFAULT_DATA) and not (Path(cfg.data) / "synth.json").is_file():
        console.print(f"[bold]{cfg.data}[/] is missing: generating the embedded data set")
        generate(SynthConfig(out=cfg.data))


@dataclass
class Setup:
    """What stays the same for the whole run, beside its `TrainState`."""

    cfg: TrainConfig
    job: Distributed
    run_dir: Path
    loaders: Loaders
    model: dict  # the checkpoint's model description (`checkpoint.model_spec`)


def _train(cfg: TrainConfig, job: Distributed, device: torch.device) -> Path:
    """Build the models, the loaders and the state (or resume it), then run the phases."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)  # the pool's RNG: the same draws on every rank
    run_dir = Path(cfg.out) / cfg.run_name
    info = read_classes(cfg.data)
    masker = build_model(cfg, len(info.wnids), device)
    casm = CASM(masker, cfg, rng)  # early: it refuses an --amp this device cannot run
    prepare_device(cfg, device, job.main)
    loaders = build_loaders(cfg, info.wnids, device, job)
    state = build_state(masker, casm, cfg, cfg.pretrain_epochs * len(loaders.pretrain), rng)
    if cfg.resume:
        resume(state, run_dir, job.main)
    elif job.main:
        start_log(run_dir, config_to_dict(cfg), center_baseline(loaders.boxes, cfg.image_size))
    # what it learned from: `data synth`'s shapes (its synth.json) or a folder of images
    data_kind = "synthetic" if (Path(cfg.data) / "synth.json").is_file() else "images"
    spec = model_spec(
        cfg.arch,
        cfg.width,
        cfg.upsample,
        cfg.image_size,
        info.wnids,
        info.names,
        shared_encoder=cfg.shared_encoder,
        data_kind=data_kind,
        mapping=cfg.resolved_mapping,
    )
    setup = Setup(cfg, job, run_dir, loaders, spec)

    started = time.time()
    with progress(disable=not job.main) as bars:
        if state.phase == "pretrain":
            pretrain_phase(setup, state, bars)
        if state.phase == "casm":
            casm_phase(setup, state, bars)
    if job.main:
        console.print(f"done in {time.time() - started:.0f} s: {run_dir / RUN_CHECKPOINT}")
        print_summary(run_dir / LOG)
    return run_dir


def build_model(cfg: TrainConfig, num_classes: int, device: torch.device) -> SaliencyModel:
    """The model of `cfg` on `device` (from `--weights` when given), the same on every rank."""
    mapping_arch, mapping_width = cfg.resolved_mapping or (None, None)
    masker = build_masker(
        cfg.arch,
        num_classes,
        cfg.width,
        cfg.upsample,
        cfg.shared_encoder,
        mapping_arch,
        mapping_width,
    )
    if cfg.weights:
        path = weights_file(cfg.arch, cfg.weights)  # the file given, or torch's cached one
        load_encoder_weights(masker.encoder, load_file(path, WEIGHTS_WANTED), path)
    masker = masker.to(device)
    if cfg.channels_last:
        masker = masker.to(memory_format=torch.channels_last)
    broadcast_module(masker)  # the same seed gives the same weights; this makes sure of it
    return masker


def prepare_device(cfg: TrainConfig, device: torch.device, main: bool) -> None:
    """Warn of an emulated --amp bf16; on CUDA, let cuDNN pick its algorithms."""
    warning = bf16_cpu_warning(cfg.amp, device.type, cpu_flags())
    if warning and main:
        console.print(warning, soft_wrap=True)
    if device.type == "cuda":
        # Every training batch has the same shape: let cuDNN time its algorithms once.
        torch.backends.cudnn.benchmark = True


def resume(state: TrainState, run_dir: Path, main: bool) -> None:
    """Restore the state the checkpoint saved (every rank loads the same checkpoint)."""
    checkpoint = load_training(run_dir)
    state.restore(checkpoint)
    if main:
        trim_log(run_dir, checkpoint.metrics)
        console.print(f"resuming [bold]{run_dir}[/] at {state.phase} epoch {state.epoch + 1}")


def pretrain_phase(setup: Setup, state: TrainState, bars) -> None:
    """The pre-training epochs left: the classifier alone, on clean images."""
    cfg, loader = setup.cfg, setup.loaders.pretrain
    for e in range(state.epoch, cfg.pretrain_epochs):
        loader.set_epoch(e)
        t0 = time.time()
        title = f"pretrain {e + 1}/{cfg.pretrain_epochs}"
        train_metrics = pretrain_one_epoch(
            state.masker,
            loader,
            state.pretrain_optimizer,
            state.pretrain_schedule,
            state.casm,
            bars,
            title,
        )
        train_metrics |= skipped_files(loader, cfg.skip_bad_images)
        then = "casm" if cfg.casm_epochs else "done"
        where = ("pretrain", e + 1, cfg.pretrain_epochs, then)
        end_epoch(setup, state, where, title, t0, train_metrics)


def casm_phase(setup: Setup, state: TrainState, bars) -> None:
    """The CASM epochs left (Algorithm 1)."""
    cfg, loader, masker = setup.cfg, setup.loaders.casm, state.masker
    if state.epoch == 0 and cfg.unshared and not cfg.own_mapping:
        # Unshared: the mapping's encoder starts as the classifier the phase starts from (one
        # of its own arch or width, --mapping-arch, starts from its fresh weights).
        masker.mapping_encoder.load_state_dict(masker.encoder.state_dict())
    for e in range(state.epoch, cfg.casm_epochs):
        state.casm.set_epoch_lr(e)
        loader.set_epoch(1000 + e)  # other crops than the pre-training epochs
        t0 = time.time()
        title = f"CASM {cfg.reproduce} {e + 1}/{cfg.casm_epochs}"
        train_metrics = casm_one_epoch(state.casm, loader, bars, title)
        train_metrics |= skipped_files(loader, cfg.skip_bad_images)
        where = ("casm", e + 1, cfg.casm_epochs, "done")
        end_epoch(setup, state, where, title, t0, train_metrics)


def end_epoch(
    setup: Setup,
    state: TrainState,
    where: tuple[str, int, int, str],
    title: str,
    started_at: float,
    train_metrics: dict,
) -> None:
    """Validate, checkpoint, log and print (under `title`) the epoch that ended.

    `where`: (phase, epochs done, the phase's epochs, the phase that follows it); the state
    moves on to the next epoch, or to the next phase after the last, and the checkpoint says
    so. Rank 0 alone validates and writes, with its own training metrics (its shard); the
    others wait.
    """
    phase, done, total, then = where
    average_buffers(state.masker)  # the BatchNorm statistics of all the ranks' shards
    state.phase, state.epoch = (phase, done) if done < total else (then, 0)
    val = None
    if setup.job.main:
        val = evaluate(state.masker, setup.loaders.val, setup.loaders.boxes, setup.cfg.fill)
        record = {"phase": phase, "epoch": done, "seconds": time.time() - started_at}
        record |= train_metrics | val
        save_training(
            setup.run_dir, state.checkpoint(setup.model, config_to_dict(setup.cfg), record)
        )
        append_log(setup.run_dir, record)
    barrier()
    if val is not None:
        console.print(epoch_line(phase, title, train_metrics, val))
