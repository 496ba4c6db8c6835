"""Which device a command runs on: one rule for train, export, infer and the loaders."""

from __future__ import annotations

import torch

from casm_deploy.errors import UserError


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """`auto` -> CUDA when available, else CPU; a CUDA device asked for must exist.

    Under torchrun (`local_rank` given) a bare `cuda` means this process's GPU, cuda:LOCAL_RANK.

    Raises:
        UserError: CUDA asked for where there is none, or a name that is not a device.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"--device {name}: CUDA is not available on this machine (PyTorch finds no CUDA "
            "device); use --device cpu"
        )
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a device (use auto, cpu or cuda)") from None
    if device == torch.device("cuda") and local_rank is not None:
        device = torch.device("cuda", local_rank)
    return device
