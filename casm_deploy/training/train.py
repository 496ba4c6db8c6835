"""`casm-deploy train`: classifier pre-training on clean images, then CASM (Algorithm 1).

A run, top to bottom as this file reads: `run` claims the run folder OUT/NAME (its lock,
--resume, the temporaries a kill left), joins the torchrun job if any, builds the model, the
loaders and the `TrainState` (or restores it from the checkpoint), then runs each phase's
epochs: `pretrain_one_epoch` (the classifier alone, Adam with a one-cycle schedule) and
`casm_one_epoch` (`casm.CASM.step`: the classifier's steps, the thinning pool, the mask, the
masked-out pass and the mapping's step). Every epoch ends with `evaluate` on the validation set,
a checkpoint (`checkpoint.save_training`, all of the state) and a line of `metrics.jsonl`.
Under torchrun every rank trains on its own shard of each epoch with the same weights
(gradients averaged at every step); rank 0 alone validates, writes and prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from casm_deploy.checkpoint import (
    RUN_CHECKPOINT,
    TrainingCheckpoint,
    load_training,
    save_training,
)
from casm_deploy.common.cpus import usable_cpus
from casm_deploy.common.files import make_folders, write_atomic
from casm_deploy.common.paths import check_folder
from casm_deploy.common.ui import console, progress
from casm_deploy.config import (
    DEFAULT_DATA,
    SynthConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
)
from casm_deploy.data.imagenet import own_boxes, read_classes
from casm_deploy.data.loader import build_loader
from casm_deploy.data.synth import generate
from casm_deploy.errors import UserError
from casm_deploy.evaluation.localisation import center_baseline, score_masks
from casm_deploy.evaluation.metrics import LocalizationMeter, MaskStats, mask_stat_sums
from casm_deploy.models.backbones import WEIGHTS_WANTED, load_encoder_weights, weights_file
from casm_deploy.models.mapping import SaliencyModel
from casm_deploy.models.spec import ModelSpec
from casm_deploy.torchfile import load_file
from casm_deploy.training import distributed as dist
from casm_deploy.training.amp import autocast, bf16_cpu_warning, cpu_flags
from casm_deploy.training.casm import CASM, StepSettings, masked_out

LOG = "metrics.jsonl"  # one line per finished epoch of either phase, after the baseline's
VAL_BATCH = 128
# The progress bar's figures are read from the device every this many steps (a host sync):
# every step would make the GPU wait for the host each time.
PROGRESS_EVERY = 20
# What a kill during a write leaves in a run folder: the temporaries of `files.atomic_file`
# (`.<file name>.partial`, full-size) of the checkpoint, the pool files and `_trim_log`'s log,
# and those of the writes of earlier versions (`.<file name>.<random>.tmp`, `metrics.tmp`).
# Without the folder's lock, only those older than STALE_SECONDS are ours to remove: no save
# takes that long, and a younger one may be another run's write in progress.
TEMPORARIES = (
    ".checkpoint.pt.partial",
    ".pool-*.pt.partial",
    f".{LOG}.partial",
    ".checkpoint.pt.*.tmp",
    ".pool-*.pt.*.tmp",
    "metrics.tmp",
)
STALE_SECONDS = 3600


def run(cfg: TrainConfig) -> Path:
    """Train a CASM into `cfg.out/<run name>/` and return that folder.

    Writes `config.json`, `metrics.jsonl` (one line per epoch of either phase) and
    `checkpoint.pt` (atomically, at every epoch end), plus `pool-<step>.pt`, the thinning
    pool that the checkpoint names, when the pool is used. The folder is locked while the run
    goes on (`.lock`); the temporaries of writes that a kill interrupted are removed at start.
    `cfg.resume` before the first checkpoint starts the run afresh. Under torchrun
    (`torchrun --nproc-per-node N -m casm_deploy train ...`) every rank runs this.
    """
    run_dir = Path(cfg.out) / cfg.run_name
    check_folder(Path(cfg.out), "--out")
    check_folder(run_dir, "run folder")
    main = dist.distributed_from_env().main
    with _claim_run_dir(run_dir, main) as locked:
        cfg = _resumed_config(cfg, run_dir, main)
        if main:
            remove_temporaries(run_dir, locked=locked)

        # Every rank has made the checks above before any rank can pass this line (torchrun's
        # rendezvous), so no rank sees the files that rank 0 writes next.
        joined = dist.in_process_group()
        job, device = dist.init_distributed(cfg.device)
        try:
            default = Path(cfg.data) == Path(DEFAULT_DATA)
            if job.main and default and not (Path(cfg.data) / "synth.json").is_file():
                console.print(f"[bold]{cfg.data}[/] is missing: generating the embedded data set")
                generate(SynthConfig(out=cfg.data))
            dist.barrier()  # the others wait for the data rank 0 may be generating
            return _train(cfg, job, device)
        finally:
            dist.leave_process_group(joined)


@dataclass
class Loaders:
    """The loaders of a run, and each validation image's boxes of its own class (model frame)."""

    pretrain: Any
    casm: Any
    val: Any
    boxes: list[list[list[int]]]


