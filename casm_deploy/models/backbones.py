"""The backbones: every `--arch`, each a torchvision classification CNN built at a width.

ResNets are rebuilt at a stem width (`arch_layers`, `set_width`; `encoder.Encoder`). The other
families (MobileNetV3, EfficientNet-B0, ConvNeXt-Tiny, RegNetY-400MF) are torchvision's own
models (`build_torchvision`), whose top-level modules `encoder.TorchvisionEncoder` runs in
order and taps at the indices of `FAMILIES` (the stem, then the last module at strides 4, 8, 16
and 32). `--width` means the same for all: 64 is torchvision's width, and another value scales
every layer by width / 64 (a ResNet's stem has exactly `width` channels).

For `train --weights`, `weights_file` finds the file (nothing is ever downloaded) and the training
stage reads it (`torchfile.load_file`, the one guarded reader) and hands the result to
`load_encoder_weights`: this stage reads no files of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import convnext, efficientnet, mobilenetv3, regnet
from torchvision.models import resnet as tv_resnet

from casm_deploy.errors import UserError

TORCHVISION_WIDTH = 64  # --width of torchvision's own models, whose weights load as they are

RESNETS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (tv_resnet.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (tv_resnet.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (tv_resnet.Bottleneck, [3, 4, 6, 3]),
}


def _divisible(channels: float, by: int = 8) -> int:
    """Channels scaled by a width multiplier, rounded as torchvision does (multiples of 8)."""
    return max(by, int(channels + by / 2) // by * by)


def _mobilenet_v3(arch: str, num_classes: int, mult: float) -> nn.Module:
    settings, last_channel = mobilenetv3._mobilenet_v3_conf(arch, width_mult=mult)
    return mobilenetv3.MobileNetV3(settings, last_channel, num_classes=num_classes)


def _efficientnet_b0(num_classes: int, mult: float) -> nn.Module:
    settings, _ = efficientnet._efficientnet_conf(
        "efficientnet_b0", width_mult=mult, depth_mult=1.0
    )
    return efficientnet.EfficientNet(settings, 0.2, num_classes=num_classes, last_channel=None)


def _convnext_tiny(num_classes: int, mult: float) -> nn.Module:
    widths = [_divisible(c * mult) for c in (96, 192, 384, 768)]
    depths = (3, 3, 9, 3)
    settings = [
        convnext.CNBlockConfig(w, widths[i + 1] if i < 3 else None, d)
        for i, (w, d) in enumerate(zip(widths, depths, strict=True))
    ]
    return convnext.ConvNeXt(settings, stochastic_depth_prob=0.1, num_classes=num_classes)


def _regnet_y_400mf(num_classes: int, mult: float) -> nn.Module:
    params = regnet.BlockParams.from_init_params(
        depth=16,
        w_0=_divisible(48 * mult),
        w_a=27.89 * mult,
        w_m=2.09,
        group_width=8,
        se_ratio=0.25,
    )
    norm = partial(nn.BatchNorm2d, eps=1e-05, momentum=0.1)
    return regnet.RegNet(
        params, num_classes=num_classes, stem_width=_divisible(32 * mult), norm_layer=norm
    )


def _features_stages(net: nn.Module) -> list[nn.Module]:
    return list(net.features)


def _regnet_stages(net: nn.Module) -> list[nn.Module]:
    return [net.stem, *net.trunk_output]


@dataclass(frozen=True)
class Family:
    """A torchvision family: how to build it at a width, its modules in order, and its head."""

    build: Callable[[int, float], nn.Module]  # (num_classes, width multiplier) -> model
    stages: Callable[[nn.Module], list[nn.Module]]  # the modules the features run through
    taps: tuple[int, int, int, int, int]  # indices in stages: stem, strides 4, 8, 16, 32
    head: tuple[str, ...]  # the head's top-level modules (skipped by --weights on a mismatch)
    flatten: bool  # flatten the pooled features before the head (ConvNeXt's head does it)


FAMILIES: dict[str, Family] = {
    "mobilenet_v3_small": Family(
        partial(_mobilenet_v3, "mobilenet_v3_small"),
        _features_stages,
        (0, 1, 3, 8, 12),
        ("classifier",),
        True,
    ),
    "mobilenet_v3_large": Family(
        partial(_mobilenet_v3, "mobilenet_v3_large"),
        _features_stages,
        (0, 3, 6, 12, 16),
        ("classifier",),
        True,
    ),
    "efficientnet_b0": Family(
        _efficientnet_b0, _features_stages, (0, 2, 3, 5, 8), ("classifier",), True
    ),
    "convnext_tiny": Family(
        _convnext_tiny, _features_stages, (0, 1, 3, 5, 7), ("classifier",), False
    ),
    "regnet_y_400mf": Family(_regnet_y_400mf, _regnet_stages, (0, 1, 2, 3, 4), ("fc",), True),
}
ARCHS = (*RESNETS, *FAMILIES)
# What `train --weights` takes, ending `torchfile.load_file`'s messages for a file of another kind.
WEIGHTS_WANTED = "--weights takes a torchvision state dict or a casm-deploy checkpoint"


def check_arch(arch: str, option: str = "--arch") -> str:
    """`arch` if it is one of ARCHS, or a UserError naming the choices."""
    if arch not in ARCHS:
        raise UserError(f"unknown {option} {arch!r}; choose one of {', '.join(ARCHS)}")
    return arch


def arch_layers(arch: str) -> tuple[type[nn.Module], list[int]]:
    """The block type and the blocks per stage of a ResNet `arch`."""
    check_arch(arch)
    return RESNETS[arch]


def build_torchvision(arch: str, num_classes: int, width: int) -> nn.Module:
    """torchvision's `arch` (not a ResNet) with every layer scaled by width / 64."""
    return FAMILIES[check_arch(arch)].build(num_classes, width / TORCHVISION_WIDTH)


