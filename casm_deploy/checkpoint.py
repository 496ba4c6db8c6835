"""The checkpoint: one schema, tensors and primitives only, loadable with `weights_only=True`.

`train` writes it atomically at every epoch end; `eval`, `export` and `infer` rebuild the Masker
from it with `load_masker`. Keys: format, version, package_version, model (arch, width,
num_classes, upsample, image_size, wnids, names, shared_encoder, data_kind), config, phase,
epoch, step, encoder, decoder, optimizers, pool_file, rng, metrics. The thinning pool is the
file `pool_file` beside it. `optimizers["casm"]["scaler"]` (the fp16 gradient scaler; {}
otherwise) and `model["data_kind"]` ("synthetic" or "images") are optional: files written
before them lack them and load as they are, so VERSION stays 1.

A file of another kind (an export, a torchvision state dict or pickled model) is named as such
in one line, with what to pass instead.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from casm_deploy.errors import UserError
from casm_deploy.models.mapping import ARCHS, Masker, build_masker

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


# What `load_checkpoint` and `load_masker` ask for, when the caller does not say it better.
CHECKPOINT_WANTED = "expected a training checkpoint, runs/<name>/checkpoint.pt"
EXPORT_METADATA = "extra/casm_metadata.json"  # export.METADATA_FILE inside an export's archive
# The keys by which a torchvision ResNet's state dict is known (the stem and the head).
TORCHVISION_KEYS = ("conv1.weight", "bn1.weight", "fc.weight")
ONNX_FIELDS = (0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42)  # ModelProto fields 2-8, as tags


def identify(path: str | Path) -> str:
    """What a file that is not a checkpoint is, from its first bytes or its zip directory,
    without unpickling or running anything: "TorchScript", "torch.export (pt2)" or "ONNX" for an
    exported model, "" for anything else (a torch file, or bytes of another kind).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith(b"PK"):
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        else:
            names = []
    except (OSError, zipfile.BadZipFile):
        return ""
    if names:
        if any("/code/" in n or n.startswith("code/") for n in names):
            return "TorchScript"
        if any(n.endswith(EXPORT_METADATA) or n.endswith("archive_format") for n in names):
            return "torch.export (pt2)"
        return ""
    # An ONNX ModelProto opens with its ir_version (field 1, a small varint), then the
    # producer, domain, version, doc string, graph or opset fields; a torch pickle with 0x80.
    if len(head) >= 3 and head[0] == 0x08 and head[1] < 0x80 and head[2] in ONNX_FIELDS:
        return "ONNX"
    return ""


def is_torchvision_weights(value: Any) -> bool:
    """A torchvision ResNet's state dict: tensors under its stem and head keys."""
    return (
        isinstance(value, dict)
        and all(isinstance(value.get(k), torch.Tensor) for k in TORCHVISION_KEYS)
        and "format" not in value
    )