@dataclass
class Setup:
    """What stays the same for the whole run, beside its `TrainState`."""

    cfg: TrainConfig
    job: dist.Distributed
    run_dir: Path
    loaders: Loaders
    model: ModelSpec  # what every checkpoint of the run records as its `model`


def _train(cfg: TrainConfig, job: dist.Distributed, device: torch.device) -> Path:
    """Build the models, the loaders and the state (or resume it), then run the phases."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)  # the pool's RNG: the same draws on every rank
    run_dir = Path(cfg.out) / cfg.run_name
    info = read_classes(cfg.data)
    # what it learned from: `data synth`'s shapes (its synth.json) or a folder of images
    data_kind = "synthetic" if (Path(cfg.data) / "synth.json").is_file() else "images"
    spec = ModelSpec.from_config(cfg, info.wnids, info.names, data_kind)
    masker = _build_model(cfg, spec, device)
    casm = CASM(masker, step_settings(cfg), rng)  # early: it refuses an --amp the device lacks
    warning = bf16_cpu_warning(cfg.amp, device.type, cpu_flags())  # an emulated --amp bf16
    if warning and job.main:
        console.print(warning, soft_wrap=True)
    # Every training batch has the same shape: let cuDNN time its algorithms once.
    torch.backends.cudnn.benchmark = device.type == "cuda"
    loaders = build_loaders(cfg, info.wnids, device, job)
    state = TrainState.start(masker, casm, cfg, cfg.pretrain_epochs * len(loaders.pretrain), rng)
    if cfg.resume:
        checkpoint = load_training(run_dir)  # every rank loads the same checkpoint
        state.restore(checkpoint)
        if job.main:
            _trim_log(run_dir, checkpoint.metrics)
            console.print(f"resuming [bold]{run_dir}[/] at {state.phase} epoch {state.epoch + 1}")
    elif job.main:
        _start_log(run_dir, config_to_dict(cfg), center_baseline(loaders.boxes, cfg.image_size))
    setup = Setup(cfg, job, run_dir, loaders, spec)

    started = time.time()
    with progress(disable=not job.main) as bars:
        if state.phase == "pretrain":
            _pretrain_phase(setup, state, bars)
        if state.phase == "casm":
            _casm_phase(setup, state, bars)
    if job.main:
        console.print(f"done in {time.time() - started:.0f} s: {run_dir / RUN_CHECKPOINT}")
        _print_summary(run_dir / LOG)
    return run_dir


# --- building: data, model, loaders, state ----------------------------------------------------


def step_settings(cfg: TrainConfig) -> StepSettings:
    """What the CASM step takes of the run's config: its optimisers' settings, the preset's
    values (resolved by the config), the fill, the score and the precision."""
    return StepSettings(
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        lr_decoder=cfg.lr_decoder,
        lr_decay_every=cfg.lr_decay_every,
        grad_clip=cfg.grad_clip,
        fixed_classifier=cfg.fixed_classifier,
        hp=cfg.pool_probability,
        smf=cfg.snapshot_every,
        pool_size=cfg.pool_size,
        pool_device=cfg.pool_device,
        fill=cfg.fill,
        score=cfg.score,
        lambda_r=cfg.area_weight,
        amp=cfg.amp,
    )


def _build_model(cfg: TrainConfig, spec: ModelSpec, device: torch.device) -> SaliencyModel:
    """The model of `spec` on `device` (from `--weights` when given), the same on every rank."""
    masker = spec.build()
    if cfg.weights:
        path = weights_file(cfg.arch, cfg.weights)  # the file given, or torch's cached one
        load_encoder_weights(masker.encoder, load_file(path, WEIGHTS_WANTED), path)
    masker = masker.to(device)
    if cfg.channels_last:
        masker = masker.to(memory_format=torch.channels_last)
    dist.broadcast_module(masker)  # the same seed gives the same weights; this makes sure of it
    return masker


def loader_workers(workers: int | None, device: torch.device, job: dist.Distributed) -> int:
    """`--workers`, or its default: 1 on the CPU, where the model needs the cores; on CUDA the
    cores this process may use, shared between the node's processes (one per GPU)."""
    if workers is not None:
        return workers
    if device.type != "cuda":
        return 1
    return max(1, usable_cpus() // job.local_world)


def build_loaders(
    cfg: TrainConfig, wnids: list[str], device: torch.device, job: dist.Distributed
) -> Loaders:
    """The loaders of `cfg.data` for this rank, batches going to `device`: one per phase
    (each rank its own shard of every epoch), the validation loader (rank 0's), and the
    validation images' boxes.

    Raises:
        UserError: a phase that has epochs would have no batch (naming the images found and
            the option to change), or as `loader.build_loader`.
    """
    root = Path(cfg.data)
    loader_args = dict(
        wnids=wnids,
        image_size=cfg.image_size,
        workers=loader_workers(cfg.workers, device, job),
        seed=cfg.seed,
        loader=cfg.loader,
        # validation: data.validation_policy of it, which the boxes below follow too
        policy=cfg.resize,
        crop_scale=cfg.crop_scale,
        device=str(device),  # where the batches go (DALI decodes there): this rank's device
    )
    # Bad files are skipped in training only: validation scores every image.
    shard = dict(shard_id=job.rank, num_shards=job.world, skip_bad=cfg.skip_bad_images)
    train = dict(split="train", train=True, **loader_args, **shard)
    pretrain_loader = build_loader(root, batch_size=cfg.pretrain_batch_size, **train)
    casm_loader = build_loader(
        root, batch_size=cfg.batch_size, fraction=cfg.epoch_fraction, **train
    )
    found = len(casm_loader.samples)
    phases = (
        ("pre-training", pretrain_loader, cfg.pretrain_epochs, "--pretrain-batch-size", 1.0),
        ("CASM", casm_loader, cfg.casm_epochs, "--batch-size", cfg.epoch_fraction),
    )
    for name, loader, epochs, option, fraction in phases:
        if epochs and len(loader) == 0:  # the last partial batch is dropped
            per_epoch = max(1, int(found * fraction))  # as data.epoch_order cuts an epoch
            seen = (
                f", {per_epoch} of them per epoch (--epoch-fraction)" if per_epoch < found else ""
            )
            where = f" on each of {job.world} processes" if job.world > 1 else ""
            raise UserError(
                f"{root}: {found} training images{seen}, too few for one {name} batch of "
                f"{loader.batch_size}{where}; pass a smaller {option}"
            )
    val_loader = build_loader(root, "val", batch_size=VAL_BATCH, train=False, **loader_args)
    boxes = [  # each validation image's boxes of its own class, in the model frame
        own_boxes(path, wnids[label], root / "annotations", cfg.image_size, cfg.resize)
        for path, label in val_loader.samples
    ]
    return Loaders(pretrain_loader, casm_loader, val_loader, boxes)


@dataclass
class TrainState:
    """What a run carries from one epoch to the next, saved and restored whole: the models,
    the optimisers and the schedule, the gradient scaler, the thinning pool, the step counter,
    both RNGs, and where the run goes on (phase, epoch). Resuming restores exactly what saving
    saved."""

    masker: SaliencyModel
    casm: CASM  # the CASM phase's optimisers, gradient scaler, thinning pool and step counter
    pretrain_optimizer: torch.optim.Optimizer
    pretrain_schedule: torch.optim.lr_scheduler.LRScheduler
    rng: random.Random  # the pool's RNG: the same draws on every rank
    phase: str = "pretrain"  # where the run goes on: pretrain, casm or done
    epoch: int = 0  # the epochs of `phase` done

    @classmethod
    def start(
        cls,
        masker: SaliencyModel,
        casm: CASM,
        cfg: TrainConfig,
        pretrain_steps: int,
        rng: random.Random,
    ) -> TrainState:
        """A fresh run's state: the pre-training optimiser and its one-cycle schedule over
        `pretrain_steps` steps join the CASM phase's; the run starts at its first phase."""
        optimizer = torch.optim.Adam(
            masker.encoder.parameters(), lr=cfg.pretrain_lr, fused=casm.fused or None
        )
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.pretrain_lr, total_steps=max(1, pretrain_steps)
        )
        phase = "pretrain" if cfg.pretrain_epochs > 0 else "casm"
        return cls(masker, casm, optimizer, schedule, rng, phase=phase, epoch=0)

    def checkpoint(
        self, model: ModelSpec, config: dict[str, Any], metrics: dict[str, Any]
    ) -> TrainingCheckpoint:
        """All of the state as it is now, with the run's model description, config and the
        last epoch's metrics."""
        masker, casm = self.masker, self.casm
        mapping_encoder = masker.mapping_encoder
        return TrainingCheckpoint(
            model=model,
            config=config,
            phase=self.phase,
            epoch=self.epoch,
            step=casm.step_count,
            encoder=masker.encoder.state_dict(),
            decoder=masker.decoder.state_dict(),
            mapping_encoder=None if mapping_encoder is None else mapping_encoder.state_dict(),
            optimizers={
                "pretrain": self.pretrain_optimizer.state_dict(),
                "pretrain_schedule": self.pretrain_schedule.state_dict(),
                "casm": casm.state_dict(),
            },
            rng={"torch": torch.get_rng_state(), "python": self.rng.getstate()},
            metrics=metrics,
            snapshots=casm.pool.on_cpu() if casm.pool.snapshots else [],
        )

    def restore(self, checkpoint: TrainingCheckpoint) -> None:
        """Take back everything `checkpoint` saved."""
        masker, casm = self.masker, self.casm
        masker.encoder.load_state_dict(checkpoint.encoder)
        masker.decoder.load_state_dict(checkpoint.decoder)
        if masker.mapping_encoder is not None:
            masker.mapping_encoder.load_state_dict(checkpoint.mapping_encoder)
        self.pretrain_optimizer.load_state_dict(checkpoint.optimizers["pretrain"])
        self.pretrain_schedule.load_state_dict(checkpoint.optimizers["pretrain_schedule"])
        casm.load_state_dict(checkpoint.optimizers["casm"])
        casm.step_count = checkpoint.step
        torch.set_rng_state(checkpoint.rng["torch"])
        version, internal, gauss = checkpoint.rng["python"]
        self.rng.setstate((version, tuple(internal), gauss))
        casm.pool.load(checkpoint.snapshots)
        self.phase, self.epoch = checkpoint.phase, checkpoint.epoch


