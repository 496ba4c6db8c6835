"""One epoch of each phase, validation, and what the run prints of them.

`train.run` calls `pretrain_one_epoch` (the classifier on clean images) or `casm_one_epoch`
(`casm.CASM.step` over the epoch), then `evaluate` on the validation set at every epoch end
(rank 0), prints `epoch_line`, and at the end `print_summary`'s table. The training figures
are summed on the device and read by the host only every PROGRESS_EVERY steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from casm_deploy.common.ui import console
from casm_deploy.evaluation.localisation import score_masks
from casm_deploy.evaluation.metrics import LocalizationMeter, MaskStats
from casm_deploy.models.mapping import SaliencyModel
from casm_deploy.training.amp import autocast
from casm_deploy.training.casm import CASM, masked_out
from casm_deploy.training.distributed import average_gradients, gather_lists

# The progress bar's figures are read from the device every this many steps (a host sync):
# every step would make the GPU wait for the host each time.
PROGRESS_EVERY = 20


def pretrain_one_epoch(
    masker: SaliencyModel, loader, optimizer, scheduler, casm: CASM, bars, description: str
) -> dict:
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


def casm_one_epoch(casm: CASM, loader, bars, description: str) -> dict:
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


def epoch_line(phase: str, title: str, train_metrics: dict, val: dict) -> str:
    """The line printed at an epoch's end: its validation figures (and its skipped files)."""
    if phase == "pretrain":
        return (
            f"{title}: train acc {train_metrics['train_acc']:.3f}, "
            f"val acc {val['val_acc']:.3f}{skipped_note(train_metrics)}"
        )
    return (
        f"{title}: val acc {val['val_acc']:.3f}, masked-out "
        f"{val['val_acc_masked']:.3f}, area {val['val_mask_mean']:.3f}, "
        f"LE {val['val_LE']:.3f}, F1 {val['val_F1']:.3f}"
        f"{skipped_note(train_metrics)}"
    )


def skipped_files(loader, enabled: bool) -> dict:
    """With --skip-bad-images, the epoch's skipped files over all the ranks, for its log line:
    `train_skipped` (how many) and `train_skipped_files` (their messages); {} without."""
    if not enabled:
        return {}
    bad = sorted(set(gather_lists(loader.bad_files)))
    return {"train_skipped": len(bad), "train_skipped_files": bad}


def skipped_note(train_metrics: dict) -> str:
    """The end of an epoch's printed line: how many bad files it skipped, if any."""
    n = train_metrics.get("train_skipped", 0)
    return f", skipped {n} bad image{'s' if n > 1 else ''} (metrics.jsonl lists them)" if n else ""


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
