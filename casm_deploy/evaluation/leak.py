"""The leak control of the many-classifiers test (§3.3, Fig. 3): can the mask's outline alone
tell the class?

Near-chance accuracy on masked-out images is read as "the mask removed all the evidence"; but
the hole itself may give the class away (a star-shaped hole says "star"). So we train a fresh
classifier on the binarised masks alone, no image, and compare its validation accuracy to chance.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from casm_deploy.common import ui
from casm_deploy.data.loader import build_loader
from casm_deploy.evaluation.masking import binarize
from casm_deploy.models.encoder import Encoder


@torch.no_grad()
def binary_masks(masker, loader, device, bars=None, task=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The binarised masks (N,1,S,S) uint8 on the CPU and the labels (N,) of a loader's images."""
    masks, labels = [], []
    for images, y, _ in loader:
        soft, _ = masker(images.to(device))
        masks.append(binarize(soft).to("cpu", torch.uint8))  # uint8: 10k masks of 64x64 = 40 MB
        labels.append(y)
        if bars is not None:
            bars.advance(task)
    return torch.cat(masks), torch.cat(labels)


def mask_only_accuracy(
    masker,
    data: str | Path,
    wnids: list[str],
    image_size: int,
    *,
    policy: str = "center-crop",
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 2e-3,
    width: int = 16,
    seed: int = 0,
    limit: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Top-1 accuracy of a ResNet-18 trained on `masker`'s binary masks only, against chance.

    The masks of both splits come from un-augmented images (resize + `policy`); the mask-only
    classifier sees each mask repeated to 3 channels, with random horizontal flips as its only
    augmentation. Deterministic for a fixed `seed` on a given device. `limit` keeps the first N
    images of each split, which are sorted by class: it can drop whole classes.

    Returns:
        {"accuracy": top-1 on the val masks, "chance": the larger of 1/len(wnids) and the
        frequency of the most common val class (what always guessing one class gets),
        "n_train", "n_val": mask counts, "epochs"}.
    """
    device = next((p.device for p in masker.parameters()), torch.device("cpu"))
    loaders = split_loaders(data, wnids, image_size, batch_size, policy, limit, workers)
    train_steps = -(-len(loaders["train"].samples) // batch_size)

    masker.eval()
    with ui.progress(disable=not progress, transient=True) as bars:
        task = bars.add_task(
            "masks", total=sum(len(loader) for loader in loaders.values()), info=""
        )
        x_train, y_train = binary_masks(masker, loaders["train"], device, bars, task)
        x_val, y_val = binary_masks(masker, loaders["val"], device, bars, task)

        torch.manual_seed(seed)  # the classifier's init
        model = Encoder("resnet18", num_classes=len(wnids), width=width).to(device)
        task = bars.add_task("mask-only classifier", total=epochs * train_steps, info="")
        train_on_masks(model, x_train, y_train, device, epochs, batch_size, lr, seed, bars, task)

    correct = count_correct(model, x_val, y_val, device, batch_size)
    # Always guessing the most common class beats 1/K on an unbalanced val split.
    majority = torch.bincount(y_val, minlength=len(wnids)).max().item() / len(y_val)
    return {
        "accuracy": correct / len(y_val),
        "chance": max(1 / len(wnids), majority),
        "n_train": len(x_train),
        "n_val": len(x_val),
        "epochs": epochs,
    }


def split_loaders(
    data: str | Path,
    wnids: list[str],
    image_size: int,
    batch_size: int,
    policy: str,
    limit: int,
    workers: int,
) -> dict:
    """The loaders of the train and val splits, both un-augmented: the masks the test would see."""
    return {
        split: build_loader(
            data,
            split,
            wnids,
            image_size,
            batch_size,
            train=False,
            workers=workers,
            policy=policy,
            limit=limit,
        )
        for split in ("train", "val")
    }


def train_on_masks(model, x, y, device, epochs, batch_size, lr, seed, bars, task) -> None:
    """Train `model` with Adam on the binary masks `x` (N,1,S,S) uint8 repeated to 3 channels,
    flipped at random, of labels `y`; `seed` orders the batches and draws the flips."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)  # batch order and flips
    model.train()
    with torch.enable_grad():  # callers may run under no_grad (eval does)
        for _ in range(epochs):
            for batch in torch.randperm(len(x), generator=generator).split(batch_size):
                flip = torch.rand(len(batch), generator=generator) < 0.5
                images = x[batch].float()
                images = torch.where(flip[:, None, None, None], images.flip(3), images)
                images = images.expand(-1, 3, -1, -1)
                bars.advance(task)
                if len(batch) < 2:  # BatchNorm cannot train on a single sample
                    continue
                logits, _ = model(images.to(device))
                loss = F.cross_entropy(logits, y[batch].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bars.update(task, info=f"loss {loss.item():.3f}")


@torch.no_grad()
def count_correct(model, x, y, device, batch_size: int) -> int:
    """How many of the masks `x` (N,1,S,S) `model` classifies as their labels `y`, in eval mode."""
    model.eval()
    correct = 0
    for batch in torch.arange(len(x)).split(batch_size):
        logits, _ = model(x[batch].float().expand(-1, 3, -1, -1).to(device))
        correct += (logits.argmax(1).cpu() == y[batch]).sum().item()
    return correct


__all__ = ["binary_masks", "count_correct", "mask_only_accuracy", "split_loaders", "train_on_masks"]