# --- the phases -------------------------------------------------------------------------------


def _pretrain_phase(setup: Setup, state: TrainState, bars) -> None:
    """The pre-training epochs left: the classifier alone, on clean images."""
    cfg, loader = setup.cfg, setup.loaders.pretrain
    for e in range(state.epoch, cfg.pretrain_epochs):
        loader.set_epoch(e)
        started, title = time.time(), f"pretrain {e + 1}/{cfg.pretrain_epochs}"
        optimizer, schedule = state.pretrain_optimizer, state.pretrain_schedule
        figures = pretrain_one_epoch(
            state.masker, loader, optimizer, schedule, state.casm, bars, title
        )
        _end_epoch(setup, state, "pretrain", e + 1, title, started, figures)


def _casm_phase(setup: Setup, state: TrainState, bars) -> None:
    """The CASM epochs left (Algorithm 1)."""
    cfg, loader, masker = setup.cfg, setup.loaders.casm, state.masker
    if state.epoch == 0 and cfg.unshared and not cfg.own_mapping:
        # Unshared: the mapping's encoder starts as the classifier the phase starts from (one
        # of its own arch or width, --mapping-arch, starts from its fresh weights).
        masker.mapping_encoder.load_state_dict(masker.encoder.state_dict())
    for e in range(state.epoch, cfg.casm_epochs):
        state.casm.set_epoch_lr(e)
        loader.set_epoch(1000 + e)  # other crops than the pre-training epochs
        started, title = time.time(), f"CASM {cfg.reproduce} {e + 1}/{cfg.casm_epochs}"
        figures = casm_one_epoch(state.casm, loader, bars, title)
        _end_epoch(setup, state, "casm", e + 1, title, started, figures)


