"""The encoder: the classifier's ResNet, returning its logits and the five feature maps.

`Encoder.forward` returns `(logits, [s0, l1, l2, l3, l4])` as the reference `ResNetShared`;
`decoder.Decoder` reads the feature maps, `mapping.SaliencyModel` puts the two together. The head
(`fc`, on l4) stays a part of the torchvision ResNet: its keys (`fc.weight`, `fc.bias`) are
those of checkpoints and torchvision state dicts.
"""

from __future__ import annotations

import torch
from torchvision.models import resnet as tv_resnet

from casm_deploy.models.backbones import arch_layers, set_width


class Encoder(tv_resnet.ResNet):
    """torchvision's ResNet with a configurable stem width, returning logits and feature maps.

    With `width=64` the parameters and their names are torchvision's, so a torchvision state
    dict loads as is. Smaller widths scale every stage (32 -> 32/64/128/256 channels for
    ResNet-18), which trains ~3.5x faster on a CPU at a similar per-step progress.
    """

    def __init__(self, arch: str = "resnet18", num_classes: int = 1000, width: int = 64):
        block, layers = arch_layers(arch)
        # Build torchvision's ResNet at its own width, then rebuild the layers at `width`.
        super().__init__(block, layers, num_classes=num_classes)
        if width != 64:
            set_width(self, block, layers, width, num_classes)
        self.arch, self.width = arch, width
        # Channels of s0, l1..l4, what the decoder needs to know.
        self.feature_channels = [width] + [width * m * block.expansion for m in (1, 2, 4, 8)]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised images -> (logits, [s0, l1, l2, l3, l4])."""
        s0 = self.maxpool(self.relu(self.bn1(self.conv1(images))))  # (B, w, H/4, W/4)
        l1 = self.layer1(s0)
        l2 = self.layer2(l1)
        l3 = self.layer3(l2)
        l4 = self.layer4(l3)  # (B, 8w*expansion, H/32, W/32)
        logits = self.fc(torch.flatten(self.avgpool(l4), 1))
        return logits, [s0, l1, l2, l3, l4]
