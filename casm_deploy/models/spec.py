"""The model's description: `ModelSpec`, everything that builds the network and names its classes.

TrainConfig -> `ModelSpec.from_config` -> `build` (the SaliencyModel) and the two files that
carry it: a checkpoint's `model` entry (`to_checkpoint` / `from_checkpoint`, checkpoint.py) and an
export's metadata (`to_metadata` / `from_metadata`, artifact.py and deploy/runtime/info.py).

Both pairs go over `dataclasses.fields(ModelSpec)` by each field's type, so a new field is one
line here (with the default that files written before it read as). What a field's `metadata=`
says, where it differs from the rule:
- LABELS: one entry per class (none, or `num_classes` of them);
- METADATA_KEY: its key in an export's metadata (default: its name; None: not written there);
- UNKNOWN: the metadata's text for None ("not known"); a recorded value outside the field's
  choices reads as None, in either file, rather than as an error.

Light on purpose (no torch): `build` imports the networks when called.
"""

from __future__ import annotations

import functools
import json
import re
import types
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin, get_type_hints

from casm_deploy.config import Arch, TrainConfig, Upsample
from casm_deploy.errors import UserError

if TYPE_CHECKING:
    from casm_deploy.models.mapping import SaliencyModel

# What a model learned from: `data synth`'s shapes, or a folder of images.
DataKind = Literal["synthetic", "images"]

LABELS = "labels"
METADATA_KEY = "metadata_key"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class ModelSpec:
    """What builds the network (`build`) and names its classes.

    The checkpoint's `model` entry holds these fields, in this order, under these names, lists for
    tuples, None left out; an export's metadata holds them as strings (lists as JSON).
    """

    arch: Arch  # the classifier
    width: int  # its base width (64: torchvision's)
    num_classes: int
    upsample: Upsample  # the decoder's final upsampling
    image_size: int  # the side of the square images it takes
    wnids: tuple[str, ...] = field(default=(), metadata={LABELS: True})  # class ids, or none
    names: tuple[str, ...] = field(default=(), metadata={LABELS: True})  # human names, or none
    # the mapping reads the classifier's features; in an export's metadata, the absence of
    # mapping_arch says it (older checkpoints lack it: they shared)
    shared_encoder: bool = field(default=True, metadata={METADATA_KEY: None})
    # the mapping's own encoder, when unshared (None when shared; files before --mapping-arch
    # lack them: the classifier's arch and width)
    mapping_arch: Arch | None = None
    mapping_width: int | None = None
    # what it learned from (None: not recorded); an export's `training_data`
    data_kind: DataKind | None = field(
        default=None, metadata={METADATA_KEY: "training_data", UNKNOWN: "unknown"}
    )

    def __post_init__(self) -> None:
        if self.shared_encoder:
            if self.mapping_arch is not None or self.mapping_width is not None:
                raise ValueError("a shared encoder has no mapping arch or width of its own")
            return
        if self.mapping_arch is None:  # unshared: a copy of the classifier unless told
            object.__setattr__(self, "mapping_arch", self.arch)
        if self.mapping_width is None:
            object.__setattr__(self, "mapping_width", self.width)

    @classmethod
    def from_config(
        cls,
        cfg: TrainConfig,
        wnids: list[str] | tuple[str, ...],
        names: list[str] | tuple[str, ...],
        data_kind: DataKind | None = None,
    ) -> ModelSpec:
        """The model `train` builds from `cfg`, for the classes of its data."""
        mapping_arch, mapping_width = cfg.mapping_encoder or (None, None)
        return cls(
            arch=cfg.arch,
            width=cfg.width,
            num_classes=len(wnids),
            upsample=cfg.upsample,
            image_size=cfg.image_size,
            wnids=tuple(wnids),
            names=tuple(names),
            shared_encoder=cfg.shared_encoder,
            mapping_arch=mapping_arch,
            mapping_width=mapping_width,
            data_kind=data_kind,
        )

    def build(self) -> SaliencyModel:
        """The SaliencyModel of this description, with random weights."""
        from casm_deploy.models.mapping import build_masker

        return build_masker(
            self.arch,
            self.num_classes,
            self.width,
            self.upsample,
            self.shared_encoder,
            self.mapping_arch,
            self.mapping_width,
        )

    # --- the checkpoint's `model` entry -------------------------------------------------------

    def to_checkpoint(self) -> dict[str, Any]:
        """The checkpoint's `model` entry: primitives (tuples as lists), None left out."""
        entry = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                entry[f.name] = list(value) if isinstance(value, tuple) else value
        return entry

    @classmethod
    def from_checkpoint(cls, model: Any, path: str | Path) -> ModelSpec:
        """A checkpoint's `model` entry, checked key by key; keys it lacks take their defaults
        (files written before them), keys this version does not know are left alone.

        Raises:
            UserError: it is missing, or a key is missing or not of its kind (naming the key).
        """
        if not isinstance(model, dict):
            raise UserError(f"{path}: the checkpoint has no 'model' description (arch, sizes)")
        values = {}
        for f in fields(cls):
            value = model.get(f.name)
            if value is None:
                if _required(f):
                    raise UserError(f"{path}: the checkpoint's model description has no {f.name!r}")
                continue
            kind, choices = _kind(cls, f)
            if UNKNOWN in f.metadata and value not in choices:
                continue  # recorded, but not a value this version knows: not known
            values[f.name] = _checked(kind, choices, value, f"{path}: model {f.name}")
        if values.get("shared_encoder", True):  # the readers before ignored a shared one's
            values.pop("mapping_arch", None)
            values.pop("mapping_width", None)
        return _with_labels(cls, values, f"{path}: model")

    # --- an export's metadata -----------------------------------------------------------------

    def to_metadata(self) -> dict[str, str]:
        """The metadata's entries of the model (strings: ONNX `metadata_props` hold strings;
        lists and booleans as JSON), None left out (or written as the field's UNKNOWN)."""
        entries = {}
        for f in fields(self):
            key = f.metadata.get(METADATA_KEY, f.name)
            value = getattr(self, f.name)
            if key is None or (value is None and UNKNOWN not in f.metadata):
                continue
            if value is None:
                entries[key] = f.metadata[UNKNOWN]
            elif isinstance(value, tuple | bool):
                entries[key] = json.dumps(list(value) if isinstance(value, tuple) else value)
            else:
                entries[key] = str(value)
        return entries

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], path: str | Path) -> ModelSpec:
        """An export's metadata (strings; lists are JSON), checked key by key; keys it lacks
        take their defaults (exports written before them).

        Its names are not checked against the choices this version builds (an arch added later
        is no reason to refuse a file inference only runs).

        Raises:
            UserError: a key is missing or not of its kind (the message names it).
        """
        values = {}
        for f in fields(cls):
            key = f.metadata.get(METADATA_KEY, f.name)
            if key is None:
                continue
            if key not in meta:
                if _required(f):
                    raise UserError(
                        f"{path}: its metadata has no {key!r} (not a complete casm-deploy export)"
                    )
                continue
            kind, choices = _kind(cls, f)
            if UNKNOWN in f.metadata:
                if meta[key] in choices:
                    values[f.name] = meta[key]
                continue
            values[f.name] = _parsed(kind, meta[key], f"{path}: metadata {key}")
        # mapping_arch and mapping_width are written only when unshared, and say it
        values["shared_encoder"] = values.get("mapping_arch") is None
        if values["shared_encoder"]:
            values.pop("mapping_width", None)
        return _with_labels(cls, values, f"{path}: metadata")


