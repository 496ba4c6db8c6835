import pytest

from casm_deploy.config import PRESETS, TrainConfig, config_from_dict, config_to_dict


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
    assert (paper.fixed_classifier, paper.resolved_hp, paper.resolved_smf) == (fixed, hp, smf)
    assert paper.resolved_lambda_r == entropy
    by_classification = TrainConfig(reproduce=preset, score="classification", lambda_r=None)
    assert by_classification.resolved_lambda_r == classification
    assert TrainConfig(reproduce=preset).resolved_lambda_r == 2.5  # tuned for the embedded data


def test_explicit_overrides_win():
    cfg = TrainConfig(reproduce="L100", lambda_r=3.0, hp=0.2, smf=7)
    assert (cfg.resolved_lambda_r, cfg.resolved_hp, cfg.resolved_smf) == (3.0, 0.2, 7)


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
    from casm_deploy.config import train_config

    cfg = train_config("imagenet", weights="resnet50.pth")
    assert (cfg.arch, cfg.width, cfg.image_size, cfg.recipe) == ("resnet50", 64, 224, "imagenet")
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.lr_decoder) == (1e-3, 0.9, 1e-4, 1e-3)
    assert (cfg.epochs, cfg.batch_size, cfg.epoch_fraction, cfg.lr_decay_every) == (
        60,
        128,
        0.2,
        20,
    )
    assert (cfg.resize, cfg.fill, cfg.pretrain_epochs) == ("random-resized-crop", "mean", 0)
    assert cfg.resolved_lambda_r == 10  # the reference's L100 value
    other = train_config("imagenet", weights="w.pth", reproduce="L", batch_size=64)
    assert (other.resolved_lambda_r, other.batch_size, other.lr) == (14, 64, 1e-3)  # given wins
    assert train_config() == TrainConfig()  # the default recipe is the dataclass's defaults
    with pytest.raises(ValueError, match="--weights"):
        train_config("imagenet")
    with pytest.raises(ValueError, match="--recipe"):
        train_config("cifar")


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
