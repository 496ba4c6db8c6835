"""`ModelSpec`, the model's one description: what the checkpoint's `model` entry and an export's
metadata hold, each written and read by one pair over the dataclass's fields, so that a new field
is one edit (and files written before it still read)."""

import dataclasses
import json

import pytest

from casm_deploy.artifact import METADATA_ORDER, base_metadata
from casm_deploy.config import TrainConfig
from casm_deploy.errors import UserError
from casm_deploy.models.spec import ModelSpec

WNIDS, NAMES = ("n1", "n2", "n3"), ("one", "two", "three")
SHARED = ModelSpec("resnet18", 8, 3, "nearest", 32, WNIDS, NAMES, data_kind="synthetic")
UNSHARED = ModelSpec("resnet18", 8, 3, "bilinear", 32, WNIDS, NAMES, shared_encoder=False)
OWN = dataclasses.replace(UNSHARED, mapping_arch="mobilenet_v3_small", mapping_width=16)
SPECS = {"shared": SHARED, "unshared": UNSHARED, "own mapping": OWN}


def test_the_checkpoint_entry_is_the_one_written_so_far():
    """Keys, order and value types (lists) as `train` has always written them: a new file is
    read by older code, and a seeded run gives the same bytes."""
    assert SHARED.to_checkpoint() == {
        "arch": "resnet18",
        "width": 8,
        "num_classes": 3,
        "upsample": "nearest",
        "image_size": 32,
        "wnids": list(WNIDS),
        "names": list(NAMES),
        "shared_encoder": True,
        "data_kind": "synthetic",
    }
    assert list(SHARED.to_checkpoint()) == [
        "arch", "width", "num_classes", "upsample", "image_size", "wnids", "names",
        "shared_encoder", "data_kind",
    ]  # fmt: skip
    entry = OWN.to_checkpoint()
    assert list(entry)[-3:] == ["shared_encoder", "mapping_arch", "mapping_width"]
    assert (entry["shared_encoder"], entry["mapping_arch"], entry["mapping_width"]) == (
        False,
        "mobilenet_v3_small",
        16,
    )
    assert type(entry["wnids"]) is list and type(entry["names"]) is list


def test_the_metadata_entries_are_the_ones_written_so_far():
    assert SHARED.to_metadata() == {
        "arch": "resnet18",
        "width": "8",
        "num_classes": "3",
        "upsample": "nearest",
        "image_size": "32",
        "wnids": json.dumps(list(WNIDS)),
        "names": json.dumps(list(NAMES)),
        "training_data": "synthetic",
    }
    assert UNSHARED.to_metadata()["training_data"] == "unknown"  # not recorded
    assert (OWN.to_metadata()["mapping_arch"], OWN.to_metadata()["mapping_width"]) == (
        "mobilenet_v3_small",
        "16",
    )
    # an unshared copy of the classifier names its arch and width too
    assert UNSHARED.to_metadata()["mapping_width"] == "8"


@pytest.mark.parametrize("name", SPECS)
def test_both_files_give_the_spec_back(name):
    spec = SPECS[name]
    assert ModelSpec.from_checkpoint(spec.to_checkpoint(), "c.pt") == spec
    assert ModelSpec.from_metadata(spec.to_metadata(), "m.onnx") == spec


def test_the_metadata_keeps_its_order_around_the_spec():
    meta = base_metadata(OWN, {"arch": "resnet18"}, "0" * 64, masks_only=True)
    assert list(meta) == list(METADATA_ORDER)
    assert ModelSpec.from_metadata(meta, "m.onnx") == OWN
    assert "mapping_arch" not in base_metadata(SHARED, {}, "0" * 64)


def test_older_checkpoints_read_with_the_defaults():
    """Files from before names, shared_encoder, --mapping-arch and data_kind."""
    first = {"arch": "resnet18", "width": 8, "num_classes": 3, "upsample": "nearest"}
    first |= {"image_size": 32, "wnids": list(WNIDS)}
    spec = ModelSpec.from_checkpoint(first, "old.pt")
    assert spec == ModelSpec("resnet18", 8, 3, "nearest", 32, WNIDS)
    assert (spec.names, spec.shared_encoder, spec.mapping_arch, spec.data_kind) == (
        (),
        True,
        None,
        None,
    )
    # unshared before --mapping-arch: the mapping's encoder is a copy of the classifier's
    unshared = ModelSpec.from_checkpoint({**first, "shared_encoder": False}, "old.pt")
    assert (unshared.mapping_arch, unshared.mapping_width) == ("resnet18", 8)
    assert unshared.build().mapping_encoder is not None
    # a newer file's key this version does not know is left alone
    assert ModelSpec.from_checkpoint({**first, "later": 1}, "new.pt") == spec


def test_older_exports_read_with_the_defaults():
    meta = {k: v for k, v in SHARED.to_metadata().items() if k != "training_data"}
    assert ModelSpec.from_metadata(meta, "old.onnx").data_kind is None
    bare = {"arch": "resnet18", "width": "8", "num_classes": "3", "upsample": "nearest"}
    spec = ModelSpec.from_metadata({**bare, "image_size": "32"}, "old.onnx")
    assert (spec.wnids, spec.names, spec.shared_encoder) == ((), (), True)


