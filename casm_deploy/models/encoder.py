"""The encoders: a classifier CNN returning its logits and five feature maps.

Every encoder has `feature_maps(x) -> [stem, s4, s8, s16, s32]` (the stem, then the feature maps at
strides 4, 8, 16 and 32) and `forward(x) -> (logits, features)`, as the reference `ResNetShared`;
`decoder.Decoder` reads the feature maps, `mapping.SaliencyModel` puts the two together.
`Encoder` is a ResNet (its stem is at stride 4, so its first two maps are s0 and l1);
`TorchvisionEncoder` any other family of `backbones.FAMILIES`. Both keep torchvision's parameter
names, so a torchvision state dict loads as is (`fc.weight` and `fc.bias` for a ResNet's head).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from casm_deploy.models.backbones import (
    FAMILIES,
    TORCHVISION_WIDTH,
    arch_layers,
    build_torchvision,
    check_arch,
    set_width,
)


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
        if width != TORCHVISION_WIDTH:
            set_width(self, block, layers, width, num_classes)
        self.arch, self.width = arch, width
        # Channels of s0, l1..l4, what the decoder needs to know.
        self.feature_channels = [width] + [width * m * block.expansion for m in (1, 2, 4, 8)]

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Normalised images -> [s0, l1, l2, l3, l4]."""
        s0 = self.maxpool(self.relu(self.bn1(self.conv1(images))))  # (B, w, H/4, W/4)
        l1 = self.layer1(s0)
        l2 = self.layer2(l1)
        l3 = self.layer3(l2)
        l4 = self.layer4(l3)  # (B, 8w*expansion, H/32, W/32)
        return [s0, l1, l2, l3, l4]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised images -> (logits, [s0, l1, l2, l3, l4])."""
        features = self.feature_maps(images)
        return self.fc(torch.flatten(self.avgpool(features[-1]), 1)), features


class TorchvisionEncoder(nn.Module):
    """A torchvision classification CNN of `backbones.FAMILIES`, tapped at five depths.

    The torchvision model's top-level modules become this module's own, so its parameter
    names (`features.3.block...`, `classifier.3.weight`) are torchvision's. `features` runs the
    family's modules in order and keeps the outputs at the family's taps; the head is the
    model's own (global average pool, then its classifier).
    """

    def __init__(self, arch: str, num_classes: int = 1000, width: int = TORCHVISION_WIDTH):
        super().__init__()
        family = FAMILIES[check_arch(arch)]
        net = build_torchvision(arch, num_classes, width)
        for name, module in net.named_children():
            self.add_module(name, module)
        self.arch, self.width = arch, width
        # Plain lists: the modules are registered once, under torchvision's names.
        self._stages = family.stages(self)
        self._head = [getattr(self, name) for name in family.head]
        self._taps, self._flatten = family.taps, family.flatten
        self.feature_channels = self._channels()

    def _channels(self) -> list[int]:
        """The channels of the five maps, read off one small forward pass."""
        training = self.training
        with torch.no_grad():
            maps = self.eval().feature_maps(torch.zeros(1, 3, 64, 64))
        self.train(training)
        return [m.shape[1] for m in maps]

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Normalised images -> [stem, s4, s8, s16, s32]."""
        maps, x = [], images
        for index, stage in enumerate(self._stages[: self._taps[-1] + 1]):
            x = stage(x)
            if index in self._taps:
                maps.append(x)
        return maps

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised images -> (logits, [stem, s4, s8, s16, s32])."""
        features = self.feature_maps(images)
        x = self.avgpool(features[-1])
        x = torch.flatten(x, 1) if self._flatten else x
        for module in self._head:
            x = module(x)
        return x, features


def build_encoder(arch: str, num_classes: int, width: int = TORCHVISION_WIDTH) -> nn.Module:
    """The encoder of `arch` at `width`, freshly initialised as torchvision does."""
    if arch in FAMILIES:
        return TorchvisionEncoder(arch, num_classes, width)
    return Encoder(arch, num_classes, width)
