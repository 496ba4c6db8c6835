"""The CASM mapping that is trained and exported: the SaliencyModel, its masks-only part, and
`build_masker`.

The SaliencyModel joins an encoder (the classifier, `encoder.build_encoder`) and
`decoder.Decoder`: images in [0, 1] -> (masks, logits), with the ImageNet normalisation inside
the graph. Checkpoints hold its `encoder`, `decoder` (and `mapping_encoder`) state dicts;
`export` writes it as it is, or, with an encoder of the mapping's own, its `MaskMapping` alone.
"""

from __future__ import annotations

import torch
from torch import nn

from casm_deploy.errors import UserError
from casm_deploy.models.decoder import Decoder
from casm_deploy.models.encoder import build_encoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """Images in [0, 1] -> ImageNet-normalised images (the constants are buffers, not weights)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std


class SaliencyModel(Normalize):
    """Images (B, 3, H, W) in [0, 1], RGB -> (masks (B, 1, H, W) in [0, 1], logits (B, K)).

    The mapping m_phi of the paper: the classifier's encoder (weights shared) and the decoder,
    which reads the features detached so the mapping's loss never changes the encoder. With a
    `mapping_encoder` (the paper's unshared rows, Table 2 (i)-(k), or an encoder of another
    arch and width, `train --mapping-arch`) the decoder reads that encoder's features instead,
    and the classifier only gives the logits.
    """

    def __init__(
        self, encoder: nn.Module, decoder: Decoder, mapping_encoder: nn.Module | None = None
    ):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.mapping_encoder = mapping_encoder

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalize(images)
        logits, features = self.encoder(x)
        if self.mapping_encoder is not None:
            features = self.mapping_encoder.feature_maps(x)
        masks = self.decoder([f.detach() for f in features], size=images.shape[-2:])
        return masks, logits

    def masks_only(self) -> MaskMapping:
        """The mapping without the classifier (sharing this model's modules).

        Raises:
            UserError: the mapping reads the classifier's features (a shared encoder).
        """
        if self.mapping_encoder is None:
            raise UserError(
                "this mapping shares the classifier's encoder, so a mask needs the classifier; "
                "masks-only models come from runs trained with --mapping-arch or --unshared"
            )
        return MaskMapping(self.mapping_encoder, self.decoder)


class MaskMapping(Normalize):
    """Images (B, 3, H, W) in [0, 1] -> masks (B, 1, H, W): a mapping of its own, no classifier."""

    def __init__(self, encoder: nn.Module, decoder: Decoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.encoder.feature_maps(self.normalize(images))
        return self.decoder(features, size=images.shape[-2:])


def build_masker(
    arch: str,
    num_classes: int,
    width: int = 64,
    upsample: str = "nearest",
    shared_encoder: bool = True,
    mapping_arch: str | None = None,
    mapping_width: int | None = None,
) -> SaliencyModel:
    """A SaliencyModel of random weights; unless `shared_encoder`, the mapping has an encoder of
    its own, of `mapping_arch` at `mapping_width` (default: the classifier's)."""
    encoder = build_encoder(arch, num_classes, width)
    if shared_encoder:
        if mapping_arch is not None or mapping_width is not None:
            raise UserError("a mapping arch or width needs an encoder of the mapping's own")
        return SaliencyModel(encoder, Decoder(encoder.feature_channels, upsample=upsample))
    mapping_encoder = build_encoder(
        mapping_arch or arch, num_classes, width if mapping_width is None else mapping_width
    )
    decoder = Decoder(mapping_encoder.feature_channels, upsample=upsample)
    return SaliencyModel(encoder, decoder, mapping_encoder)
