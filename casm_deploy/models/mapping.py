"""The CASM model: a ResNet encoder (the classifier), a decoder (features -> mask) and the Masker.

Encoder.forward returns `(logits, [s0, l1, l2, l3, l4])` as the reference `ResNetShared`; the
Decoder reads those feature maps and returns a mask in [0, 1]; the Masker is what gets exported:
images in [0, 1] -> (masks, logits), with the ImageNet normalisation inside the graph.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv_resnet

from casm_deploy.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ARCHS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (tv_resnet.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (tv_resnet.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (tv_resnet.Bottleneck, [3, 4, 6, 3]),
}


class Encoder(tv_resnet.ResNet):
    """torchvision's ResNet with a configurable stem width, returning logits and feature maps.

    With `width=64` the parameters and their names are torchvision's, so a torchvision state
    dict loads as is. Smaller widths scale every stage (32 -> 32/64/128/256 channels for
    ResNet-18), which trains ~3.5x faster on a CPU at a similar per-step progress.
    """

    def __init__(self, arch: str = "resnet18", num_classes: int = 1000, width: int = 64):
        if arch not in ARCHS:
            raise UserError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
        block, layers = ARCHS[arch]
        # Build torchvision's ResNet at its own width, then rebuild the layers at `width`:
        # torchvision hard-codes 64 and reusing its `_make_layer` keeps its naming and init.
        super().__init__(block, layers, num_classes=num_classes)
        if width != 64:
            self.inplanes = width
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.layer1 = self._make_layer(block, width, layers[0])
            self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
            self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
            self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
            self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
            _init_like_torchvision(self)
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


def _init_like_torchvision(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class Decoder(nn.Module):
    """Feature maps -> mask (B, 1, H, W) in [0, 1], as ALGORITHM.md.

    Each of l1..l4: 1x1 conv to 64 channels (no bias) -> BatchNorm -> ReLU -> bilinear upsample
    to s0's size; concatenate with s0 -> 3x3 conv to one channel -> sigmoid -> upsample to H x W
    (nearest as the reference code, or bilinear as the paper's text).
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
        s0 = features[0]
        maps = [s0]
        for lateral, feature in zip(self.lateral, features[1:], strict=True):
            x = lateral(feature)
            if x.shape[-2:] != s0.shape[-2:]:
                x = F.interpolate(x, size=s0.shape[-2:], mode="bilinear", align_corners=False)
            maps.append(x)
        masks = torch.sigmoid(self.final(torch.cat(maps, dim=1)))  # (B, 1, H/4, W/4)
        if self.upsample == "nearest":
            return F.interpolate(masks, size=size, mode="nearest")
        return F.interpolate(masks, size=size, mode="bilinear", align_corners=False)


class Masker(nn.Module):
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
) -> Masker:
    """A Masker with random weights (with a mapping encoder of its own unless `shared_encoder`)."""
    encoder = Encoder(arch, num_classes=num_classes, width=width)
    mapping_encoder = None if shared_encoder else Encoder(arch, num_classes, width=width)
    decoder = Decoder(encoder.feature_channels, upsample=upsample)
    return Masker(encoder, decoder, mapping_encoder)


def load_encoder_weights(encoder: Encoder, weights: str) -> list[str]:
    """Load a local torchvision ResNet state dict (or a named torchvision weight, if cached).

    A casm-deploy checkpoint works too: its encoder (the classifier) is loaded, so a CASM
    phase can start from the classifier of an earlier run.

    Nothing is ever downloaded. The classification head is skipped when its shape differs
    (a different number of classes). Returns the names of the parameters left untouched.

    Raises:
        UserError: the file is missing or unreadable, or names weights that are not on disk.
    """
    path = Path(weights).expanduser()
    if not path.is_file():
        path = _cached_torchvision_file(encoder.arch, weights)
    from casm_deploy.checkpoint import load_file  # which imports this module

    wanted = "--weights takes a torchvision state dict or a casm-deploy checkpoint"
    state = load_file(path, wanted)
    if isinstance(state, dict) and "format" in state and "encoder" in state:
        state = state["encoder"]  # a casm-deploy checkpoint: start from its classifier
    elif isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = encoder.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    wrong = [k for k in own if k not in usable and not k.startswith("fc.")]
    if wrong:
        raise UserError(
            f"{path}: does not match {encoder.arch} at width {encoder.width} "
            f"({len(wrong)} tensors missing or of another shape, e.g. {wrong[0]}); "
            "torchvision weights need --width 64"
        )
    encoder.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))


def _cached_torchvision_file(arch: str, name: str) -> Path:
    """The local file for a named torchvision weight (e.g. IMAGENET1K_V1), or a clear error."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    key = name.split(".")[-1]
    if key not in enum.__members__:
        raise UserError(
            f"--weights {name!r} is neither a file nor a torchvision weight of {arch} "
            f"(known: {', '.join(enum.__members__)})"
        )
    url = enum[key].url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if cached.is_file():
        return cached
    raise UserError(
        f"--weights {name}: this machine cannot download weights. Fetch {url} elsewhere and "
        f"pass the file with --weights /path/to/{Path(url).name} "
        f"(or place it at {cached})"
    )