def _end_epoch(
    setup: Setup, state: TrainState, phase: str, done: int, title: str, started: float, figures
) -> None:
    """Validate, checkpoint, log and print (under `title`) the epoch of `phase` that ended.

    `done` epochs of the phase are done; the state moves on to the next epoch, or after the
    phase's last to the next phase, and the checkpoint says so. Rank 0 alone validates and
    writes, with its own training figures (its shard) and the files it skipped (with
    --skip-bad-images, over all the ranks); the others wait.
    """
    cfg = setup.cfg
    loader = setup.loaders.pretrain if phase == "pretrain" else setup.loaders.casm
    if cfg.skip_bad_images:  # the files skipped over all the ranks, for the epoch's log line
        bad = sorted(set(dist.gather_lists(loader.bad_files)))
        figures |= {"train_skipped": len(bad), "train_skipped_files": bad}
    total = cfg.pretrain_epochs if phase == "pretrain" else cfg.casm_epochs
    then = "casm" if phase == "pretrain" and cfg.casm_epochs else "done"
    dist.average_buffers(state.masker)  # the BatchNorm statistics of all the ranks' shards
    state.phase, state.epoch = (phase, done) if done < total else (then, 0)
    val = None
    if setup.job.main:
        val = evaluate(state.masker, setup.loaders.val, setup.loaders.boxes, cfg.fill)
        record = {"phase": phase, "epoch": done, "seconds": time.time() - started}
        record |= figures | val
        save_training(setup.run_dir, state.checkpoint(setup.model, config_to_dict(cfg), record))
        with (setup.run_dir / LOG).open("a") as f:
            f.write(json.dumps(record) + "\n")
    dist.barrier()
    if val is not None:
        console.print(_epoch_line(phase, title, figures, val))