def _required(f: Field) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _kind(cls: type, f: Field) -> tuple[type, tuple[Any, ...]]:
    """A field's type without its None (int, bool, str or tuple), and its choices (a
    Literal's values; () for any other type)."""
    hint = _hints(cls)[f.name]
    if get_origin(hint) in (Union, types.UnionType):
        hint = next(arg for arg in get_args(hint) if arg is not type(None))
    if get_origin(hint) is Literal:
        return str, get_args(hint)
    return (tuple if get_origin(hint) is tuple else hint), ()


def _choices(choices: tuple[Any, ...]) -> str:
    return " or ".join(choices) if len(choices) == 2 else f"one of {', '.join(choices)}"


def _checked(kind: type, choices: tuple[Any, ...], value: Any, where: str) -> Any:
    """A value of a checkpoint (pickled primitives) of its field's kind."""
    if kind is bool and not isinstance(value, bool):
        raise UserError(f"{where} {value!r} is not a bool")
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise UserError(f"{where} {value!r} is not an integer")
        if value < 1:
            raise UserError(f"{where} {value} is not positive")
    if kind is str:
        if not isinstance(value, str):
            raise UserError(f"{where} {value!r} is not a string")
        if choices and value not in choices:
            raise UserError(f"{where} {value!r} is not {_choices(choices)}")
    if kind is tuple:
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{where} is not a list of strings")
        return tuple(value)
    return value


def _parsed(kind: type, value: Any, where: str) -> Any:
    """A value of an export's metadata (a string; JSON for lists and booleans; a JSON archive
    file may hold numbers) as its field's kind."""
    if kind is int:
        if isinstance(value, bool) or not re.fullmatch(r"[0-9]+", str(value)) or int(value) < 1:
            raise UserError(f"{where} {value!r} is not a positive integer")
        return int(value)
    if kind is str:
        return str(value)
    try:
        parsed = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        parsed = None
    if kind is bool:
        if not isinstance(parsed, bool):
            raise UserError(f"{where} {value!r} is not true or false")
        return parsed
    if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
        raise UserError(f"{where} is not a JSON list of strings")
    return tuple(parsed)


def _with_labels(cls: type[ModelSpec], values: dict[str, Any], where: str) -> ModelSpec:
    """The spec of `values`, once each LABELS field has one entry per class (or none)."""
    for f in fields(cls):
        labels = values.get(f.name, ())
        if f.metadata.get(LABELS) and len(labels) not in (0, values["num_classes"]):
            raise UserError(
                f"{where} {f.name} lists {len(labels)} classes, not {values['num_classes']}"
            )
    return cls(**values)
