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
from casm_deploy.model import ARCHS, Masker, build_masker

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


# The model description's keys and their types (the labels, shared_encoder: optional).
SPEC_TYPES = {"arch": str, "width": int, "num_classes": int, "upsample": str, "image_size": int}
KINDS = {str: "a string", int: "an integer"}


def check_spec(checkpoint: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The model description of a checkpoint, checked key by key.

    Raises:
        UserError: it is missing, or a key is missing or of another type (the message names it).
    """
    spec = checkpoint.get("model")
    if not isinstance(spec, dict):
        raise UserError(f"{path}: the checkpoint has no 'model' description (arch, sizes)")
    for key, kind in SPEC_TYPES.items():
        if key not in spec:
            raise UserError(f"{path}: the checkpoint's model description has no {key!r}")
        value = spec[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"{path}: model {key} {value!r} is not {KINDS[kind]}")
        if kind is int and value < 1:
            raise UserError(f"{path}: model {key} {value} is not positive")
    if spec["arch"] not in ARCHS:
        raise UserError(f"{path}: model arch {spec['arch']!r} is not one of {', '.join(ARCHS)}")
    if spec["upsample"] not in ("nearest", "bilinear"):
        raise UserError(f"{path}: model upsample {spec['upsample']!r} is not nearest or bilinear")
    for key in ("wnids", "names"):
        labels = spec.get(key, [])
        if not isinstance(labels, list | tuple) or not all(isinstance(v, str) for v in labels):
            raise UserError(f"{path}: model {key} is not a list of strings")
        if len(labels) not in (0, spec["num_classes"]):
            raise UserError(
                f"{path}: model {key} lists {len(labels)} classes, not {spec['num_classes']}"
            )
    if not isinstance(spec.get("shared_encoder", True), bool):
        raise UserError(f"{path}: model shared_encoder {spec['shared_encoder']!r} is not a bool")
    return spec


def load_weights(module: torch.nn.Module, state: Any, path: str | Path, key: str) -> None:
    """`module.load_state_dict(state)`, its errors as one line naming the first bad key.

    Raises:
        UserError: `state` is missing or empty, or its keys or shapes do not fit `module`.
    """
    if not isinstance(state, dict) or not state:
        raise UserError(f"{path}: the checkpoint's {key!r} weights are missing or empty")
    try:
        result = module.load_state_dict(state, strict=False)
    except Exception as error:  # a tensor of another shape, or a value that is no tensor
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else (lines or [type(error).__name__])[0]
        raise UserError(f"{path}: the {key!r} weights do not fit the model ({detail})") from None
    for what, names in (
        ("lack", result.missing_keys),
        ("have an unexpected", result.unexpected_keys),
    ):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise UserError(f"{path}: the {key!r} weights {what} key {names[0]!r}{more}")


def masker_from_checkpoint(checkpoint: dict[str, Any], path: str | Path = "checkpoint") -> Masker:
    """Rebuild the Masker (eval mode, CPU) from a loaded checkpoint (read from `path`).

    Raises:
        UserError: the model description or the weights are missing or do not fit.
    """
    spec = check_spec(checkpoint, path)
    shared = spec.get("shared_encoder", True)  # absent from checkpoints older than --unshared
    masker = build_masker(
        spec["arch"], spec["num_classes"], spec["width"], spec["upsample"], shared_encoder=shared
    )
    load_weights(masker.encoder, checkpoint.get("encoder"), path, "encoder")
    load_weights(masker.decoder, checkpoint.get("decoder"), path, "decoder")
    if not shared:
        load_weights(
            masker.mapping_encoder, checkpoint.get("mapping_encoder"), path, "mapping_encoder"
        )
    return masker.eval()


def load_masker(path: str | Path) -> tuple[Masker, dict[str, Any]]:
    """The Masker of a checkpoint file and its model description (`checkpoint["model"]`).

    Raises:
        UserError: as `load_checkpoint` and `masker_from_checkpoint`.
    """
    checkpoint = load_checkpoint(path)
    return masker_from_checkpoint(checkpoint, path), checkpoint["model"]


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