# --- one epoch, and validation ----------------------------------------------------------------


class _Sums:
    """An epoch's figures summed on the device in float64, read by the host only when asked
    (every PROGRESS_EVERY steps for the progress bar, and at the end)."""

    def __init__(self, device: torch.device, *names: str):
        self.names = names
        self.totals = torch.zeros(len(names), dtype=torch.float64, device=device)

    def add(self, *values: torch.Tensor) -> None:
        self.totals += torch.cat([v.double().reshape(-1) for v in values])

    def read(self) -> dict[str, float]:
        return dict(zip(self.names, self.totals.tolist(), strict=True))


def pretrain_one_epoch(
    masker: SaliencyModel, loader, optimizer, scheduler, casm: CASM, bars, description: str
) -> dict:
    """One epoch of the classifier on clean images, with the CASM phase's AMP and scaler."""
    encoder = masker.encoder.train()
    task = bars.add_task(description, total=len(loader), info="")
    device = masker.mean.device
    sums = _Sums(device, "loss", "correct", "images")
    for step, (images, labels, _) in enumerate(loader, 1):
        images, labels = images.to(device), labels.to(device, non_blocking=True)
        with autocast(device.type, casm.amp_dtype):
            logits, _ = encoder(masker.normalize(images))
        logits = logits.float()
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        casm.scaler.scale(loss).backward()
        dist.average_gradients([p.grad for p in encoder.parameters() if p.grad is not None])
        casm.scaler.step(optimizer)
        casm.scaler.update()
        scheduler.step()
        n = len(labels)
        images_seen = torch.full((), n, dtype=torch.float64, device=device)
        sums.add(loss.detach().double() * n, logits.argmax(1).eq(labels).sum(), images_seen)
        info = {}
        if step % PROGRESS_EVERY == 0:
            s = sums.read()
            info["info"] = (
                f"loss {s['loss'] / s['images']:.3f} acc {s['correct'] / s['images']:.3f}"
            )
        bars.update(task, advance=1, **info)
    bars.remove_task(task)
    s = sums.read()
    return {"train_loss": s["loss"] / s["images"], "train_acc": s["correct"] / s["images"]}


MASK_SUMS = ("images", "area", "area_squared", "entropy", "tv")  # `mask_stat_sums`' five


