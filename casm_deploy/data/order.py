"""Which samples an epoch reads, in which order, and which of them each process reads.

Every loader's order: the torch loader (`torch_loader.TorchLoader`) and DALI's
(`dali.DALILoader`) take the same list from `epoch_order` and split it with `shard_bounds`, so
both see the same samples in the same order, and resuming at an epoch rewinds exactly.
"""

from __future__ import annotations

import torch


def epoch_order(
    n: int, *, shuffle: bool, seed: int, epoch: int, fraction: float = 1.0, multiple: int = 1
) -> list[int]:
    """The sample indices of one epoch over all shards, in loading order (every loader's order).

    Shuffled: a permutation seeded by (seed, epoch), cut to `fraction` of the samples, then to a
    multiple of `multiple` (the number of shards, when the last batch is dropped, so that every
    shard gets as many batches). Not shuffled: 0..n-1.
    """
    if not shuffle:
        return list(range(n))
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    keep = max(1, int(n * fraction))
    if keep >= multiple:
        keep -= keep % multiple
    return order[:keep]


def shard_bounds(n: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """The `[start, end)` block of an n-sample list that shard `shard_id` reads.

    Contiguous blocks, split as DALI's file reader splits its list, so both loaders shard alike.
    """
    return n * shard_id // num_shards, n * (shard_id + 1) // num_shards
