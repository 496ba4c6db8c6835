"""The CASM mapping that is trained and exported: the SaliencyModel and `build_masker`.

The SaliencyModel joins `encoder.Encoder` (the classifier) and `decoder.Decoder`: images in
[0, 1] -> (masks, logits), with the ImageNet normalisation inside the graph. Checkpoints hold its
`encoder`, `decoder` (and `mapping_encoder`) state dicts; `export` writes it as it is.
"""

from __future__ import annotations

import torch
from torch import nn

from casm_deploy.models.decoder import Decoder
from casm_deploy.models.encoder import Encoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SaliencyModel(nn.Module):
    """Images (B, 3, H, W) in [0, 1], RGB -> (masks (B, 1, H, W) in [0, 1], logits (B, K)).

    The mapping m_phi of the paper: the classifier's encoder (weights shared) and the decoder,
    which reads the features detached so the mapping's loss never changes the encoder. With a
    `mapping_encoder` (the paper's unshared rows, Table 2 (i)-(k)) the decoder reads that
    encoder's features instead, and the classifier only gives the logits.
    """

    def __init__(self, encoder: Encoder, decoder: Decoder, mapping_encoder: Encoder | None = None):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.mapping_encoder = mapping_encoder
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalize(images)
        logits, features = self.encoder(x)
        if self.mapping_encoder is not None:
            _, features = self.mapping_encoder(x)
        masks = self.decoder([f.detach() for f in features], size=images.shape[-2:])
        return masks, logits


def build_masker(
    arch: str,
    num_classes: int,
    width: int = 64,
    upsample: str = "nearest",
    shared_encoder: bool = True,
) -> SaliencyModel:
    """A SaliencyModel of random weights (a mapping encoder of its own unless `shared_encoder`)."""
    encoder = Encoder(arch, num_classes=num_classes, width=width)
    mapping_encoder = None if shared_encoder else Encoder(arch, num_classes, width=width)
    decoder = Decoder(encoder.feature_channels, upsample=upsample)
    return SaliencyModel(encoder, decoder, mapping_encoder)