def casm_one_epoch(casm: CASM, loader, bars, description: str) -> dict:
    """One epoch of CASM steps; the epoch's training figures (losses, accuracies, masks)."""
    task = bars.add_task(description, total=len(loader), info="")
    device = casm.masker.mean.device
    names = ("loss_clean", "loss_masked", "loss_mapping", "correct", "correct_masked")
    sums = _Sums(device, *names, *MASK_SUMS)
    for step, (images, labels, _) in enumerate(loader, 1):
        out = casm.step(images.to(device), labels.to(device, non_blocking=True))
        n = len(labels)
        losses = (out.loss_clean * n, out.loss_masked * n, out.loss_mapping * n)
        sums.add(*losses, out.correct, out.correct_masked, mask_stat_sums(out.masks))
        info = {}
        if step % PROGRESS_EVERY == 0:
            s = sums.read()
            seen = s["images"]
            info["info"] = (
                f"acc {s['correct'] / seen:.3f} masked {s['correct_masked'] / seen:.3f} "
                f"area {s['area'] / seen:.3f}"
            )
        bars.update(task, advance=1, **info)
    bars.remove_task(task)
    s = sums.read()
    seen = s["images"]
    stats = MaskStats()
    stats.add_sums([s[k] for k in MASK_SUMS])
    return {
        "train_loss_clean": s["loss_clean"] / seen,
        "train_loss_masked": s["loss_masked"] / seen,
        "train_loss_mapping": s["loss_mapping"] / seen,
        "train_acc": s["correct"] / seen,
        "train_acc_masked": s["correct_masked"] / seen,
        **{f"train_{k}": v for k, v in stats.result().items()},
    }


@torch.no_grad()
def evaluate(
    masker: SaliencyModel, loader, boxes: list[list[list[int]]], fill: str = "black"
) -> dict:
    """Clean and masked-out accuracy, LE / OM / F1 and mask statistics on the validation set.

    `boxes`: each validation image's boxes of its own class, by sample index. The masked-out
    images take `fill` (the training's), so masked-out accuracy is comparable.
    """
    masker.eval()
    meter, stats = LocalizationMeter(), MaskStats()
    correct = correct_masked = seen = 0
    device = masker.mean.device
    for images, labels, indices in loader:
        images, labels = images.to(device), labels.to(device)
        masks, logits = masker(images)
        masked_logits, _ = masker.encoder(masked_out(masker, images, masks, fill))
        right = logits.argmax(1).eq(labels)
        correct += int(right.sum())
        correct_masked += int(masked_logits.argmax(1).eq(labels).sum())
        seen += len(labels)
        score_masks(masks, [boxes[i] for i in indices.tolist()], right.tolist(), meter, stats)
    loc = meter.result()
    return {
        "val_acc": correct / seen,
        "val_acc_masked": correct_masked / seen,
        "val_LE": loc["LE"],
        "val_OM": loc["OM"],
        "val_F1": loc["F1"],
        "val_F1a": loc["F1a"],
        **{f"val_{k}": v for k, v in stats.result().items()},
    }


def _epoch_line(phase: str, title: str, figures: dict, val: dict) -> str:
    """The line printed at an epoch's end: its validation figures (and its skipped files)."""
    n = figures.get("train_skipped", 0)
    skipped = (
        f", skipped {n} bad image{'s' if n > 1 else ''} (metrics.jsonl lists them)" if n else ""
    )
    if phase == "pretrain":
        return (
            f"{title}: train acc {figures['train_acc']:.3f}, val acc {val['val_acc']:.3f}{skipped}"
        )
    return (
        f"{title}: val acc {val['val_acc']:.3f}, masked-out "
        f"{val['val_acc_masked']:.3f}, area {val['val_mask_mean']:.3f}, "
        f"LE {val['val_LE']:.3f}, F1 {val['val_F1']:.3f}{skipped}"
    )


def _print_summary(log_path: Path) -> None:
    """The table `make demo` ends with: baseline, pre-training and the last CASM epoch."""
    from rich.table import Table

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    rows = [r for r in records if r["phase"] == "baseline"]
    rows += [r for r in records if r["phase"] == "pretrain"][-1:]
    rows += [r for r in records if r["phase"] == "casm"][-1:]
    table = Table(title=f"validation: {log_path.parent}")
    columns = ["val_acc", "val_acc_masked", "val_LE", "val_OM", "val_F1", "val_mask_mean"]
    table.add_column("phase")
    for column in columns:
        table.add_column(column.removeprefix("val_"), justify="right")
    for r in rows:
        name = "centre box" if r["phase"] == "baseline" else f"{r['phase']} epoch {r['epoch']}"
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else "-" for c in columns]
        table.add_row(name, *cells)
    console.print(table)


