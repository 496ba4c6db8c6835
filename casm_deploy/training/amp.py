"""Mixed precision (`--amp off|bf16|fp16`): whether a setting can run on this device, and how.

The one place that decides it: `config.TrainConfig` checks only the spelling, `casm.CASM` asks
`amp_dtype` (a UserError before any step), `train.run` prints `bf16_cpu_warning`, and the
forward passes of both phases run under `autocast`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from casm_deploy.errors import UserError

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str, device_type: str) -> torch.dtype | None:
    """The autocast dtype of `--amp` on this device (None: fp32), or a UserError.

    Raises:
        UserError: fp16 off CUDA (CPU autocast is for bf16), or bf16 on a GPU without it.
    """
    if amp not in AMP_DTYPES:
        raise UserError(f"--amp must be one of {', '.join(AMP_DTYPES)}, not {amp!r}")
    if amp == "fp16" and device_type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device (use --amp bf16 on the CPU)")
    if amp == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--amp bf16: this GPU does not support bfloat16 (use --amp fp16)")
    return AMP_DTYPES[amp]


# x86 (AVX512-BF16, AMX) and Arm (BF16) flags of bfloat16 arithmetic in /proc/cpuinfo
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The first CPU's feature flags (x86 `flags`, Arm `Features`), or None where unknown."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def bf16_cpu_warning(amp: str, device_type: str, flags: set[str] | None) -> str:
    """A warning for --amp bf16 on a CPU whose `flags` show no bfloat16 arithmetic ("" else).

    Without it autocast's bf16 is emulated: one such CPU trained 11x slower than in fp32.
    Unknown flags (None: no /proc/cpuinfo) give no warning.
    """
    if amp != "bf16" or device_type != "cpu" or flags is None or flags & BF16_CPU_FLAGS:
        return ""
    return (
        "warning: --amp bf16 on a CPU without bfloat16 arithmetic (no avx512_bf16, amx_bf16 "
        "or bf16 flag): slower than fp32 here; use --amp off"
    )


def autocast(device_type: str, dtype: torch.dtype | None):
    """`torch.autocast` to `dtype`, or nothing at all when `dtype` is None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)