def set_width(
    net: tv_resnet.ResNet, block: type[nn.Module], layers: list[int], width: int, num_classes: int
) -> None:
    """Rebuild a torchvision ResNet's stem, stages and head at stem width `width`, freshly
    initialised as torchvision does.

    torchvision hard-codes 64; reusing its `_make_layer` keeps its naming and init.
    """
    net.inplanes = width
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    net.layer1 = net._make_layer(block, width, layers[0])
    net.layer2 = net._make_layer(block, width * 2, layers[1], stride=2)
    net.layer3 = net._make_layer(block, width * 4, layers[2], stride=2)
    net.layer4 = net._make_layer(block, width * 8, layers[3], stride=2)
    net.fc = nn.Linear(width * 8 * block.expansion, num_classes)
    _init_like_torchvision(net)


def _init_like_torchvision(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def head_names(arch: str) -> tuple[str, ...]:
    """The top-level modules of `arch`'s classification head (fc for ResNets)."""
    return FAMILIES[arch].head if arch in FAMILIES else ("fc",)


def is_head(arch: str, name: str) -> bool:
    """Whether the parameter or buffer `name` belongs to `arch`'s classification head."""
    return name.split(".", 1)[0] in head_names(arch)


def weights_file(arch: str, weights: str) -> Path:
    """The local file of `--weights`: the path given, else a named torchvision weight of `arch`
    (e.g. IMAGENET1K_V1) already in torch's hub cache.

    Raises:
        UserError: neither a file nor a known weight name, or a name whose file is not on disk.
    """
    path = Path(weights).expanduser()
    if not path.is_file():
        path = _cached_torchvision_file(arch, weights)
    return path


def load_encoder_weights(encoder: nn.Module, state: Any, path: str | Path) -> list[str]:
    """Load what was read from `path` (`weights_file`'s): a torchvision state dict of the
    encoder's arch, or a casm-deploy checkpoint, whose encoder (the classifier) is loaded, so a
    CASM phase can start from the classifier of an earlier run.

    The classification head is skipped where its shapes differ (a different number of classes).
    Returns the names of the parameters left untouched.

    Raises:
        UserError: the tensors do not match the encoder's arch and width.
    """
    if isinstance(state, dict) and "format" in state and "encoder" in state:
        state = state["encoder"]  # a casm-deploy checkpoint: start from its classifier
    elif isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = encoder.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    wrong = [k for k in own if k not in usable and not is_head(encoder.arch, k)]
    if wrong:
        raise UserError(
            f"{path}: does not match {encoder.arch} at width {encoder.width} "
            f"({len(wrong)} tensors missing or of another shape, e.g. {wrong[0]}); "
            f"torchvision weights need --width {TORCHVISION_WIDTH}"
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
