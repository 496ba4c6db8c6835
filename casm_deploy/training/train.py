"""Training: classifier pre-training on clean images, then CASM (Algorithm 1 of the paper).

`run(cfg)` is the entry point. One CASM step: a classifier step on clean images, the thinning
pool, the mask from detached features, a masked-out pass through the current classifier or a
snapshot from the pool, a classifier step on the masked-out loss (Eq. 8), and a decoder step on
the entropy (or classification) score plus the area term on non-trivially confused images.
Optional mixed precision (`--amp`) and multi-process data-parallel training under torchrun.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from casm_deploy import __version__
from casm_deploy.checkpoint import FORMAT, VERSION, load_checkpoint, load_file, save_atomic
from casm_deploy.common.cpus import usable_cpus
from casm_deploy.common.paths import check_folder
from casm_deploy.common.ui import console, progress
from casm_deploy.config import (
    DEFAULT_DATA,
    SynthConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
)
from casm_deploy.data.datasets import build_loader, own_boxes, read_classes
from casm_deploy.errors import UserError
from casm_deploy.evaluation.metrics import (
    LocalizationMeter,
    MaskStats,
    center_box,
    localization_scores,
    masks_to_boxes,
)
from casm_deploy.models.mapping import Encoder, Masker, build_masker, load_encoder_weights

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str, device_type: str) -> torch.dtype | None:
    """The autocast dtype of `--amp` on this device (None: fp32), or a UserError.

    Raises:
        UserError: fp16 off CUDA (CPU autocast is for bf16), or bf16 on a GPU without it.
    """
    if amp not in AMP_DTYPES:
        raise UserError(f"--amp must be one of {', '.join(AMP_DTYPES)}, not {amp!r}")
    if amp == "fp16" and device_type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device (use --amp bf16 on the CPU)")
    if amp == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--amp bf16: this GPU does not support bfloat16 (use --amp fp16)")
    return AMP_DTYPES[amp]


# x86 (AVX512-BF16, AMX) and Arm (BF16) flags of bfloat16 arithmetic in /proc/cpuinfo
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The first CPU's feature flags (x86 `flags`, Arm `Features`), or None where unknown."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def bf16_cpu_warning(amp: str, device_type: str, flags: set[str] | None) -> str:
    """A warning for --amp bf16 on a CPU whose `flags` show no bfloat16 arithmetic ("" else).

    Without it autocast's bf16 is emulated: one such CPU trained 11x slower than in fp32.
    Unknown flags (None: no /proc/cpuinfo) give no warning.
    """
    if amp != "bf16" or device_type != "cpu" or flags is None or flags & BF16_CPU_FLAGS:
        return ""
    return (
        "warning: --amp bf16 on a CPU without bfloat16 arithmetic (no avx512_bf16, amx_bf16 "
        "or bf16 flag): slower than fp32 here; use --amp off"
    )


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


def autocast(device_type: str, dtype: torch.dtype | None):
    """`torch.autocast` to `dtype`, or nothing at all when `dtype` is None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


# Multi-process training. The models are not wrapped in DistributedDataParallel: DDP reduces
# gradients in hooks that `.backward()` fires, and CASM takes its masked-out and mapping
# gradients with `torch.autograd.grad`, which fires none. So every rank averages its gradients
# itself (one all-reduce per optimiser step, `average_gradients`) before the optimisers step,
# which keeps the weights identical on every rank, as DDP would.


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job; world 1 is a plain single process."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    local_world: int = 1  # the processes on this node

    @property
    def main(self) -> bool:
        return self.rank == 0


