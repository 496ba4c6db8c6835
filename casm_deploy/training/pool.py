"""The thinning pool (the set F of Algorithm 1): classifier snapshots that the masked pass draws.

`casm.CASM` stores a snapshot of the classifier every `smf` steps and, with probability hp,
runs the masked-out images through a random one instead of the current classifier. The
snapshots go into every checkpoint (`pool-<step>.pt`, `checkpoint.save_training`).
"""

from __future__ import annotations

import random

import torch
from torch import nn


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
