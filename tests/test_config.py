import dataclasses

import pytest

from casm_deploy.config import (
    PRESETS,
    RECIPES,
    EvalConfig,
    ExportConfig,
    InferConfig,
    SynthConfig,
    TinyImagenetConfig,
    TrainConfig,
    VisualizeConfig,
    config_from_dict,
    config_to_dict,
)
from casm_deploy.errors import UserError
from casm_deploy.options import ConfigError, choices_of, field_types, is_option, make_config

CONFIGS = [
    SynthConfig,
    TinyImagenetConfig,
    TrainConfig,
    EvalConfig,
    VisualizeConfig,
    ExportConfig,
    InferConfig,
]


@pytest.mark.parametrize(
    "preset, fixed, hp, smf, entropy, classification",
    [
        ("F", True, 0.0, None, 2.5, 9),
        ("L", False, 0.0, None, 14, 18),
        ("FL", False, 0.5, None, 7.5, 11),
        ("L100", False, 0.5, 100, 10, 17),
        ("L1000", False, 0.5, 1000, 10, 17),
    ],
)
def test_presets_are_the_reference_settings(preset, fixed, hp, smf, entropy, classification):
    paper = TrainConfig(reproduce=preset, lambda_r=None)
    assert (paper.fixed_classifier, paper.pool_probability, paper.snapshot_every) == (
        fixed,
        hp,
        smf,
    )
    assert paper.area_weight == entropy
    by_classification = TrainConfig(reproduce=preset, score="classification", lambda_r=None)
    assert by_classification.area_weight == classification
    assert TrainConfig(reproduce=preset).area_weight == 2.5  # tuned for the embedded data


def test_explicit_overrides_win():
    cfg = TrainConfig(reproduce="L100", lambda_r=3.0, hp=0.2, smf=7)
    assert (cfg.area_weight, cfg.pool_probability, cfg.snapshot_every) == (3.0, 0.2, 7)


def test_bad_values_are_refused():
    for kwargs in (
        {"reproduce": "X"},
        {"score": "kl"},
        {"upsample": "cubic"},
        {"epoch_fraction": 0},
    ):
        with pytest.raises(ValueError):
            TrainConfig(**kwargs)


def test_round_trip_through_json_ready_dict():
    cfg = TrainConfig(reproduce="FL", name="x", lambda_r=1.5)
    assert config_from_dict(TrainConfig, config_to_dict(cfg)) == cfg
    assert set(PRESETS) == {"F", "L", "FL", "L100", "L1000"}


def test_imagenet_recipe_is_the_reference_training():
    cfg = make_config(TrainConfig, recipe="imagenet", weights="resnet50.pth")
    assert (cfg.arch, cfg.width, cfg.image_size, cfg.recipe) == ("resnet50", 64, 224, "imagenet")
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.lr_decoder) == (1e-3, 0.9, 1e-4, 1e-3)
    assert (cfg.epochs, cfg.batch_size, cfg.epoch_fraction, cfg.lr_decay_every) == (
        60,
        128,
        0.2,
        20,
    )
    assert (cfg.resize, cfg.fill, cfg.pretrain_epochs) == ("random-resized-crop", "mean", 0)
    assert cfg.area_weight == 10  # the reference's L100 value
    other = make_config(
        TrainConfig, recipe="imagenet", weights="w.pth", reproduce="L", batch_size=64
    )
    assert (other.area_weight, other.batch_size, other.lr) == (14, 64, 1e-3)  # given wins
    assert make_config(TrainConfig) == TrainConfig()  # the default recipe: the defaults
    with pytest.raises(ValueError, match="--weights"):
        make_config(TrainConfig, recipe="imagenet")
    with pytest.raises(ValueError, match="must be default, tiny-imagenet or imagenet, not 'cifar'"):
        make_config(TrainConfig, recipe="cifar")


def test_tiny_imagenet_recipe_and_a_casm_run_from_its_classifier():
    cfg = make_config(TrainConfig, recipe="tiny-imagenet")
    assert (cfg.resize, cfg.crop_scale, cfg.pretrain_epochs) == ("random-resized-crop", 0.35, 20)
    assert (cfg.fill, cfg.area_weight, cfg.arch, cfg.width) == ("mean", 2.0, "resnet18", 32)
    casm = make_config(TrainConfig, recipe="tiny-imagenet", weights="c.pt", pretrain_epochs=0)
    assert (casm.pretrain_epochs, casm.crop_scale, casm.weights) == (0, 0.35, "c.pt")
    with pytest.raises(ValueError, match="--crop-scale"):
        TrainConfig(crop_scale=0)


def test_new_training_options_are_checked():
    for kwargs in (
        {"fill": "grey"},
        {"pool_device": "disk"},
        {"resize": "crop"},
        {"batch_size": 0},
        {"pretrain_batch_size": 0},
        {"workers": -1},
    ):
        with pytest.raises(ValueError):
            TrainConfig(**kwargs)


def test_recipes_and_presets_are_the_choices_of_their_fields():
    types = field_types(TrainConfig)
    assert choices_of(types["recipe"]) == tuple(RECIPES)
    assert choices_of(types["reproduce"]) == tuple(PRESETS)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda cls: cls.__name__)
