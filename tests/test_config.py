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
