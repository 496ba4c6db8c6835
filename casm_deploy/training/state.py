"""What a training run carries from one epoch to the next, saved and restored whole.

`train.run` builds a `TrainState`, the phases move it on, and at every epoch end
`TrainState.checkpoint` gives `checkpoint.save_training` all of it; `--resume` reads it back
with `checkpoint.load_training` and `TrainState.restore`, so resuming restores exactly what
saving saved: the models, the optimisers and the schedule, the gradient scaler, the thinning
pool, the step counter, both RNGs, and where the run goes on (phase, epoch).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from casm_deploy.checkpoint import TrainingCheckpoint
from casm_deploy.config import TrainConfig
from casm_deploy.models.mapping import SaliencyModel
from casm_deploy.training.casm import CASM


@dataclass
class TrainState:
    """The models, optimisers, pool, step, RNGs and position of a run."""

    masker: SaliencyModel
    casm: CASM  # the CASM phase's optimisers, gradient scaler, thinning pool and step counter
    pretrain_optimizer: torch.optim.Optimizer
    pretrain_schedule: torch.optim.lr_scheduler.LRScheduler
    rng: random.Random  # the pool's RNG: the same draws on every rank
    phase: str = "pretrain"  # where the run goes on: pretrain, casm or done
    epoch: int = 0  # the epochs of `phase` done

    def checkpoint(
        self, model: dict[str, Any], config: dict[str, Any], metrics: dict[str, Any]
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
        """Take back everything `checkpoint` saved (every rank loads the same checkpoint)."""
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


def build_state(
    masker: SaliencyModel, casm: CASM, cfg: TrainConfig, pretrain_steps: int, rng: random.Random
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
    return TrainState(masker, casm, optimizer, schedule, rng, phase=phase, epoch=0)