def load_file(path: str | Path, wanted: str = "") -> Any:
    """`torch.load(..., weights_only=True)` with clear errors for missing, foreign or unsafe files.

    An exported model (TorchScript, pt2, ONNX) is named as such before torch reads it, and a
    whole pickled module (`torch.save(model)`) is named by its class: a weights-only load
    refuses both. `wanted`, if given, ends those messages: what the caller takes instead.
    PyTorch's own warnings about the file (a TorchScript archive, `weights_only`) are silenced:
    the error says what the file is.

    Raises:
        UserError: the file is missing, truncated, not a torch file, an exported model, or
            carries pickled objects or code.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    wanted = wanted or CHECKPOINT_WANTED
    kind = identify(path)
    if kind:
        raise UserError(f"{path}: this is an exported model ({kind}); {wanted}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's FutureWarning / UserWarning on odd files
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # A weights-only load names the global it refused ("Unsupported global: posix.system");
        # other unpickling errors mean bytes that are not a pickle at all.
        refused = [line for line in str(error).splitlines() if "global" in line.lower()]
        if refused:
            found = re.search(r"GLOBAL ([\w.]+)", refused[0])
            name = found.group(1) if found else ""
            if name.startswith(("torch.nn.", "torchvision.", "timm.")):
                raise UserError(
                    f"{path}: this is a whole pickled model ({name}, saved with "
                    "torch.save(model)), which casm-deploy does not unpickle (unpickling can run "
                    "code): save its weights, torch.save(model.state_dict(), 'weights.pth'), "
                    f"which train --weights takes; {wanted}"
                ) from None
            detail = refused[0].strip().split(" was not an allowed global")[0]
            raise UserError(
                f"{path}: refused: it carries pickled objects or code that a weights-only load "
                f"does not allow ({detail}). Only load files from sources you trust."
            ) from None
        raise UserError(f"{path}: not a readable checkpoint (not a torch file)") from None
    except Exception as error:  # torch raises many types for foreign bytes (KeyError, ...)
        text = str(error).strip().splitlines()
        raise UserError(
            f"{path}: not a readable checkpoint, or truncated ({text[0] if text else error!r})"
        ) from None


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


def load_checkpoint(path: str | Path, wanted: str = "") -> dict[str, Any]:
    """Load and validate a casm-deploy checkpoint.

    `wanted` ends the message for a file of another kind: what the caller takes instead (by
    default, CHECKPOINT_WANTED).

    Raises:
        UserError: as `load_file`, or the file is a torch file of another kind or version.
    """
    wanted = wanted or CHECKPOINT_WANTED
    checkpoint = load_file(path, wanted)
    if is_torchvision_weights(checkpoint):
        raise UserError(
            f"{path}: this is a torchvision classifier's weights (a state dict: conv1.weight "
            f"... fc.weight), which train --weights takes; {wanted}"
        )
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise UserError(
            f"{path}: not a casm-deploy checkpoint (no '{FORMAT}' format tag); {wanted}"
        )
    if checkpoint.get("version") != VERSION:
        raise UserError(
            f"{path}: checkpoint version {checkpoint.get('version')} is not supported "
            f"(this casm-deploy reads version {VERSION})"
        )
    return checkpoint


def untrained_decoder(checkpoint: dict[str, Any]) -> str:
    """Why the mask decoder of a checkpoint was never trained, or "" if it was (or if the file
    does not say: `save_untrained`'s files, for tests and benchmarks, carry no phase).

    A `--classifier-only` run trains the classifier alone; a run stopped in pre-training (or at
    its end, before the first CASM epoch) has not trained the decoder yet.
    """
    config = checkpoint.get("config") or {}
    phase, epoch = checkpoint.get("phase"), checkpoint.get("epoch")
    if isinstance(config, dict) and config.get("classifier_only"):
        return "its mask decoder was never trained (a --classifier-only run)"
    if phase == "pretrain" or (phase == "casm" and epoch == 0):
        return "its mask decoder is not trained yet (the run stopped in pre-training)"
    return ""


def check_decoder_trained(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint whose masks would be those of a random decoder (see
    `untrained_decoder`); eval's classifiers and Grad-CAM take such files, infer and export
    do not.

    Raises:
        UserError: the decoder was never trained; the message says how to train it.
    """
    why = untrained_decoder(checkpoint)
    if why.endswith("(a --classifier-only run)"):
        raise UserError(
            f"{path}: {why}; train a CASM from it with --weights {path} --pretrain-epochs 0"
        )
    if why:
        raise UserError(f"{path}: {why}; finish it with train --resume")


# Where a model learned: "synthetic" for `casm-deploy data synth`'s shapes (a data folder with a
# synth.json), "images" for any other folder; "" when not known.
SYNTHETIC = "synthetic"
SYNTHETIC_NOTE = (
    "this model was trained on casm-deploy's synthetic shapes (data synth): its masks and "
    "labels mean nothing on real photos; see README 'Using real ImageNet'"
)


def synthetic_labels(wnids: Any, names: Any = ()) -> bool:
    """Whether the class ids are `data synth`'s (n900000NN, with its shape names if named)."""
    from casm_deploy.data.synth import SHAPES, wnid_for

    known = {wnid_for(k): shape for k, shape in enumerate(SHAPES)}
    if not isinstance(wnids, list | tuple) or not wnids:
        return False
    if not all(isinstance(w, str) and w in known for w in wnids):
        return False
    names = list(names or [])
    return not names or names == [known[w] for w in wnids]


def training_data_kind(checkpoint: dict[str, Any], path: str | Path = "") -> str:
    """The kind of data a checkpoint was trained on: "synthetic", "images" or "" (not known).

    `train` records it (`model.data_kind`); for older files, the training data folder of its
    config is looked at (a synth.json in it; a relative path from the working directory and
    from each folder above the checkpoint), then its class ids (`synthetic_labels`).
    """
    spec = checkpoint.get("model") if isinstance(checkpoint.get("model"), dict) else {}
    recorded = spec.get("data_kind")
    if recorded in (SYNTHETIC, "images"):
        return recorded
    config = checkpoint.get("config") or {}
    data = config.get("data") if isinstance(config, dict) else None
    found = ""
    if isinstance(data, str) and data:
        candidates = [Path(data)]
        if path and not Path(data).is_absolute():
            candidates += [folder / data for folder in Path(path).resolve().parents]
        for folder in candidates:
            with contextlib.suppress(OSError):
                if folder.is_dir():
                    found = SYNTHETIC if (folder / "synth.json").is_file() else "images"
                    break
    if found != SYNTHETIC and synthetic_labels(spec.get("wnids"), spec.get("names")):
        return SYNTHETIC
    return found


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


def load_masker(path: str | Path, wanted: str = "") -> tuple[Masker, dict[str, Any]]:
    """The Masker of a checkpoint file and its model description (`checkpoint["model"]`).

    Raises:
        UserError: as `load_checkpoint` and `masker_from_checkpoint`.
    """
    checkpoint = load_checkpoint(path, wanted)
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


def load_maskers(paths: tuple[str, ...] | list[str], wanted: str = "") -> list[NamedMasker]:
    """Load models to compare side by side: unique names (`run`, `run#2`), one image size.

    Raises:
        UserError: a file cannot be loaded, or the models were trained at different sizes.
    """
    models: list[NamedMasker] = []
    for path in paths:
        masker, spec = load_masker(path, wanted)
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
