"""The checkpoint: one schema, tensors and primitives only, loadable with `weights_only=True`.

Written and read here alone: `train` saves a `TrainingCheckpoint` with `save_training` at every
epoch end (atomically) and `--resume` reads it back with `load_training`; `eval`, `export` and
`infer` rebuild the model from it with `load_masker`. Keys: format, version, package_version,
model (the `models.spec.ModelSpec`, written by its `to_checkpoint` and read by its
`from_checkpoint`: arch, width, num_classes, upsample, image_size, wnids, names, shared_encoder,
mapping_arch, mapping_width, data_kind), config, phase, epoch, step, encoder, decoder,
mapping_encoder, optimizers, pool_file, rng, metrics. The thinning pool is the file `pool_file`
beside it.
`optimizers["casm"]["scaler"]` (the fp16 gradient scaler; {} otherwise), `mapping_encoder` and
the model's newer keys (`ModelSpec`'s defaults) are optional: files written before them lack
them and load as they are, so VERSION stays 1.

A file of another kind (an export, a torchvision state dict or pickled model) is named as such
in one line, with what to pass instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from casm_deploy.common.files import atomic_file, make_folders
from casm_deploy.data.draw import synthetic_labels
from casm_deploy.errors import UserError
from casm_deploy.models.mapping import SaliencyModel
from casm_deploy.models.spec import ModelSpec
from casm_deploy.torchfile import CHECKPOINT_WANTED, is_torchvision_weights, load_file
from casm_deploy.version import __version__

FORMAT = "casm-deploy/checkpoint"
VERSION = 1


def save_atomic(payload: Any, path: str | Path) -> None:
    """`torch.save` through `files.atomic_file`: a crash leaves the old file or the new."""
    path = Path(path)
    make_folders(path.parent)
    with atomic_file(path) as f:
        torch.save(payload, f)


RUN_CHECKPOINT = "checkpoint.pt"  # a training run's checkpoint in its folder


def checkpoint_spec(checkpoint: dict[str, Any], path: str | Path) -> ModelSpec:
    """The model description of a loaded checkpoint (`ModelSpec.from_checkpoint` of its
    `model` entry).

    Raises:
        UserError: it is missing, or a key is missing or of another type (the message names it).
    """
    return ModelSpec.from_checkpoint(checkpoint.get("model"), path)


def export_spec(checkpoint: dict[str, Any], path: str | Path) -> ModelSpec:
    """The model description an export of the checkpoint records: its `data_kind` as well as
    it is known (`training_data_kind`: looked for where the checkpoint does not record it).

    Raises:
        UserError: as `checkpoint_spec`.
    """
    spec = checkpoint_spec(checkpoint, path)
    return dataclasses.replace(spec, data_kind=training_data_kind(checkpoint, path) or None)


@dataclass
class TrainingCheckpoint:
    """A training run at an epoch end, as `save_training` writes it and `load_training` reads it.

    `phase` and `epoch` say where the run goes on: `epoch` epochs of `phase` (pretrain or casm)
    are done, or the run is "done". `snapshots` is the thinning pool, kept in the file
    `pool-<step>.pt` beside the checkpoint, which names it (`pool_file`; None for no pool).
    """

    model: ModelSpec  # the `model` entry (`ModelSpec.to_checkpoint` / `from_checkpoint`)
    config: dict[str, Any]  # `config.config_to_dict` of the run's TrainConfig
    phase: str
    epoch: int
    step: int  # the CASM steps taken
    encoder: dict[str, torch.Tensor]
    decoder: dict[str, torch.Tensor]
    mapping_encoder: dict[str, torch.Tensor] | None  # the unshared mapping's own encoder
    optimizers: dict[str, Any]  # pretrain, pretrain_schedule, casm (classifier, decoder, scaler)
    rng: dict[str, Any]  # torch (the CPU generator) and python (the thinning pool's RNG)
    metrics: dict[str, Any]  # the epoch's line of metrics.jsonl
    snapshots: list[dict[str, torch.Tensor]] = field(default_factory=list)


def save_training(run_dir: Path, checkpoint: TrainingCheckpoint) -> None:
    """Write `run_dir/checkpoint.pt` and the pool it names, atomically; delete older pools.

    The pool goes to a file named by the step, written before the checkpoint that names it, so
    a kill at any point leaves a checkpoint and the pool of that same moment.
    """
    c = checkpoint
    pool_file = None
    if c.snapshots:
        pool_file = f"pool-{c.step}.pt"
        save_atomic({"snapshots": c.snapshots}, run_dir / pool_file)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "package_version": __version__,
        "model": c.model.to_checkpoint(),
        "config": c.config,
        "phase": c.phase,
        "epoch": c.epoch,
        "step": c.step,
        "encoder": c.encoder,
        "decoder": c.decoder,
        "mapping_encoder": c.mapping_encoder,
        "optimizers": c.optimizers,
        "pool_file": pool_file,
        "rng": c.rng,
        "metrics": c.metrics,
    }
    save_atomic(payload, run_dir / RUN_CHECKPOINT)
    for old in run_dir.glob("pool-*.pt"):
        if old.name != pool_file:
            old.unlink()


def load_training(run_dir: Path) -> TrainingCheckpoint:
    """The checkpoint of the run in `run_dir` and its pool, to resume it.

    Raises:
        UserError: as `load_checkpoint`, for the checkpoint or its pool file, or as
            `checkpoint_spec`.
    """
    path = run_dir / RUN_CHECKPOINT
    checkpoint = load_checkpoint(path)
    pool_file = checkpoint["pool_file"]
    return TrainingCheckpoint(
        model=checkpoint_spec(checkpoint, path),
        config=checkpoint.get("config"),
        phase=checkpoint["phase"],
        epoch=checkpoint["epoch"],
        step=checkpoint["step"],
        encoder=checkpoint["encoder"],
        decoder=checkpoint["decoder"],
        mapping_encoder=checkpoint.get("mapping_encoder"),  # absent before --unshared
        optimizers=checkpoint["optimizers"],
        rng=checkpoint["rng"],
        metrics=checkpoint["metrics"],
        snapshots=load_file(run_dir / pool_file)["snapshots"] if pool_file else [],
    )


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
    mapping: tuple[str, int] | None = None,
) -> Path:
    """A checkpoint of this schema holding a freshly initialised mapping, for tests and
    benchmarks: an untrained mapping costs what a trained one costs. `mapping`: the arch and
    width of the mapping's own encoder (implies not `shared_encoder`)."""
    torch.manual_seed(seed)
    shared_encoder = shared_encoder and mapping is None
    mapping_arch, mapping_width = mapping or (None, None)
    spec = ModelSpec(
        arch=arch,
        width=width,
        num_classes=len(wnids),
        upsample="nearest",
        image_size=image_size,
        wnids=tuple(wnids),
        names=tuple(names),
        shared_encoder=shared_encoder,
        mapping_arch=mapping_arch,
        mapping_width=mapping_width,
    )
    masker = spec.build()
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": spec.to_checkpoint(),
        "config": config or {},
    }
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
            f"{path}: this is a torchvision classifier's weights (a state dict), which "
            f"train --weights takes; {wanted}"
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


def masker_from_checkpoint(
    checkpoint: dict[str, Any], path: str | Path = "checkpoint"
) -> SaliencyModel:
    """Rebuild the SaliencyModel (eval mode, CPU) from a loaded checkpoint (read from `path`).

    Raises:
        UserError: the model description or the weights are missing or do not fit.
    """
    spec = checkpoint_spec(checkpoint, path)
    masker = spec.build()
    load_weights(masker.encoder, checkpoint.get("encoder"), path, "encoder")
    load_weights(masker.decoder, checkpoint.get("decoder"), path, "decoder")
    if not spec.shared_encoder:
        load_weights(
            masker.mapping_encoder, checkpoint.get("mapping_encoder"), path, "mapping_encoder"
        )
    return masker.eval()


def load_masker(path: str | Path, wanted: str = "") -> tuple[SaliencyModel, ModelSpec]:
    """The SaliencyModel of a checkpoint file and its model description.

    Raises:
        UserError: as `load_checkpoint` and `masker_from_checkpoint`.
    """
    checkpoint = load_checkpoint(path, wanted)
    return masker_from_checkpoint(checkpoint, path), checkpoint_spec(checkpoint, path)
