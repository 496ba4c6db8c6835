"""The decoder of the mapping: the encoder's feature maps -> a mask in [0, 1].

`mapping.SaliencyModel` feeds it an encoder's feature maps [stem, s4, s8, s16, s32] (a ResNet's
[s0, l1, l2, l3, l4]), detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from casm_deploy.errors import UserError


class Decoder(nn.Module):
    """Feature maps -> mask (B, 1, H, W) in [0, 1], as ARCHITECTURE.md ("The method") says.

    Each of l1..l4: 1x1 conv to 64 channels (no bias) -> BatchNorm -> ReLU -> bilinear upsample
    to s0's size; concatenate with s0 -> 3x3 conv to one channel -> sigmoid -> upsample to H x W
    (nearest as the reference code, or bilinear as the paper's text). The maps meet at stride 4,
    l1's size: a ResNet's s0 is there already, a stem at stride 2 (MobileNet, EfficientNet,
    RegNet) is resized to it, which keeps the final conv as cheap as a ResNet's.
    """

    def __init__(self, feature_channels: list[int], channels: int = 64, upsample: str = "nearest"):
        super().__init__()
        if upsample not in ("nearest", "bilinear"):
            raise UserError(f"decoder upsample must be nearest or bilinear, not {upsample!r}")
        self.upsample = upsample
        self.lateral = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c, channels, kernel_size=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            )
            for c in feature_channels[1:]
        )
        self.final = nn.Conv2d(feature_channels[0] + 4 * channels, 1, kernel_size=3, padding=1)
        for m in self.modules():  # the reference's init: He normal on convs, BN 1/0
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Feature maps [s0, l1, l2, l3, l4] and the image size (H, W) -> masks (B, 1, H, W)."""
        at = features[1].shape[-2:]  # stride 4
        maps = [features[0]] + [
            lateral(f) for lateral, f in zip(self.lateral, features[1:], strict=True)
        ]
        maps = [
            m if m.shape[-2:] == at else F.interpolate(m, at, mode="bilinear", align_corners=False)
            for m in maps
        ]
        masks = torch.sigmoid(self.final(torch.cat(maps, dim=1)))  # (B, 1, H/4, W/4)
        if self.upsample == "nearest":
            return F.interpolate(masks, size=size, mode="nearest")
        return F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
