"""One CASM step (Algorithm 1): the classifier's steps, the mask, the masked-out pass and the
mapping's step; `CASM` holds the phase's model, optimisers, gradient scaler and thinning pool,
set up by its `StepSettings`.

`train.step_settings` makes the settings from a run's TrainConfig, `train.casm_one_epoch` runs
the step over an epoch, and `train.TrainState` saves and restores it.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from casm_deploy.models.backbones import is_head
from casm_deploy.models.mapping import SaliencyModel
from casm_deploy.training.amp import amp_dtype, autocast
from casm_deploy.training.distributed import average_buffers, average_gradients
from casm_deploy.training.pool import ThinningPool, pool_storage


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


def masked_out(
    masker: SaliencyModel, images: torch.Tensor, masks: torch.Tensor, fill: str
) -> torch.Tensor:
    """The classifier's (normalised) input for the masked-out images x * (1 - m).

    `black`: masked pixels become 0 in [0, 1]; `mean`: they become the ImageNet mean colour, as
    in the reference's training, which multiplies the normalised image by (1 - m).
    """
    if fill == "mean":
        return masker.normalize(images) * (1 - masks)
    return masker.normalize(images * (1 - masks))


@dataclass(frozen=True)
class StepSettings:
    """What the CASM phase needs to know, and nothing of the run around it: the two optimisers,
    the thinning strategy with the preset already resolved, the masked-out images, the mapping's
    loss and the precision.

    `train.step_settings` makes it from a run's TrainConfig (its preset resolved there, once);
    the defaults are that of `train`'s defaults (preset L100), which a test checks.
    """

    # the classifier's SGD and the mapping's Adam; both LRs decay x0.1 every `lr_decay_every`
    # epochs (`CASM.set_epoch_lr`)
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 1e-4  # both optimisers'
    lr_decoder: float = 1e-3
    lr_decay_every: int = 8
    grad_clip: float = 10.0  # the mapping's gradient norm
    # the thinning strategy (config.PRESETS): a fixed classifier (Baseline F) never trains and
    # draws no snapshot; otherwise the masked pass draws one with probability `hp`, stored
    # every `smf` steps (None: only the first) in a pool of `pool_size`
    fixed_classifier: bool = False
    hp: float = 0.5
    smf: int | None = 100
    pool_size: int = 30
    pool_device: Literal["auto", "device", "pinned"] = "auto"  # pool.pool_storage
    fill: Literal["black", "mean"] = "black"  # the masked-out pixels (`masked_out`)
    score: Literal["entropy", "classification"] = "entropy"  # `mapping_loss`'s
    lambda_r: float = 2.5  # the area term's weight
    amp: Literal["off", "bf16", "fp16"] = "off"


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
    """The state of the CASM phase: SaliencyModel, optimisers, thinning pool, and the step counter.

    With `settings.amp` the forward passes run under autocast and the losses in fp32; the weights,
    the optimiser states and the pool snapshots stay fp32. fp16 adds a gradient scaler
    (`self.scaler`, disabled otherwise, so the fp32 step is exactly the plain one). A step
    never waits for the GPU: on CUDA, and wherever the scaler is on, the optimisers are the
    fused ones, which skip a step with inf gradients on the device (the others make the scaler
    read `found_inf` on the host at every step).
    """

    def __init__(self, masker: SaliencyModel, settings: StepSettings, rng: random.Random):
        self.masker, self.settings = masker, settings
        device_type = masker.mean.device.type
        self.amp_dtype = amp_dtype(settings.amp, device_type)
        self.scaler = torch.amp.GradScaler(device_type, enabled=settings.amp == "fp16")
        self.trainable = not settings.fixed_classifier
        self.fused = device_type == "cuda" or self.scaler.is_enabled()
        fused = self.fused or None  # None: torch's default (foreach) elsewhere
        encoder_params = list(masker.encoder.parameters())
        self.opt_classifier = torch.optim.SGD(
            encoder_params,
            lr=settings.lr,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
            fused=fused,
        )
        # The mapping's parameters: the decoder, and its own encoder when unshared (not the
        # head, which the mapping never reads).
        self.mapping_params = list(masker.decoder.parameters())
        own = masker.mapping_encoder
        if own is not None:
            self.mapping_params += [
                p for n, p in own.named_parameters() if not is_head(own.arch, n)
            ]
        self.opt_decoder = torch.optim.Adam(
            self.mapping_params,
            lr=settings.lr_decoder,
            weight_decay=settings.weight_decay,
            fused=fused,
        )
        hp = settings.hp if self.trainable else 0.0
        storage, pinned = pool_storage(
            settings.pool_device, masker.mean.device, settings.pool_size, masker.encoder
        )
        self.pool = ThinningPool(settings.pool_size, settings.smf, hp, rng, storage, pinned)
        self._pool_model: nn.Module | None = None
        self.step_count = 0

    def set_epoch_lr(self, epoch: int) -> None:
        settings = self.settings
        decay = 0.1 ** (epoch // settings.lr_decay_every)
        for group in self.opt_classifier.param_groups:
            group["lr"] = settings.lr * decay
        for group in self.opt_decoder.param_groups:
            group["lr"] = settings.lr_decoder * decay

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
        masker, settings = self.masker, self.settings
        encoder, decoder = masker.encoder, masker.decoder
        encoder.train(self.trainable)
        decoder.train()
        # Forward passes under autocast (a no-op in fp32), losses in fp32.
        amp = autocast(images.device.type, self.amp_dtype)

        # 1. The classifier on clean images, and its SGD step.
        logits, features, loss_clean = self._classifier_step(images, labels, amp)

        # 2. The thinning pool keeps snapshots of the classifier just updated.
        if self.pool.should_store(self.step_count):
            average_buffers(encoder)  # every rank stores the same snapshot
            self.pool.store(encoder)

        # 3. The mask from the detached features (or, unshared, from the mapping's own encoder,
        # which the mapping loss trains), and the masked-out images.
        masks = self._masks(images, features, amp)
        masked_input = masked_out(masker, images, masks, settings.fill)

        # 4. The classifier of the masked pass: a snapshot with probability hp, else the current.
        # The draw comes from an RNG seeded alike on every rank, so all ranks run the same graph.
        index = self.pool.draw()
        classifier = encoder if index is None else self.pool_classifier(index)
        with amp:
            masked_logits, _ = classifier(masked_input)
        masked_logits = masked_logits.float()
        loss_masked = F.cross_entropy(masked_logits, labels)
        loss_map = mapping_loss(
            logits.detach(), masked_logits, labels, masks, settings.lambda_r, settings.score
        )

        # 5. The classifier's step on the masked-out loss and the decoder's on the mapping loss.
        self._masked_steps(loss_masked, loss_map, current=index is None)
        self.step_count += 1

        return StepOutput(
            loss_clean=loss_clean.detach(),
            loss_masked=loss_masked.detach(),
            loss_mapping=loss_map.detach(),
            correct=logits.argmax(1).eq(labels).sum(),
            correct_masked=masked_logits.argmax(1).eq(labels).sum(),
            masks=masks.detach(),
        )

    def _classifier_step(self, images: torch.Tensor, labels: torch.Tensor, amp):
        """The classifier on clean images and, when it trains, its SGD step: (logits as fp32,
        features, the clean loss)."""
        masker, scaler, encoder = self.masker, self.scaler, self.masker.encoder
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
        return logits, features, loss_clean

    def _masks(self, images: torch.Tensor, features: list[torch.Tensor], amp) -> torch.Tensor:
        """The decoder's masks (fp32) from the classifier's detached features, or, unshared,
        from the mapping's own encoder."""
        masker = self.masker
        if masker.mapping_encoder is None:
            mapping_features = [f.detach() for f in features]
        else:
            masker.mapping_encoder.train()
            with amp:
                mapping_features = masker.mapping_encoder.feature_maps(masker.normalize(images))
        with amp:
            masks = masker.decoder(mapping_features, size=images.shape[-2:])
        return masks.float()

    def _masked_steps(
        self, loss_masked: torch.Tensor, loss_map: torch.Tensor, current: bool
    ) -> None:
        """All gradients first, then the steps: the classifier's on the masked-out loss (Eq. 8),
        when the masked pass ran the `current` classifier (not a snapshot), and the decoder's on
        the mapping loss.

        The decoder's gradient is taken for the decoder alone, so the mapping loss never moves
        the encoder. Under fp16 each loss is scaled, and the gradients are unscaled before the
        clipping.
        """
        scaler, encoder = self.scaler, self.masker.encoder
        decoder_params = [p for p in self.mapping_params if p.requires_grad]
        update_classifier = self.trainable and current
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
        nn.utils.clip_grad_norm_(decoder_params, self.settings.grad_clip)
        scaler.step(self.opt_decoder)
        scaler.update()

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
