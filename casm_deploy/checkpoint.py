"""The checkpoint: one schema, tensors and primitives only, loadable with `weights_only=True`.

`train` writes it atomically at every epoch end; `eval`, `export` and `infer` rebuild the Masker
from it with `load_masker`. Keys: format, version, package_version, model (arch, width,
num_classes, upsample, image_size, wnids, names), config, phase, epoch, step, encoder, decoder,
optimizers, pool_file, rng, metrics. The thinning pool is the file `pool_file` beside it.
`optimizers["casm"]["scaler"]` (the fp16 gradient scaler; {} otherwise) is optional: files
written before `--amp` lack it and load as they are, so VERSION stays 1.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from casm_deploy.errors import UserError
from casm_deploy.model import Masker, build_masker

FORMAT = "casm-deploy/checkpoint"
VERSION = 1


def save_atomic(payload: Any, path: str | Path) -> None:
    """`torch.save` to a temporary file, fsync, rename: a crash leaves the old file or the new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_file(path: str | Path) -> Any:
    """`torch.load(..., weights_only=True)` with clear errors for missing, foreign or unsafe files.

    Raises:
        UserError: the file is missing, truncated, not a torch file, or carries pickled code.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # A weights-only load names the global it refused ("Unsupported global: posix.system");
        # other unpickling errors mean bytes that are not a pickle at all.
        refused = [line for line in str(error).splitlines() if "global" in line.lower()]
        if refused:
            raise UserError(
                f"{path}: refused: it carries pickled objects or code that a weights-only load "
                f"does not allow ({refused[0].strip()}). Only load files from sources you trust."
            ) from None
        raise UserError(f"{path}: not a readable checkpoint (not a torch file)") from None
    except Exception as error:  # torch raises many types for foreign bytes (KeyError, ...)
        raise UserError(f"{path}: not a readable checkpoint, or truncated ({error})") from None


def save_untrained(
    path: str | Path,
    wnids: list[str],
    names: list[str],
    *,
    arch: str = "resnet18",
    width: int = 64,
    image_size: int = 224,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    shared_encoder: bool = True,
) -> Path:
    """A checkpoint of this schema holding a freshly initialised mapping, for tests and
    benchmarks: an untrained mapping costs what a trained one costs."""
    torch.manual_seed(seed)
    masker = build_masker(arch, len(wnids), width=width, shared_encoder=shared_encoder)
    spec = {"arch": arch, "width": width, "num_classes": len(wnids), "upsample": "nearest"}
    spec |= {"image_size": image_size, "wnids": list(wnids), "names": list(names)}
    spec |= {"shared_encoder": shared_encoder}
    payload = {"format": FORMAT, "version": VERSION, "model": spec, "config": config or {}}
    payload |= {"encoder": masker.encoder.state_dict(), "decoder": masker.decoder.state_dict()}
    if not shared_encoder:
        payload["mapping_encoder"] = masker.mapping_encoder.state_dict()
    save_atomic(payload, path)
    return Path(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and validate a casm-deploy checkpoint.

    Raises:
        UserError: as `load_file`, or the file is a torch file of another kind or version.
    """
    checkpoint = load_file(path)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise UserError(f"{path}: not a casm-deploy checkpoint (no '{FORMAT}' format tag)")
    if checkpoint.get("version") != VERSION:
        raise UserError(
            f"{path}: checkpoint version {checkpoint.get('version')} is not supported "
            f"(this casm-deploy reads version {VERSION})"
        )
    return checkpoint


def masker_from_checkpoint(checkpoint: dict[str, Any]) -> Masker:
    """Rebuild the Masker (eval mode, CPU) from a loaded checkpoint."""
    spec = checkpoint["model"]
    shared = spec.get("shared_encoder", True)  # absent from checkpoints older than --unshared
    masker = build_masker(
        spec["arch"], spec["num_classes"], spec["width"], spec["upsample"], shared_encoder=shared
    )
    masker.encoder.load_state_dict(checkpoint["encoder"])
    masker.decoder.load_state_dict(checkpoint["decoder"])
    if not shared:
        masker.mapping_encoder.load_state_dict(checkpoint["mapping_encoder"])
    return masker.eval()


def load_masker(path: str | Path) -> tuple[Masker, dict[str, Any]]:
    """The Masker of a checkpoint file and its model description (`checkpoint["model"]`)."""
    checkpoint = load_checkpoint(path)
    return masker_from_checkpoint(checkpoint), checkpoint["model"]


@dataclass
class NamedMasker:
    """A loaded model among several to compare, under a unique display name."""

    name: str
    path: str
    masker: Masker
    spec: dict[str, Any]


def display_name(path: str | Path) -> str:
    """`runs/<name>/checkpoint.pt` -> `<name>`; any other file -> its stem."""
    path = Path(path)
    return path.parent.name if path.stem == "checkpoint" and path.parent.name else path.stem


def load_maskers(paths: tuple[str, ...] | list[str]) -> list[NamedMasker]:
    """Load models to compare side by side: unique names (`run`, `run#2`), one image size.

    Raises:
        UserError: a file cannot be loaded, or the models were trained at different sizes.
    """
    models: list[NamedMasker] = []
    for path in paths:
        masker, spec = load_masker(path)
        name, base, copy = display_name(path), display_name(path), 1
        while name in {m.name for m in models}:
            copy += 1
            name = f"{base}#{copy}"
        models.append(NamedMasker(name, str(path), masker, spec))
    sizes = {m.spec["image_size"] for m in models}
    if len(sizes) > 1:
        listing = ", ".join(f"{m.path}: {m.spec['image_size']} px" for m in models)
        raise UserError(f"the models must share one image size to be compared ({listing})")
    return models
