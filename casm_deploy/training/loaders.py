"""The run's data: a training loader per phase (each rank its own shard), the validation
loader, and the validation images' boxes.

`train.run` builds them once (`build_loaders`) after the models; a phase that would have no
batch is refused here with the images found and the option to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from casm_deploy.common.cpus import usable_cpus
from casm_deploy.config import TrainConfig
from casm_deploy.data.imagenet import own_boxes
from casm_deploy.data.loader import build_loader
from casm_deploy.errors import UserError
from casm_deploy.training.distributed import Distributed

VAL_BATCH = 128


@dataclass
class Loaders:
    """The loaders of a run, and each validation image's boxes of its own class (model frame)."""

    pretrain: Any
    casm: Any
    val: Any
    boxes: list[list[list[int]]]


def loader_workers(workers: int | None, device: torch.device, job: Distributed) -> int:
    """`--workers`, or its default: 1 on the CPU, where the model needs the cores; on CUDA the
    cores this process may use, shared between the node's processes (one per GPU)."""
    if workers is not None:
        return workers
    if device.type != "cuda":
        return 1
    return max(1, usable_cpus() // job.local_world)


def too_few_images(
    root: Path, phase: str, option: str, size: int, found: int, per_epoch: int, world: int
) -> str:
    """The message of a phase that would have no batch: the images found and the option."""
    seen = f", {per_epoch} of them per epoch (--epoch-fraction)" if per_epoch < found else ""
    where = f" on each of {world} processes" if world > 1 else ""
    return (
        f"{root}: {found} training images{seen}, too few for one {phase} batch of {size}{where}; "
        f"pass a smaller {option}"
    )


def build_loaders(
    cfg: TrainConfig, wnids: list[str], device: torch.device, job: Distributed
) -> Loaders:
    """The loaders of `cfg.data` for this rank, batches going to `device`.

    Raises:
        UserError: a phase that has epochs would have no batch (as `too_few_images` says), or
            as `loader.build_loader`.
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
    # Each rank trains on its own disjoint block of every epoch; validation is rank 0's alone.
    # Bad files are skipped in training only: validation scores every image.
    shard = dict(shard_id=job.rank, num_shards=job.world, skip_bad=cfg.skip_bad_images)
    pretrain_loader = build_loader(
        root, "train", batch_size=cfg.pretrain_batch_size, train=True, **loader_args, **shard
    )
    casm_loader = build_loader(
        root,
        "train",
        batch_size=cfg.batch_size,
        train=True,
        fraction=cfg.epoch_fraction,
        **loader_args,
        **shard,
    )
    found = len(casm_loader.samples)
    phases = (
        ("pre-training", pretrain_loader, cfg.pretrain_epochs, "--pretrain-batch-size", 1.0),
        ("CASM", casm_loader, cfg.casm_epochs, "--batch-size", cfg.epoch_fraction),
    )
    for name, loader_, epochs, option, fraction in phases:
        if epochs and len(loader_) == 0:  # the last partial batch is dropped
            per_epoch = max(1, int(found * fraction))  # as data.epoch_order cuts an epoch
            size = loader_.batch_size
            raise UserError(too_few_images(root, name, option, size, found, per_epoch, job.world))
    val_loader = build_loader(root, "val", batch_size=VAL_BATCH, train=False, **loader_args)
    boxes = [  # each validation image's boxes of its own class, in the model frame
        own_boxes(path, wnids[label], root / "annotations", cfg.image_size, cfg.resize)
        for path, label in val_loader.samples
    ]
    return Loaders(pretrain_loader, casm_loader, val_loader, boxes)
