"""The ResNet backbones: ARCHS, a torchvision ResNet rebuilt at a stem width, local weights.

`encoder.Encoder` is a torchvision ResNet built with `arch_layers` and `set_width`. For
`train --weights`, `weights_file` finds the file (nothing is ever downloaded) and the training
stage reads it (`torchfile.load_file`, the one guarded reader) and hands the result to
`load_encoder_weights`: this stage reads no files of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from casm_deploy.errors import UserError

ARCHS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (tv_resnet.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (tv_resnet.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (tv_resnet.Bottleneck, [3, 4, 6, 3]),
}
# What `train --weights` takes, ending `torchfile.load_file`'s messages for a file of another kind.
WEIGHTS_WANTED = "--weights takes a torchvision state dict or a casm-deploy checkpoint"


def arch_layers(arch: str) -> tuple[type[nn.Module], list[int]]:
    """The block type and the blocks per stage of `arch`, or a UserError naming the choices."""
    if arch not in ARCHS:
        raise UserError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[arch]


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


def load_encoder_weights(encoder: tv_resnet.ResNet, state: Any, path: str | Path) -> list[str]:
    """Load what was read from `path` (`weights_file`'s): a torchvision ResNet state dict, or a
    casm-deploy checkpoint, whose encoder (the classifier) is loaded, so a CASM phase can start
    from the classifier of an earlier run.

    The classification head is skipped when its shape differs (a different number of classes).
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
