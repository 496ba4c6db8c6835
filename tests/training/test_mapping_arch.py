"""Training a mapping with an encoder of its own (`--mapping-arch`, `--mapping-width`) and a
classifier of any backbone."""

import pytest
import torch

from casm_deploy.config import ConfigError, TrainConfig


def test_a_mapping_arch_or_width_implies_unshared_and_names_the_run():
    cfg = TrainConfig(mapping_arch="mobilenet_v3_small", mapping_width=16)
    assert not cfg.shared_encoder and cfg.mapping_encoder == ("mobilenet_v3_small", 16)
    assert cfg.run_name == "l100-entropy-map-mobilenet_v3_small-w16-s0"
    assert TrainConfig(mapping_width=8).mapping_encoder == ("resnet18", 8)
    assert TrainConfig(unshared=True).mapping_encoder == ("resnet18", 32)
    assert TrainConfig().mapping_encoder is None
    with pytest.raises(ConfigError, match="--mapping-arch must be one of"):
        TrainConfig(mapping_arch="vgg16")
    with pytest.raises(ConfigError, match="--arch must be one of"):
        TrainConfig(arch="vgg16")


def test_a_mapping_of_its_own_trains_from_fresh_weights_beside_another_classifier(
    tiny_data, tmp_path
):
    """A MobileNetV3 classifier, a ResNet mapping of its own: the mapping starts from its own
    initial weights (not a copy of the classifier, which it could not be), its loss moves it,
    and the checkpoint says what it is."""
    from casm_deploy.checkpoint import load_masker
    from casm_deploy.models.mapping import build_masker
    from casm_deploy.training.train import run

    common = dict(data=str(tiny_data), out=str(tmp_path), image_size=32, workers=0)
    common |= dict(batch_size=8, pretrain_batch_size=8, epoch_fraction=1.0, pretrain_epochs=1)
    run_dir = run(
        TrainConfig(
            name="m",
            arch="mobilenet_v3_small",
            width=16,
            epochs=1,
            mapping_arch="resnet18",
            mapping_width=8,
            **common,
        )
    )
    masker, spec = load_masker(run_dir / "checkpoint.pt")
    assert spec.shared_encoder is False
    assert (spec.arch, spec.mapping_arch, spec.mapping_width) == (
        "mobilenet_v3_small",
        "resnet18",
        8,
    )
    assert masker.encoder.arch == "mobilenet_v3_small" and masker.mapping_encoder.width == 8
    torch.manual_seed(0)  # the run's seed: the weights it started from
    fresh = build_masker(
        "mobilenet_v3_small", 3, 16, shared_encoder=False, mapping_arch="resnet18", mapping_width=8
    )
    moved = [
        name
        for name, value in masker.mapping_encoder.state_dict().items()
        if name.endswith("weight")
        and not torch.equal(value, fresh.mapping_encoder.state_dict()[name])
    ]
    assert "conv1.weight" in moved and "fc.weight" not in moved  # trained, but not its head
    masks = masker.masks_only()(torch.rand(2, 3, 32, 32))
    assert masks.shape == (2, 1, 32, 32)