# --- the run folder: its lock, --resume, the temporaries a kill leaves, the log ---------------


def lock_run_dir(run_dir: Path):
    """An exclusive lock on `run_dir` (on its `.lock` file), held while the returned file is
    open and dropped by the system when the process ends, kill -9 included; None where the
    file system (or the platform) has no locks.

    Raises:
        UserError: another process holds it: a run is going on in that folder.
    """
    try:
        import fcntl
    except ImportError:  # Windows has no fcntl
        return None
    make_folders(run_dir)
    handle = (run_dir / ".lock").open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(f"{run_dir}: another training run is using this folder") from None
    except OSError:  # a file system without locks
        handle.close()
        return None
    return handle


@contextlib.contextmanager
def _claim_run_dir(run_dir: Path, main: bool) -> Iterator[bool]:
    """Rank 0 (`main`) holds the folder's lock for the whole block: a second run into it is
    refused. Yields whether the folder is locked (no lock: other ranks, or no locks here).

    A folder this made and left holding nothing but its lock (a run refused before it wrote
    anything: bad data, say) is removed on the way out.
    """
    created = not run_dir.exists()
    lock = lock_run_dir(run_dir) if main else None
    try:
        yield lock is not None
    finally:
        if lock is not None:
            if created and [p.name for p in run_dir.iterdir()] == [".lock"]:
                (run_dir / ".lock").unlink()
                run_dir.rmdir()
            lock.close()


def _resumed_config(cfg: TrainConfig, run_dir: Path, main: bool) -> TrainConfig:
    """The config the run goes on with: with --resume, the one it started with (its
    config.json), whatever the flags say now; `resume` is then whether there is a checkpoint
    to resume (killed before its first one, or never started: it starts from scratch).

    Raises:
        UserError: a run is there and --resume was not passed, or its config.json is missing.
    """
    ckpt_path = run_dir / RUN_CHECKPOINT
    if ckpt_path.exists() and not cfg.resume:
        raise UserError(
            f"{run_dir}: a run is already there; pass --resume to continue it, "
            "or choose another --name"
        )
    if not cfg.resume:
        return cfg
    stored_path = run_dir / "config.json"
    if ckpt_path.exists() and not stored_path.is_file():
        raise UserError(f"{stored_path}: missing; cannot tell how the run was started")
    if stored_path.is_file():
        cfg = config_from_dict(TrainConfig, json.loads(stored_path.read_text()))
    cfg = dataclasses.replace(cfg, resume=ckpt_path.exists())
    if not cfg.resume and main:
        console.print(f"{run_dir}: no checkpoint to resume yet; starting the run afresh")
    return cfg


def remove_temporaries(run_dir: Path, locked: bool) -> None:
    """Delete what interrupted writes left in `run_dir` (TEMPORARIES): all of them under the
    folder's lock, else those older than STALE_SECONDS."""
    for pattern in TEMPORARIES:
        for path in run_dir.glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                if locked or time.time() - path.stat().st_mtime > STALE_SECONDS:
                    path.unlink()


def _start_log(run_dir: Path, config: dict, baseline: dict) -> None:
    """A new run's folder: its `config.json`, and a log holding the centre-box baseline."""
    make_folders(run_dir)
    log_path = run_dir / LOG
    log_path.unlink(missing_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    with log_path.open("a") as f:
        f.write(json.dumps({"phase": "baseline", **baseline}) + "\n")


def _trim_log(run_dir: Path, last: dict) -> None:
    """Make the log agree with a checkpoint: one line per finished epoch, none after `last`.

    A kill between the checkpoint and its log line loses the line (it is restored from the
    checkpoint); a kill in the middle of a write leaves a broken line (dropped).
    """
    log_path = run_dir / LOG
    kept = []
    lines = log_path.read_text().splitlines() if log_path.exists() else []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        kept.append(record)
        if (record["phase"], record.get("epoch")) == (last["phase"], last["epoch"]):
            break
    else:
        kept.append(last)
    write_atomic(log_path, "".join(json.dumps(r) + "\n" for r in kept))