def distributed_from_env() -> Distributed:
    """Read torchrun's RANK, LOCAL_RANK and WORLD_SIZE (absent: a single process)."""
    return Distributed(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world=int(os.environ.get("WORLD_SIZE", 1)),
        local_world=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
    )


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_gradients(grads: list[torch.Tensor]) -> None:
    """Replace each rank's gradients, in place, by their mean over the ranks (a no-op alone).

    One flat buffer, so one all-reduce per optimiser step, divided before the sum as DDP does.
    Under fp16 the gradients are still scaled here: an inf on one rank becomes an inf on all, so
    every rank skips the same step.
    """
    if not _is_distributed() or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]) / dist.get_world_size()
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def average_buffers(module: nn.Module) -> None:
    """Average the BatchNorm running statistics over the ranks (a no-op alone).

    Each rank updates them on its own shard. The running averages are linear in the batch
    statistics, so averaging them only when they are read (a pool snapshot, validation, a
    checkpoint) gives the same as averaging after every step.
    """
    if not _is_distributed():
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= dist.get_world_size()


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (a no-op alone)."""
    if not _is_distributed():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor, src=0)


def barrier() -> None:
    if _is_distributed():
        dist.barrier()


class ThinningPool:
    """At most `capacity` classifier snapshots (fp32): the set F of Algorithm 1.

    A snapshot is stored when the pool is empty or every `smf` steps (`smf=None`: only the first,
    the "FL" strategy); once full, a random slot is overwritten. `draw` tosses the hp coin.
    The snapshots live on `storage`: the training device (a draw then copies nothing), or the
    host, in pinned memory when `pinned` so that a draw's copies to the GPU do not block.
    """

    def __init__(
        self,
        capacity: int,
        smf: int | None,
        hp: float,
        rng: random.Random,
        storage: torch.device = torch.device("cpu"),
        pinned: bool = False,
    ):
        self.capacity, self.smf, self.hp, self.rng = capacity, smf, hp, rng
        self.storage, self.pinned = storage, pinned
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def should_store(self, step: int) -> bool:
        """Step numbers count from 0, as the reference's `i % smf == smf - 1`."""
        if self.hp <= 0:
            return False
        return not self.snapshots or (self.smf is not None and step % self.smf == self.smf - 1)

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of `tensor` on the pool's storage (fp32 when floating, the layout kept)."""
        dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
        if not self.pinned:
            return tensor.detach().to(self.storage, dtype, copy=True)
        kept = torch.empty_like(tensor, dtype=dtype, device="cpu", pin_memory=True)
        return kept.copy_(tensor.detach(), non_blocking=True)

    def store(self, model: nn.Module) -> None:
        snapshot = {k: self._keep(v) for k, v in model.state_dict().items()}
        if len(self.snapshots) < self.capacity:
            self.snapshots.append(snapshot)
        else:
            self.snapshots[self.rng.randrange(len(self.snapshots))] = snapshot

    def on_cpu(self) -> list[dict[str, torch.Tensor]]:
        """The snapshots as CPU tensors, for a checkpoint (pinned copies finished first)."""
        if self.pinned:
            torch.cuda.synchronize()
        return [{k: v.cpu() for k, v in snapshot.items()} for snapshot in self.snapshots]

    def load(self, snapshots: list[dict[str, torch.Tensor]]) -> None:
        """Take the snapshots of a checkpoint (`on_cpu`'s) onto the pool's storage."""
        self.snapshots = [{k: self._keep(v) for k, v in s.items()} for s in snapshots]

    def weights(self, index: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Snapshot `index` on `device` (pinned: copies that do not block the host)."""
        snapshot = self.snapshots[index]
        if self.storage == device:
            return snapshot
        return {k: v.to(device, non_blocking=self.pinned) for k, v in snapshot.items()}

    def draw(self) -> int | None:
        """With probability hp the index of a random snapshot, else None (the current one)."""
        if self.hp <= 0 or not self.snapshots or self.rng.random() >= self.hp:
            return None
        return self.rng.randrange(len(self.snapshots))


def mapping_loss(
    logits: torch.Tensor,
    masked_logits: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor,
    lambda_r: float,
    score: str = "entropy",
) -> torch.Tensor:
    """The decoder's loss: score on masked-out images plus the area term.

    Entropy score: mean_i[c_i * sum_k p_ik log p_ik] (c_i: right on the clean image);
    classification score: -CE(masked_logits, labels). Area term: -lambda_r * mean_i relu(n_i - a_i)
    with n_i = right on clean and wrong on masked-out ("non-trivially confused"), a_i the mask area.
    """
    correct = logits.argmax(1).eq(labels)
    fooled = masked_logits.argmax(1).ne(labels)
    nontrivial = (correct & fooled).float()
    areas = masks.mean(dim=(1, 2, 3))
    area_term = -lambda_r * F.relu(nontrivial - areas).mean()
    if score == "entropy":
        log_probs = F.log_softmax(masked_logits, dim=1)
        negative_entropy = (log_probs.exp() * log_probs).sum(1)
        return (negative_entropy * correct.float()).mean() + area_term
    return -F.cross_entropy(masked_logits, labels) + area_term


def pool_storage(choice: str, device: torch.device, capacity: int, model: nn.Module):
    """`(storage, pinned)` of the thinning pool for `--pool-device` `choice` on `device`.

    On the CPU the snapshots are host tensors whatever the choice. On CUDA, `device` keeps them
    on the GPU, `pinned` in pinned host memory, and `auto` on the GPU when the full pool takes
    at most a fifth of its memory (30 ResNet-50 snapshots: about 3 GB), else pinned.
    """
    if device.type != "cuda" or choice == "device":
        return device, False
    if choice == "auto":
        snapshot_bytes = sum(4 * t.numel() for t in model.state_dict().values())
        total = torch.cuda.get_device_properties(device).total_memory
        if capacity * snapshot_bytes <= total / 5:
            return device, False
    return torch.device("cpu"), True


def masked_out(
    masker: Masker, images: torch.Tensor, masks: torch.Tensor, fill: str
) -> torch.Tensor:
    """The classifier's (normalised) input for the masked-out images x * (1 - m).

    `black`: masked pixels become 0 in [0, 1]; `mean`: they become the ImageNet mean colour, as
    in the reference's training, which multiplies the normalised image by (1 - m).
    """
    if fill == "mean":
        return masker.normalize(images) * (1 - masks)
    return masker.normalize(images * (1 - masks))


def mask_stat_sums(masks: torch.Tensor) -> torch.Tensor:
    """`metrics.MaskStats.add_sums`'s five sums of a (B, 1, H, W) batch, where the masks are.

    The same arithmetic as `MaskStats.update` (float64), in torch ops, so that the training
    loop keeps its mask statistics on the GPU and never copies a mask batch to the host.
    """
    m = masks.detach()[:, 0].double()
    areas = m.mean(dim=(1, 2))
    inner = (m > 0) & (m < 1)
    safe = torch.where(inner, m, torch.ones_like(m))  # log2(1) = 0: the others add nothing
    entropies = (-safe * torch.log2(safe)).sum(dim=(1, 2)) / (m.shape[1] * m.shape[2])
    tv = torch.zeros_like(areas)
    if m.shape[2] > 1:
        tv = tv + (m[:, :, 1:] - m[:, :, :-1]).pow(2).mean(dim=(1, 2))
    if m.shape[1] > 1:
        tv = tv + (m[:, 1:] - m[:, :-1]).pow(2).mean(dim=(1, 2))
    count = torch.full((), len(m), dtype=torch.float64, device=m.device)  # a fill, not a copy
    return torch.stack([count, areas.sum(), areas.pow(2).sum(), entropies.sum(), tv.sum()])


@dataclass
class StepOutput:
    """One step's figures, as device tensors (0-d unless said): reading them syncs the host."""

    loss_clean: torch.Tensor
    loss_masked: torch.Tensor
    loss_mapping: torch.Tensor
    correct: torch.Tensor  # right on the clean images (a count)
    correct_masked: torch.Tensor  # right on the masked-out images
    masks: torch.Tensor  # (B, 1, H, W), detached, for statistics


class CASM:
    """The state of the CASM phase: Masker, optimisers, thinning pool, and the step counter.

    With `cfg.amp` the forward passes run under autocast and the losses in fp32; the weights,
    the optimiser states and the pool snapshots stay fp32. fp16 adds a gradient scaler
    (`self.scaler`, disabled otherwise, so the fp32 step is exactly the plain one). A step
    never waits for the GPU: on CUDA, and wherever the scaler is on, the optimisers are the
    fused ones, which skip a step with inf gradients on the device (the others make the scaler
    read `found_inf` on the host at every step).
    """

    def __init__(self, masker: Masker, cfg: TrainConfig, rng: random.Random):
        self.masker, self.cfg = masker, cfg
        device_type = masker.mean.device.type
        self.amp_dtype = amp_dtype(cfg.amp, device_type)
        self.scaler = torch.amp.GradScaler(device_type, enabled=cfg.amp == "fp16")
        self.trainable = not cfg.fixed_classifier
        self.fused = device_type == "cuda" or self.scaler.is_enabled()
        fused = self.fused or None  # None: torch's default (foreach) elsewhere
        encoder_params = list(masker.encoder.parameters())
        self.opt_classifier = torch.optim.SGD(
            encoder_params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            fused=fused,
        )
        # The mapping's parameters: the decoder, and its own encoder when unshared (not the
        # head, which the mapping never reads).
        self.mapping_params = list(masker.decoder.parameters())
        if masker.mapping_encoder is not None:
            self.mapping_params += [
                p for n, p in masker.mapping_encoder.named_parameters() if not n.startswith("fc.")
            ]
        self.opt_decoder = torch.optim.Adam(
            self.mapping_params,
            lr=cfg.lr_decoder,
            weight_decay=cfg.weight_decay,
            fused=fused,
        )
        hp = cfg.resolved_hp if self.trainable else 0.0
        storage, pinned = pool_storage(
            cfg.pool_device, masker.mean.device, cfg.pool_size, masker.encoder
        )
        self.pool = ThinningPool(cfg.pool_size, cfg.resolved_smf, hp, rng, storage, pinned)
        self._pool_model: Encoder | None = None
        self.step_count = 0

    def set_epoch_lr(self, epoch: int) -> None:
        decay = 0.1 ** (epoch // self.cfg.lr_decay_every)
        for group in self.opt_classifier.param_groups:
            group["lr"] = self.cfg.lr * decay
        for group in self.opt_decoder.param_groups:
            group["lr"] = self.cfg.lr_decoder * decay

    def pool_classifier(self, index: int) -> Callable[[torch.Tensor], Any]:
        """The classifier of snapshot `index`: the encoder run with the snapshot's weights.

        `functional_call` reads the snapshot's tensors where they are, so a draw from a pool
        kept on the device copies nothing (loading them into a module would copy each).
        """
        if self._pool_model is None:
            self._pool_model = copy.deepcopy(self.masker.encoder).eval()
        weights = self.pool.weights(index, self.masker.mean.device)
        return lambda x: torch.func.functional_call(self._pool_model, weights, (x,))

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        """One step of Algorithm 1 on a batch of images in [0, 1]."""
        masker, cfg, scaler = self.masker, self.cfg, self.scaler
        encoder, decoder = masker.encoder, masker.decoder
        encoder.train(self.trainable)
        decoder.train()
        # Forward passes under autocast (a no-op in fp32), losses in fp32.
        amp = autocast(images.device.type, self.amp_dtype)

        # 1. The classifier on clean images, and its SGD step.
        with torch.set_grad_enabled(self.trainable), amp:
            logits, features = encoder(masker.normalize(images))
        logits = logits.float()
        loss_clean = F.cross_entropy(logits, labels)
        if self.trainable:
            self.opt_classifier.zero_grad(set_to_none=True)
            scaler.scale(loss_clean).backward()
            average_gradients([p.grad for p in encoder.parameters() if p.grad is not None])
            scaler.step(self.opt_classifier)
            # GradScaler allows one step per optimiser between updates, and the classifier
            # steps again below: so one update here, one at the end.
            scaler.update()

        # 2. The thinning pool keeps snapshots of the classifier just updated.
        if self.pool.should_store(self.step_count):
            average_buffers(encoder)  # every rank stores the same snapshot
            self.pool.store(encoder)

        # 3. The mask from the detached features (or, unshared, from the mapping's own encoder,
        # which the mapping loss trains), and the masked-out images.
        if masker.mapping_encoder is None:
            mapping_features = [f.detach() for f in features]
        else:
            masker.mapping_encoder.train()
            with amp:
                _, mapping_features = masker.mapping_encoder(masker.normalize(images))
        with amp:
            masks = decoder(mapping_features, size=images.shape[-2:])
        masks = masks.float()
        masked_input = masked_out(masker, images, masks, cfg.fill)

        # 4. The classifier of the masked pass: a snapshot with probability hp, else the current.
        # The draw comes from an RNG seeded alike on every rank, so all ranks run the same graph.
        index = self.pool.draw()
        classifier = encoder if index is None else self.pool_classifier(index)
        with amp:
            masked_logits, _ = classifier(masked_input)
        masked_logits = masked_logits.float()
        loss_masked = F.cross_entropy(masked_logits, labels)
        loss_map = mapping_loss(
            logits.detach(), masked_logits, labels, masks, cfg.resolved_lambda_r, cfg.score
        )

        # 5. All gradients first, then the steps: the classifier's on the masked-out loss
        # (Eq. 8) and the decoder's on the mapping loss. The decoder's gradient is taken for
        # the decoder alone, so the mapping loss never moves the encoder.
        # Under fp16 each loss is scaled, and the gradients are unscaled before the clipping.
        decoder_params = [p for p in self.mapping_params if p.requires_grad]
        update_classifier = self.trainable and index is None
        grads: tuple[torch.Tensor, ...] = ()
        if update_classifier:
            encoder_params = [p for p in encoder.parameters() if p.requires_grad]
            grads = torch.autograd.grad(
                scaler.scale(loss_masked), encoder_params, retain_graph=True
            )
        decoder_grads = torch.autograd.grad(scaler.scale(loss_map), decoder_params)
        average_gradients([*grads, *decoder_grads])
        if update_classifier:
            self.opt_classifier.zero_grad(set_to_none=True)
            _set_grads(encoder_params, grads)
            scaler.step(self.opt_classifier)
        self.opt_decoder.zero_grad(set_to_none=True)
        _set_grads(decoder_params, decoder_grads)
        scaler.unscale_(self.opt_decoder)
        nn.utils.clip_grad_norm_(decoder_params, cfg.grad_clip)
        scaler.step(self.opt_decoder)
        scaler.update()
        self.step_count += 1

        return StepOutput(
            loss_clean=loss_clean.detach(),
            loss_masked=loss_masked.detach(),
            loss_mapping=loss_map.detach(),
            correct=logits.argmax(1).eq(labels).sum(),
            correct_masked=masked_logits.argmax(1).eq(labels).sum(),
            masks=masks.detach(),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "classifier": self.opt_classifier.state_dict(),
            "decoder": self.opt_decoder.state_dict(),
            "scaler": self.scaler.state_dict(),  # {} unless fp16
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt_classifier.load_state_dict(state["classifier"])
        self.opt_decoder.load_state_dict(state["decoder"])
        if state.get("scaler"):  # absent from checkpoints older than --amp, empty unless fp16
            self.scaler.load_state_dict(state["scaler"])


def _set_grads(params: list[torch.Tensor], grads: tuple[torch.Tensor, ...]) -> None:
    """Give each parameter its gradient from `autograd.grad`, in the parameter's own layout.

    The fused optimisers read parameter and gradient as flat memory, and `autograd.grad`
    (unlike `.backward()`) does not promise the parameter's strides, e.g. under channels-last.
    """
    for p, g in zip(params, grads, strict=True):
        p.grad = g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)


@torch.no_grad()
def validate(
    masker: Masker,
    loader,
    boxes: list[list[list[int]]],
    image_size: int,
    fill: str = "black",
) -> dict:
    """Clean and masked-out accuracy, LE / OM / F1 and mask statistics on the validation set.

    The masked-out images take `fill` (the training's), so masked-out accuracy is comparable.
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
        stats.update(masks)
        masks_np = masks[:, 0].cpu().numpy()
        for mask, box, index, ok in zip(
            masks_np, masks_to_boxes(masks_np), indices.tolist(), right.tolist(), strict=True
        ):
            scores = localization_scores(mask, box, boxes[index])
            meter.update(scores["hit"], scores["f1"], scores["f1a"], ok)
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


def center_baseline(boxes: list, image_size: int) -> dict:
    """LE / F1 of the reference's centre box (a 33/224 border) on the same validation boxes."""
    box = center_box(image_size, image_size)
    mask = np.zeros((image_size, image_size), dtype=np.float32)
    mask[box[1] : box[3], box[0] : box[2]] = 1.0
    meter = LocalizationMeter()
    for gt in boxes:
        scores = localization_scores(mask, box, gt)
        meter.update(scores["hit"], scores["f1"], scores["f1a"], None)
    result = meter.result()
    return {"val_LE": result["LE"], "val_F1": result["F1"], "val_F1a": result["F1a"]}


def print_summary(log_path: Path) -> None:
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
        name = r["phase"] if r["phase"] == "baseline" else f"{r['phase']} epoch {r['epoch']}"
        if r["phase"] == "baseline":
            name = "centre box"
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else "-" for c in columns]
        table.add_row(name, *cells)
    console.print(table)


# The progress bar's figures are read from the device every this many steps (a host sync):
# every step would make the GPU wait for the host each time.
PROGRESS_EVERY = 20


def _pretrain_epoch(masker, loader, optimizer, scheduler, casm, bars, description) -> dict:
    """One epoch of the classifier on clean images, with the CASM phase's AMP and scaler.

    Its sums (images, loss, right answers) stay on the device; the host reads them every
    PROGRESS_EVERY steps and at the end.
    """
    encoder = masker.encoder.train()
    task = bars.add_task(description, total=len(loader), info="")
    device = masker.mean.device
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for step, (images, labels, _) in enumerate(loader, 1):
        images, labels = images.to(device), labels.to(device, non_blocking=True)
        with autocast(device.type, casm.amp_dtype):
            logits, _ = encoder(masker.normalize(images))
        logits = logits.float()
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        casm.scaler.scale(loss).backward()
        average_gradients([p.grad for p in encoder.parameters() if p.grad is not None])
        casm.scaler.step(optimizer)
        casm.scaler.update()
        scheduler.step()
        n = len(labels)
        totals += torch.stack(
            [
                loss.detach().double() * n,
                logits.argmax(1).eq(labels).sum(),
                torch.full((), n, dtype=torch.float64, device=device),
            ]
        )
        info = None
        if step % PROGRESS_EVERY == 0:
            loss_sum, correct, seen = totals.tolist()
            info = f"loss {loss_sum / seen:.3f} acc {correct / seen:.3f}"
        bars.update(task, advance=1, **({"info": info} if info else {}))
    bars.remove_task(task)
    loss_sum, correct, seen = totals.tolist()
    return {"train_loss": loss_sum / seen, "train_acc": correct / seen}


def casm_epoch(casm: CASM, loader, bars, description: str) -> dict:
    """One epoch of CASM steps; the epoch's training figures (losses, accuracies, masks).

    Every figure is summed on the device (`mask_stat_sums` for the masks) and read by the host
    once at the end, and every PROGRESS_EVERY steps for the progress bar, so the GPU runs ahead.
    """
    task = bars.add_task(description, total=len(loader), info="")
    device = casm.masker.mean.device
    # loss_clean, loss_masked, loss_mapping (each times n), correct, correct_masked, then
    # mask_stat_sums' five (the first is the number of images)
    totals = torch.zeros(10, dtype=torch.float64, device=device)
    for step, (images, labels, _) in enumerate(loader, 1):
        out = casm.step(images.to(device), labels.to(device, non_blocking=True))
        n = len(labels)
        figures = [out.loss_clean * n, out.loss_masked * n, out.loss_mapping * n]
        figures += [out.correct, out.correct_masked]
        totals += torch.cat([torch.stack([f.double() for f in figures]), mask_stat_sums(out.masks)])
        info = None
        if step % PROGRESS_EVERY == 0:
            values = totals.tolist()
            seen = values[5]
            info = (
                f"acc {values[3] / seen:.3f} masked {values[4] / seen:.3f} "
                f"area {values[6] / seen:.3f}"
            )
        bars.update(task, advance=1, **({"info": info} if info else {}))
    bars.remove_task(task)
    values = totals.tolist()
    seen = values[5]
    stats = MaskStats()
    stats.add_sums(values[5:])
    return {
        "train_loss_clean": values[0] / seen,
        "train_loss_masked": values[1] / seen,
        "train_loss_mapping": values[2] / seen,
        "train_acc": values[3] / seen,
        "train_acc_masked": values[4] / seen,
        **{f"train_{k}": v for k, v in stats.result().items()},
    }


def skipped_files(loader, enabled: bool) -> dict:
    """With --skip-bad-images, the epoch's skipped files over all the ranks, for its log line:
    `train_skipped` (how many) and `train_skipped_files` (their messages); {} without."""
    if not enabled:
        return {}
    bad = list(loader.bad_files)
    if _is_distributed():
        gathered: list[list[str] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, bad)
        bad = [message for part in gathered for message in part or []]
    bad = sorted(set(bad))
    return {"train_skipped": len(bad), "train_skipped_files": bad}


def skipped_note(train_metrics: dict) -> str:
    """The end of an epoch's printed line: how many bad files it skipped, if any."""
    n = train_metrics.get("train_skipped", 0)
    return f", skipped {n} bad image{'s' if n > 1 else ''} (metrics.jsonl lists them)" if n else ""


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """`auto` -> CUDA when available, else CPU; a CUDA device asked for must exist.

    Under torchrun (`local_rank` given) a bare `cuda` means this process's GPU, cuda:LOCAL_RANK.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a device (use auto, cpu or cuda)") from None
    if device == torch.device("cuda") and local_rank is not None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """Join the torchrun job this process belongs to, if any, and pick its device.

    NCCL between GPUs, gloo between CPU processes. Returns the job's shape (world 1 when not
    under torchrun) and this process's device.
    """
    job = distributed_from_env()
    if job.world == 1:
        return job, resolve_device(device_name)
    device = resolve_device(device_name, job.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # Validation runs on rank 0 alone while the others wait at a barrier: allow an hour.
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            rank=job.rank,
            world_size=job.world,
            timeout=datetime.timedelta(hours=1),
        )
    return job, device


def loader_workers(workers: int | None, device: torch.device, job: Distributed) -> int:
    """`--workers`, or its default: 1 on the CPU, where the model needs the cores; on CUDA the
    cores this process may use, shared between the node's processes (one per GPU)."""
    if workers is not None:
        return workers
    if device.type != "cuda":
        return 1
    return max(1, usable_cpus() // job.local_world)


def ensure_data(cfg: TrainConfig) -> None:
    """Generate the embedded data set when training on its default path and it is missing."""
    if Path(cfg.data) == Path(DEFAULT_DATA) and not (Path(cfg.data) / "synth.json").is_file():
        from casm_deploy.data.synth import generate

        console.print(f"[bold]{cfg.data}[/] is missing: generating the embedded data set")
        generate(SynthConfig(out=cfg.data))


def _trim_log(log_path: Path, last: dict) -> None:
    """Make the log agree with a checkpoint: one line per finished epoch, none after `last`.

    A kill between the checkpoint and its log line loses the line (it is restored from the
    checkpoint); a kill in the middle of a write leaves a broken line (dropped).
    """
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
    tmp = log_path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(log_path)


# What a kill during a write leaves in a run folder: `checkpoint.save_atomic`'s temporaries
# (`.<file name>.<random>.tmp`, full-size) of the checkpoint and the pool files, and
# `_trim_log`'s. Without the folder's lock, only those older than STALE_SECONDS are ours to
# remove: no save takes that long, and a younger one may be another run's write in progress.
TEMPORARIES = (".checkpoint.pt.*.tmp", ".pool-*.pt.*.tmp", "metrics.tmp")
STALE_SECONDS = 3600


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
    run_dir.mkdir(parents=True, exist_ok=True)
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


def remove_temporaries(run_dir: Path, locked: bool) -> None:
    """Delete what interrupted writes left in `run_dir` (TEMPORARIES): all of them under the
    folder's lock, else those older than STALE_SECONDS."""
    for pattern in TEMPORARIES:
        for path in run_dir.glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                if locked or time.time() - path.stat().st_mtime > STALE_SECONDS:
                    path.unlink()


def _rng_state(rng: random.Random) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": rng.getstate()}


def _restore_rng(state: dict[str, Any], rng: random.Random) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    rng.setstate((version, tuple(internal), gauss))


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
    ckpt_path = run_dir / "checkpoint.pt"
    main = distributed_from_env().main
    # Rank 0 holds the folder's lock for the whole run: a second run into it is refused.
    created = not run_dir.exists()
    lock = lock_run_dir(run_dir) if main else None
    try:
        if ckpt_path.exists() and not cfg.resume:
            raise UserError(
                f"{run_dir}: a run is already there; pass --resume to continue it, "
                "or choose another --name"
            )
        if cfg.resume:
            stored_path = run_dir / "config.json"
            if ckpt_path.exists() and not stored_path.is_file():
                raise UserError(f"{stored_path}: missing; cannot tell how the run was started")
            if stored_path.is_file():
                # A resumed run goes on with the settings it started with, whatever the flags
                # say now.
                cfg = config_from_dict(TrainConfig, json.loads(stored_path.read_text()))
            # Killed before its first checkpoint (or never started): it starts from scratch.
            cfg = dataclasses.replace(cfg, resume=ckpt_path.exists())
            if not cfg.resume and main:
                console.print(f"{run_dir}: no checkpoint to resume yet; starting the run afresh")
        if main:
            remove_temporaries(run_dir, locked=lock is not None)

        # Every rank has made the checks above before any rank can pass this line (torchrun's
        # rendezvous), so no rank sees the files that rank 0 writes next.
        joined = dist.is_available() and dist.is_initialized()
        job, device = init_distributed(cfg.device)
        try:
            return _train(cfg, job, device)
        finally:
            if not joined and dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
    finally:
        if lock is not None:
            if created and [p.name for p in run_dir.iterdir()] == [".lock"]:
                # Refused before it wrote anything (bad data, say): leave no empty run folder.
                (run_dir / ".lock").unlink()
                run_dir.rmdir()
            lock.close()


def _train(cfg: TrainConfig, job: Distributed, device: torch.device) -> Path:
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)  # the pool's RNG: the same draws on every rank
    run_dir = Path(cfg.out) / cfg.run_name
    ckpt_path, log_path = run_dir / "checkpoint.pt", run_dir / "metrics.jsonl"

    if job.main:
        ensure_data(cfg)
    barrier()
    info = read_classes(cfg.data)
    root = Path(cfg.data)
    masker = build_masker(
        cfg.arch, len(info.wnids), cfg.width, cfg.upsample, shared_encoder=not cfg.unshared
    )
    if cfg.weights:
        load_encoder_weights(masker.encoder, cfg.weights)
    masker = masker.to(device)
    if cfg.channels_last:
        masker = masker.to(memory_format=torch.channels_last)
    broadcast_module(masker)  # the same seed gives the same weights; this makes sure of it
    casm = CASM(masker, cfg, rng)  # early: it refuses an --amp this device cannot run
    warning = bf16_cpu_warning(cfg.amp, device.type, cpu_flags())
    if warning and job.main:
        console.print(warning, soft_wrap=True)
    if device.type == "cuda":
        # Every training batch has the same shape: let cuDNN time its algorithms once.
        torch.backends.cudnn.benchmark = True

    loader_args = dict(
        wnids=info.wnids,
        image_size=cfg.image_size,
        workers=loader_workers(cfg.workers, device, job),
        seed=cfg.seed,
        loader=cfg.loader,
        # validation: data.validation_policy of it, which the boxes below follow too
        policy=cfg.resize,
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
    val_loader = build_loader(root, "val", batch_size=128, train=False, **loader_args)
    boxes = [  # each validation image's boxes of its own class, in the model frame
        own_boxes(path, info.wnids[label], root / "annotations", cfg.image_size, cfg.resize)
        for path, label in val_loader.samples
    ]

    pre_opt = torch.optim.Adam(
        masker.encoder.parameters(), lr=cfg.pretrain_lr, fused=casm.fused or None
    )
    pre_sched = torch.optim.lr_scheduler.OneCycleLR(
        pre_opt,
        max_lr=cfg.pretrain_lr,
        total_steps=max(1, cfg.pretrain_epochs * len(pretrain_loader)),
    )
    phase, epoch = ("pretrain", 0) if cfg.pretrain_epochs > 0 else ("casm", 0)

    if cfg.resume:  # every rank loads the same checkpoint
        checkpoint = load_checkpoint(ckpt_path)
        masker.encoder.load_state_dict(checkpoint["encoder"])
        masker.decoder.load_state_dict(checkpoint["decoder"])
        if masker.mapping_encoder is not None:
            masker.mapping_encoder.load_state_dict(checkpoint["mapping_encoder"])
        optimizers = checkpoint["optimizers"]
        pre_opt.load_state_dict(optimizers["pretrain"])
        pre_sched.load_state_dict(optimizers["pretrain_schedule"])
        casm.load_state_dict(optimizers["casm"])
        casm.step_count = checkpoint["step"]
        _restore_rng(checkpoint["rng"], rng)
        if checkpoint["pool_file"]:
            casm.pool.load(load_file(run_dir / checkpoint["pool_file"])["snapshots"])
        phase, epoch = checkpoint["phase"], checkpoint["epoch"]
        if job.main:
            _trim_log(log_path, checkpoint["metrics"])
            console.print(f"resuming [bold]{run_dir}[/] at {phase} epoch {epoch + 1}")
    elif job.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        log_path.unlink(missing_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
        with log_path.open("a") as f:
            f.write(json.dumps({"phase": "baseline", **center_baseline(boxes, cfg.image_size)}))
            f.write("\n")

    model_spec = {
        "arch": cfg.arch,
        "width": cfg.width,
        "num_classes": len(info.wnids),
        "upsample": cfg.upsample,
        "image_size": cfg.image_size,
        "wnids": info.wnids,
        "names": info.names,
        "shared_encoder": not cfg.unshared,
        # what it learned from: `data synth`'s shapes (its synth.json) or a folder of images
        "data_kind": "synthetic" if (root / "synth.json").is_file() else "images",
    }

    def save(phase_: str, epoch_: int, metrics: dict) -> None:
        # The pool goes to a file named by the step, written before the checkpoint that names
        # it, so a kill at any point leaves a checkpoint and the pool of that same moment.
        pool_file = None
        if casm.pool.snapshots:
            pool_file = f"pool-{casm.step_count}.pt"
            save_atomic({"snapshots": casm.pool.on_cpu()}, run_dir / pool_file)
        save_atomic(
            {
                "format": FORMAT,
                "version": VERSION,
                "package_version": __version__,
                "model": model_spec,
                "config": config_to_dict(cfg),
                "phase": phase_,
                "epoch": epoch_,
                "step": casm.step_count,
                "encoder": masker.encoder.state_dict(),
                "decoder": masker.decoder.state_dict(),
                "mapping_encoder": (
                    None if masker.mapping_encoder is None else masker.mapping_encoder.state_dict()
                ),
                "optimizers": {
                    "pretrain": pre_opt.state_dict(),
                    "pretrain_schedule": pre_sched.state_dict(),
                    "casm": casm.state_dict(),
                },
                "pool_file": pool_file,
                "rng": _rng_state(rng),
                "metrics": metrics,
            },
            ckpt_path,
        )
        for old in run_dir.glob("pool-*.pt"):
            if old.name != pool_file:
                old.unlink()

    def end_epoch(phase_: str, done: int, total: int, then: str, started_at: float, train_metrics):
        """Validate, checkpoint (where to go on: the next epoch, or phase `then`), log.

        Rank 0 alone, with rank 0's training metrics (its shard); the others return None.
        """
        average_buffers(masker)  # the BatchNorm statistics of all the ranks' shards
        val = None
        if job.main:
            val = validate(masker, val_loader, boxes, cfg.image_size, cfg.fill)
            record = {"phase": phase_, "epoch": done, "seconds": time.time() - started_at}
            record |= train_metrics | val
            save(*((phase_, done) if done < total else (then, 0)), record)
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        barrier()
        return val

    started = time.time()
    with progress(disable=not job.main) as bars:
        if phase == "pretrain":
            for e in range(epoch, cfg.pretrain_epochs):
                pretrain_loader.set_epoch(e)
                t0 = time.time()
                title = f"pretrain {e + 1}/{cfg.pretrain_epochs}"
                train_metrics = _pretrain_epoch(
                    masker, pretrain_loader, pre_opt, pre_sched, casm, bars, title
                )
                train_metrics |= skipped_files(pretrain_loader, cfg.skip_bad_images)
                then = "casm" if cfg.casm_epochs else "done"
                val = end_epoch("pretrain", e + 1, cfg.pretrain_epochs, then, t0, train_metrics)
                if val is not None:
                    console.print(
                        f"{title}: train acc {train_metrics['train_acc']:.3f}, "
                        f"val acc {val['val_acc']:.3f}{skipped_note(train_metrics)}"
                    )
            phase, epoch = "casm", 0
        if phase == "casm":
            if epoch == 0 and masker.mapping_encoder is not None:
                # Unshared: the mapping's encoder starts as the classifier the phase starts from.
                masker.mapping_encoder.load_state_dict(masker.encoder.state_dict())
            for e in range(epoch, cfg.casm_epochs):
                casm.set_epoch_lr(e)
                casm_loader.set_epoch(1000 + e)  # other crops than the pre-training epochs
                t0 = time.time()
                title = f"CASM {cfg.reproduce} {e + 1}/{cfg.casm_epochs}"
                train_metrics = casm_epoch(casm, casm_loader, bars, title)
                train_metrics |= skipped_files(casm_loader, cfg.skip_bad_images)
                val = end_epoch("casm", e + 1, cfg.casm_epochs, "done", t0, train_metrics)
                if val is not None:
                    console.print(
                        f"{title}: val acc {val['val_acc']:.3f}, masked-out "
                        f"{val['val_acc_masked']:.3f}, area {val['val_mask_mean']:.3f}, "
                        f"LE {val['val_LE']:.3f}, F1 {val['val_F1']:.3f}"
                        f"{skipped_note(train_metrics)}"
                    )
    if job.main:
        console.print(f"done in {time.time() - started:.0f} s: {ckpt_path}")
        print_summary(log_path)
    return run_dir
