"""The torch loader: decoded, resized images from an ImageNet-layout list, in DataLoader
workers.

It yields `(images, labels, indices)` with images float in [0, 1], (B, 3, S, S), channels-last;
`loader.build_loader` builds it (or DALI's loader instead). Files are read and decoded by
`decode.decode_image`; the loader only resizes (`transforms.py`): the normalisation lives
inside the Masker.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from casm_deploy.data.decode import decode_image
from casm_deploy.data.order import epoch_order, shard_bounds
from casm_deploy.data.transforms import (
    RRC_SCALE,
    TRAIN_RESIZES,
    center_crop,
    random_resized_crop,
    resize_shorter,
    stretch,
    validation_policy,
)
from casm_deploy.errors import UserError


class ImageDataset(Dataset):
    """Decoded, resized uint8 (S, S, 3) images with their labels and indices.

    Training: shorter side to S, random S x S crop, random horizontal flip; with the
    `random-resized-crop` policy, a RandomResizedCrop(S, scale=(crop_scale, 1)) and the flip.
    Validation: shorter side to S and the centre crop. With the `stretch` policy, the whole
    image goes to S x S in training too, with no crop and no flip. The randomness of a sample
    depends only on (seed, epoch, index), so runs are reproducible whatever the number of
    workers, and resumable.
    """

    def __init__(
        self,
        samples: list[tuple[Path, int]],
        size: int,
        train: bool,
        seed: int = 0,
        policy: str = "center-crop",
        crop_scale: float = RRC_SCALE[0],
    ):
        self.samples, self.size, self.train, self.seed = samples, size, train, seed
        self.crop_scale = (crop_scale, 1.0)  # random-resized-crop's area shares
        if policy not in TRAIN_RESIZES:
            raise UserError(f"unknown resize policy {policy!r}: use {', '.join(TRAIN_RESIZES)}")
        self.policy = policy if train else validation_policy(policy)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, int]:
        path, label = self.samples[index]
        image = decode_image(path)
        if self.policy == "stretch":
            # Training as well: no crop and no flip, so the left/right layout of two-copies
            # images (synth --copies 2) survives; a flip would swap the copies.
            return stretch(image, self.size), label, index
        if not self.train:
            return center_crop(resize_shorter(image, self.size), self.size), label, index
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.policy == "random-resized-crop":
            image = random_resized_crop(image, self.size, rng, self.crop_scale)
        else:
            image = resize_shorter(image, self.size)
            h, w = image.shape[:2]
            top, left = rng.integers(0, h - self.size + 1), rng.integers(0, w - self.size + 1)
            image = image[top : top + self.size, left : left + self.size]
        if rng.random() < 0.5:
            image = image[:, ::-1]
        return np.ascontiguousarray(image), label, index


# --skip-bad-images skips at most this many files in a row: past that the data set is broken,
# not a few of its files.
MAX_SKIPPED_IN_A_ROW = 100


class CheckedDataset(Dataset):
    """An ImageDataset whose files that do not decode come back as problems, not exceptions.

    A DataLoader worker's exception reaches the main process wrapped in the worker's traceback,
    many lines long; returned as data, TorchLoader raises it there as the one-line UserError it
    is, whatever the number of workers. With `skip`, a bad file is replaced by the next sample
    that decodes, so batches keep their size and every shard its number of batches.
    Items: `(image, label, index, problems)`, the problems the bad files' messages, one a line
    ("" when none); index -1 when no file decoded (the image and label are then placeholders).
    """

    def __init__(self, dataset: ImageDataset, skip: bool = False):
        self.dataset, self.skip = dataset, skip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, int, str]:
        n, problems = len(self.dataset), []
        for k in range(min(n, MAX_SKIPPED_IN_A_ROW + 1) if self.skip else 1):
            try:
                image, label, got = self.dataset[(index + k) % n]
                return image, label, got, "\n".join(problems)
            except UserError as error:
                problems.append(str(error))
        size = self.dataset.size
        return np.zeros((size, size, 3), np.uint8), 0, -1, "\n".join(problems)


class TorchLoader:
    """Iterates `(images, labels, indices)` batches from an ImageDataset.

    Images are float in [0, 1], (B, 3, S, S) in channels-last memory, and labels int64, both on
    `device`; indices stay on the CPU. The decoded batch is NHWC uint8: it crosses to a GPU as
    uint8 (4x fewer bytes than float) from pinned memory without blocking, and becomes float
    there; its NCHW view is channels-last without a copy.

    A file that does not decode raises a UserError naming it; with `skip_bad`, it is replaced
    by the next sample that decodes (`CheckedDataset`) and listed in `bad_files` (the messages
    of the files skipped in the last pass, each once).
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        shuffle: bool,
        workers: int,
        fraction: float = 1.0,
        drop_last: bool = False,
        shard_id: int = 0,
        num_shards: int = 1,
        device: str | torch.device = "cpu",
        skip_bad: bool = False,
    ):
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.workers, self.fraction, self.drop_last = workers, fraction, drop_last
        self.shard_id, self.num_shards = shard_id, num_shards
        self.device = torch.device(device)
        self.skip_bad = skip_bad
        self.bad_files: list[str] = []

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = epoch

    @property
    def samples(self) -> list[tuple[Path, int]]:
        return self.dataset.samples

    def indices(self) -> list[int]:
        """This epoch's sample indices for this shard, in loading order."""
        order = epoch_order(
            len(self.dataset),
            shuffle=self.shuffle,
            seed=self.dataset.seed,
            epoch=self.dataset.epoch,
            fraction=self.fraction,
            multiple=self.num_shards if self.drop_last else 1,
        )
        start, end = shard_bounds(len(order), self.shard_id, self.num_shards)
        return order[start:end]

    def __len__(self) -> int:
        n = len(self.indices())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        loader = DataLoader(
            CheckedDataset(self.dataset, self.skip_bad),
            batch_size=self.batch_size,
            sampler=self.indices(),
            num_workers=self.workers,
            drop_last=self.drop_last,
            prefetch_factor=4 if self.workers else None,
            pin_memory=self.device.type == "cuda",
        )
        self.bad_files = []
        for images, labels, indices, problems in loader:
            self._check(indices, problems)
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            images = images.permute(0, 3, 1, 2).float().div_(255)  # NHWC uint8 -> NCHW view
            yield images, labels, indices

    def _check(self, indices: torch.Tensor, problems: list[str]) -> None:
        """Raise the batch's first bad file as a UserError, or (`skip_bad`) list its bad files."""
        for index, problem in zip(indices.tolist(), problems, strict=True):
            if not problem:
                continue
            lines = problem.splitlines()
            if not self.skip_bad:
                raise UserError(lines[0])
            if index < 0:
                raise UserError(f"{lines[0]}, and the {len(lines) - 1} files after it too")
            self.bad_files += [line for line in lines if line not in self.bad_files]