def test_an_unknown_data_kind_reads_as_not_known():
    """As the readers before did: a value outside the choices is no error, only not known."""
    assert ModelSpec.from_checkpoint({**SHARED.to_checkpoint(), "data_kind": "x"}, "c.pt") == (
        dataclasses.replace(SHARED, data_kind=None)
    )
    meta = {**SHARED.to_metadata(), "training_data": "unknown"}
    assert ModelSpec.from_metadata(meta, "m.onnx").data_kind is None


@pytest.mark.parametrize(
    "change,says",
    [
        ({"arch": None}, "the checkpoint's model description has no 'arch'"),
        ({"image_size": "64"}, "model image_size '64' is not an integer"),
        ({"width": 0}, "model width 0 is not positive"),
        ({"num_classes": True}, "model num_classes True is not an integer"),
        ({"arch": "vgg11"}, "model arch 'vgg11' is not one of resnet18, resnet34"),
        ({"upsample": "cubic"}, "model upsample 'cubic' is not nearest or bilinear"),
        ({"upsample": 2}, "model upsample 2 is not a string"),
        ({"wnids": ["a"]}, "model wnids lists 1 classes, not 3"),
        ({"names": [1, 2, 3]}, "model names is not a list of strings"),
        ({"shared_encoder": "no"}, "model shared_encoder 'no' is not a bool"),
        ({"shared_encoder": False, "mapping_arch": "vgg"}, "model mapping_arch 'vgg' is not one"),
        ({"shared_encoder": False, "mapping_width": -1}, "model mapping_width -1 is not positive"),
    ],
)
def test_a_malformed_checkpoint_entry_names_the_file_and_the_key(change, says):
    model = {k: v for k, v in {**SHARED.to_checkpoint(), **change}.items() if v is not None}
    with pytest.raises(UserError, match=f"^bad.pt: {says}") as raised:
        ModelSpec.from_checkpoint(model, "bad.pt")
    assert "\n" not in str(raised.value)


def test_a_checkpoint_without_a_model_entry():
    for entry in (None, [], "resnet18"):
        with pytest.raises(UserError, match="^bad.pt: the checkpoint has no 'model' description"):
            ModelSpec.from_checkpoint(entry, "bad.pt")


@pytest.mark.parametrize(
    "change,says",
    [
        ({"image_size": None}, "its metadata has no 'image_size'"),
        ({"num_classes": "0"}, "metadata num_classes '0' is not a positive integer"),
        ({"width": "8.5"}, "metadata width '8.5' is not a positive integer"),
        ({"wnids": "{not json"}, "metadata wnids is not a JSON list of strings"),
        ({"names": '["x"]'}, "metadata names lists 1 classes, not 3"),
    ],
)
def test_malformed_metadata_names_the_file_and_the_key(change, says):
    meta = {k: v for k, v in {**SHARED.to_metadata(), **change}.items() if v is not None}
    with pytest.raises(UserError, match=f"^m.onnx: {says}"):
        ModelSpec.from_metadata(meta, "m.onnx")


def test_the_spec_of_a_training_config_builds_its_model():
    cfg = TrainConfig(data="d", width=8, image_size=32, mapping_arch="mobilenet_v3_small")
    spec = ModelSpec.from_config(cfg, list(WNIDS), list(NAMES), "images")
    assert spec == dataclasses.replace(OWN, upsample="nearest", mapping_width=8, data_kind="images")
    masker = spec.build()
    assert masker.encoder.arch == "resnet18" and masker.mapping_encoder.arch == "mobilenet_v3_small"
    shared = ModelSpec.from_config(TrainConfig(data="d", width=8), list(WNIDS), list(NAMES))
    assert shared.shared_encoder and shared.build().mapping_encoder is None
    assert shared.image_size == TrainConfig().image_size and shared.data_kind is None


# --- a new field: one edit --------------------------------------------------------------------


def spec_with_a_new_field() -> type:
    """ModelSpec with one more field, as one line in the class would add it: nothing else."""
    return dataclasses.make_dataclass(
        "NewSpec",
        [("decoder_channels", int, dataclasses.field(default=64))],
        bases=(ModelSpec,),
        frozen=True,
    )


def test_a_new_field_is_carried_by_both_files_without_touching_the_readers():
    new = spec_with_a_new_field()
    spec = new(
        **{f.name: getattr(OWN, f.name) for f in dataclasses.fields(OWN)}, decoder_channels=32
    )
    entry = spec.to_checkpoint()
    assert list(entry)[-1] == "decoder_channels" and entry["decoder_channels"] == 32
    assert new.from_checkpoint(entry, "c.pt") == spec
    meta = spec.to_metadata()
    assert meta["decoder_channels"] == "32"
    assert new.from_metadata(meta, "m.onnx") == spec
    # the exported file's metadata carries it too, after the keys exports always had
    written = base_metadata(spec, {}, "0" * 64)
    assert list(written)[-1] == "decoder_channels"
    assert new.from_metadata(written, "m.onnx") == spec
    # files written before it read as its default; a bad value is named like any other's
    assert new.from_checkpoint(OWN.to_checkpoint(), "old.pt").decoder_channels == 64
    assert new.from_metadata(OWN.to_metadata(), "old.onnx").decoder_channels == 64
    with pytest.raises(UserError, match="^c.pt: model decoder_channels 'x' is not an integer"):
        new.from_checkpoint({**entry, "decoder_channels": "x"}, "c.pt")
    with pytest.raises(UserError, match="^m.onnx: metadata decoder_channels 'x' is not a pos"):
        new.from_metadata({**meta, "decoder_channels": "x"}, "m.onnx")