def test_every_choice_field_refuses_other_values_with_one_error_type(cls):
    """A Literal field refuses a value outside its choices, naming its option; the error is a
    UserError (one line from the CLI) and a ValueError (for code), for every config."""
    required = {"weights": "w.pth"} if cls is TrainConfig else {}
    types = field_types(cls)
    for f in dataclasses.fields(cls):
        if choices_of(types[f.name]):
            with pytest.raises(ConfigError, match="must be .*, not 'nonsense'") as caught:
                cls(**required, **{f.name: "nonsense"})
            assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"copies": 3}, "--copies must be 1 or 2, not 3"),
        ({"right": "noise", "copies": 2}, "--right must be copy or clutter"),
        ({"right": "clutter"}, "--right clutter needs --copies 2"),
        ({"parts": 2, "copies": 2}, "--parts needs --copies 1"),
        ({"train_per_class": 0}, "--train-per-class must be at least 1, not 0"),
        ({"min_side": 8, "max_side": 8}, "need 16 <= --min-side <= --max-side"),
        ({"min_area": 0.5, "max_area": 0.4}, "need 0 < --min-area <= --max-area <= 0.9"),
        ({"seed": -1}, "--seed must be at least 0, not -1"),
    ],
)
def test_synth_config_checks_its_values_when_made(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SynthConfig(**kwargs)


def test_the_option_of_a_field_is_named_in_its_error():
    with pytest.raises(ConfigError, match="--batch must be at least 1, not 0"):
        EvalConfig(batch_size=0)  # the option is --batch
    with pytest.raises(ConfigError, match="--gradcam-stage must be 1, 2, 3 or 4, not 5"):
        EvalConfig(gradcam_stage=5)
    TrainConfig(smf=None, hp=None, workers=None)  # an unset override passes its range


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda cls: cls.__name__)
def test_each_option_is_declared_whole(cls):
    """Every field is a config value with a default, or one its config resolves from them
    (options.resolved: not given, not written); the options among them have a help text, and
    a --help group their class lists."""
    panels = getattr(cls, "PANELS", ())
    for f in dataclasses.fields(cls):
        if not is_option(f):
            assert not f.metadata.get("help") and f.name not in config_to_dict(cls()), f.name
            continue
        assert f.default is not dataclasses.MISSING, f.name
        if f.metadata.get("help"):
            assert f.metadata["panel"] in (None, *panels), f.name


def test_train_config_declares_its_options_by_help_group():
    """The fields of each --help group together, in the groups' order (PANELS)."""
    options = [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("help")]
    panels = [f.metadata["panel"] for f in options]
    groups = [panel for k, panel in enumerate(panels) if k == 0 or panel != panels[k - 1]]
    assert groups == [None, *TrainConfig.PANELS]


# A run's config.json as every version so far wrote it (this one by the version before the
# options were grouped): the keys, their order and the values' forms.
OLD_CONFIG_JSON = {
    "data": "data/synth", "out": "runs", "name": "t", "arch": "resnet18", "width": 8,
    "image_size": 64, "weights": "", "resume": False, "seed": 0, "workers": 0,
    "loader": "torch", "device": "auto", "channels_last": True, "amp": "off",
    "resize": "center-crop", "crop_scale": 0.08, "fill": "black", "skip_bad_images": False,
    "classifier_only": False, "pretrain_epochs": 1, "pretrain_lr": 0.002,
    "pretrain_batch_size": 64, "reproduce": "L100", "score": "entropy", "lambda_r": None,
    "epochs": 2, "batch_size": 64, "epoch_fraction": 0.1, "lr": 0.01, "momentum": 0.9,
    "weight_decay": 0.0001, "lr_decoder": 0.001, "lr_decay_every": 8, "pool_size": 30,
    "pool_device": "auto", "grad_clip": 10.0, "upsample": "nearest", "unshared": False,
    "mapping_arch": "", "mapping_width": None, "hp": None, "smf": 7, "recipe": "default",
}  # fmt: skip


def test_a_run_config_is_written_and_read_as_before():
    """config.json (and the checkpoint's `config`) keeps its keys, their order and values;
    one written before reads back, its preset resolved again."""
    cfg = config_from_dict(TrainConfig, OLD_CONFIG_JSON)
    assert (cfg.area_weight, cfg.pool_probability, cfg.snapshot_every) == (10.0, 0.5, 7)
    written = config_to_dict(cfg)
    assert list(written) == list(OLD_CONFIG_JSON) and written == OLD_CONFIG_JSON
    assert list(written) == list(TrainConfig.FILE_ORDER)
    # the resolved values are not written
    assert "run_name" not in written and cfg.run_name == "t"


def test_a_made_config_holds_its_resolved_values():
    cfg = TrainConfig(reproduce="F", lambda_r=None, score="classification", epochs=3)
    assert (cfg.fixed_classifier, cfg.area_weight, cfg.casm_epochs) == (True, 9.0, 3)
    assert cfg.run_name == "f-classification-s0" and cfg.mapping_encoder is None
    again = dataclasses.replace(cfg, reproduce="L1000", classifier_only=True)  # resolved anew
    assert (again.fixed_classifier, again.snapshot_every, again.area_weight) == (False, 1000, 17)
    assert (again.casm_epochs, again.run_name) == (0, "classifier-s0")
    assert cfg == TrainConfig(reproduce="F", lambda_r=None, score="classification", epochs=3)
