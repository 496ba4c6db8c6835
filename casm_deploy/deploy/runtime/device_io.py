"""Batches between the host and the device: uint8 images in, masks and logits back (masks
alone from a masks-only model: its logits are None).

open.open_model -> a backend (onnxruntime_backend, torch_backend) -> `submit(images)` -> here:
the images stacked into pinned buffers (`Staging`) and copied on a side stream (`DeviceIO`),
the outputs copied back to pinned memory -> `Pending.result()`, which waits for that copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

# One image of a batch: (S, S, 3) uint8 RGB, a numpy array or a torch tensor (from a GPU decoder).
Image = Any
# What a batch gives back: masks (B, S, S) and logits (B, K), None from a masks-only model.
Outputs = tuple[np.ndarray, np.ndarray | None]


class Pending:
    """A batch on its way through the model; `result()` waits for its masks and logits."""

    def __init__(self, finish: Callable[[], Outputs]):
        self._finish: Callable[[], Outputs] | None = finish
        self._result: Outputs | None = None

    @classmethod
    def done(cls, masks: np.ndarray, logits: np.ndarray | None) -> Pending:
        return cls(lambda: (masks, logits))

    def result(self) -> Outputs:
        """Masks (B, S, S), float32 in [0, 1] or uint8 (0-255) when asked, and logits (B, K),
        None for a masks-only model."""
        if self._finish is not None:
            self._result, self._finish = self._finish(), None
        assert self._result is not None
        return self._result


def masks_to_uint8(masks: torch.Tensor) -> torch.Tensor:
    """Float masks in [0, 1] -> uint8 levels, rounded as the PNG writer rounds on the host
    (`np.rint(mask * 255)`: a float32 product, then half to even)."""
    return masks.float().mul(255).round_().clamp_(0, 255).to(torch.uint8)


def stack_host(images: Sequence[Image]) -> np.ndarray:
    """A host batch (B, S, S, 3) from images given as arrays or tensors."""
    if isinstance(images, np.ndarray):
        return images
    return np.stack([np.asarray(i.cpu() if isinstance(i, torch.Tensor) else i) for i in images])


class Staging:
    """Host buffers for uint8 batches, used in turn: while the device copies batch N from one,
    batch N+1 is stacked into the other. A buffer is refilled only after the copy that last
    read it has finished (its event). Pinned where there is CUDA: only pinned memory is copied
    to the device without blocking the host."""

    def __init__(self, shape: tuple[int, ...], pin: bool, slots: int = 2):
        self.shape, self.pin = shape, pin
        self.buffers = [self._buffer(shape[0]) for _ in range(slots)]
        self.copies: list[Any] = [None] * slots  # the event of the copy that last read each
        self.turn = 0

    def _buffer(self, batch: int) -> torch.Tensor:
        return torch.empty((batch, *self.shape[1:]), dtype=torch.uint8, pin_memory=self.pin)

    def fill(self, images: Sequence[Image]) -> tuple[torch.Tensor, int]:
        """The next buffer, holding `images` in its first rows, and its slot number."""
        slot, self.turn = self.turn, (self.turn + 1) % len(self.buffers)
        if self.copies[slot] is not None:
            self.copies[slot].synchronize()
            self.copies[slot] = None
        if len(images) > len(self.buffers[slot]):  # a larger batch than planned (the API)
            self.buffers[slot] = self._buffer(len(images))
        host = self.buffers[slot][: len(images)]
        np.stack([np.asarray(i) for i in images], out=host.numpy())
        return host, slot

    def copied(self, slot: int, event: Any) -> None:
        """`event` marks the end of the copy that reads the buffer of `slot`."""
        self.copies[slot] = event


class DeviceIO:
    """Batches into and out of a CUDA device without blocking the calling thread."""

    def __init__(self, device: torch.device, batch: int, size: int):
        self.device = device
        self.staging = Staging((batch, size, size, 3), pin=True)
        self.copy_stream = torch.cuda.Stream(device)

    def to_device(self, images: Sequence[Image]) -> torch.Tensor:
        """The (B, S, S, 3) uint8 batch on the device, ready for the current stream's kernels.

        Host images are stacked into a pinned buffer and copied on the side stream; the
        current stream waits for that copy (an event), the host does not. Images decoded on the
        device are stacked there.
        """
        compute = torch.cuda.current_stream(self.device)
        if any(isinstance(i, torch.Tensor) and i.is_cuda for i in images):
            tensors = []
            for image in images:
                tensor = torch.as_tensor(image)
                if tensor.is_cuda:  # made on a decoder's stream: keep it until compute ran
                    tensor.record_stream(compute)
                tensors.append(tensor.to(self.device))
            return torch.stack(tensors)
        host, slot = self.staging.fill(images)
        with torch.cuda.stream(self.copy_stream):
            batch = host.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.copy_stream)
        self.staging.copied(slot, copied)
        compute.wait_event(copied)
        batch.record_stream(compute)  # allocated on the side stream, used on this one
        return batch

    def to_host(
        self, masks: torch.Tensor, logits: torch.Tensor | None, uint8_masks: bool
    ) -> Pending:
        """(B, S, S) masks and (B, K) logits (None: a masks-only model) on the device -> a
        Pending of numpy arrays, copied into pinned memory on the current stream (torch caches
        pinned blocks between batches)."""
        masks = masks_to_uint8(masks) if uint8_masks else masks.float()
        host_masks = torch.empty(masks.shape, dtype=masks.dtype, pin_memory=True)
        host_masks.copy_(masks, non_blocking=True)
        host_logits = None
        if logits is not None:
            host_logits = torch.empty(logits.shape, dtype=torch.float32, pin_memory=True)
            host_logits.copy_(logits.float(), non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def finish() -> Outputs:
            done.synchronize()
            return host_masks.numpy(), None if host_logits is None else host_logits.numpy()

        return Pending(finish)
