from typing import get_args

import pytest
import torch
import torchvision

from casm_deploy.config import Arch
from casm_deploy.errors import UserError
from casm_deploy.models.backbones import (
    ARCHS,
    RESNETS,
    WEIGHTS_WANTED,
    load_encoder_weights,
    weights_file,
)
from casm_deploy.models.encoder import Encoder, build_encoder
from casm_deploy.models.mapping import build_masker
from casm_deploy.torchfile import is_torchvision_weights, load_file


def load(encoder: Encoder, weights: str) -> list[str]:
    """What `train --weights` does: find the file, read it, load it."""
    path = weights_file(encoder.arch, weights)
    return load_encoder_weights(encoder, load_file(path, WEIGHTS_WANTED), path)


def test_full_width_encoder_matches_torchvision_state_dict(tmp_path):
    reference = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    encoder = Encoder("resnet18", num_classes=4, width=64)
    untouched = load(encoder, str(path))
    assert untouched == ["fc.bias", "fc.weight"]  # another number of classes: head kept
    assert torch.equal(encoder.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)


def test_weights_of_another_width_are_refused(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(UserError, match="width"):
        load(Encoder("resnet18", 4, width=32), str(path))


def test_named_weights_without_network_say_which_file(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(UserError) as error:
        load(Encoder("resnet50", 4), "IMAGENET1K_V2")
    message = str(error.value)
    assert "cannot download" in message and "resnet50-" in message and ".pth" in message


def test_named_weights_in_the_cache_are_found(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(UserError) as error:
        weights_file("resnet18", "IMAGENET1K_V1")
    cached = str(error.value).split("(or place it at ")[1].rstrip(")")
    (tmp_path / "checkpoints").mkdir()
    open(cached, "wb").close()
    assert str(weights_file("resnet18", "IMAGENET1K_V1")) == cached


def test_unknown_weight_name_and_arch():
    with pytest.raises(UserError, match="neither a file"):
        load(Encoder("resnet18", 4), "no/such/file.pth")
    with pytest.raises(UserError, match="unknown --arch"):
        Encoder("vgg16", 4)


def test_weights_from_a_casm_deploy_checkpoint(tmp_path):
    source = Encoder("resnet18", 4, width=16)
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "casm-deploy/checkpoint", "encoder": source.state_dict()}, path)
    target = Encoder("resnet18", 4, width=16)
    assert load(target, str(path)) == []
    assert torch.equal(target.fc.weight, source.fc.weight)


NON_RESNETS = [a for a in ARCHS if a not in RESNETS]


def test_the_config_offers_every_backbone():
    assert get_args(Arch) == ARCHS


@pytest.mark.parametrize("arch", NON_RESNETS)
def test_full_width_is_torchvision_own_model(arch):
    """Width 64: torchvision's parameter names and its logits, so its weights load as they are."""
    torch.manual_seed(0)
    reference = torchvision.models.get_model(arch, num_classes=5).eval()
    encoder = build_encoder(arch, 5, width=64).eval()
    assert list(encoder.state_dict()) == list(reference.state_dict())
    encoder.load_state_dict(reference.state_dict())
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        logits, _ = encoder(images)
        assert torch.allclose(logits, reference(images), atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_feature_maps_are_the_stem_and_strides_4_to_32(arch):
    encoder = build_encoder(arch, 3, width=16).eval()
    with torch.no_grad():
        logits, maps = encoder(torch.rand(1, 3, 64, 64))
    assert logits.shape == (1, 3)
    assert [m.shape[-1] for m in maps[1:]] == [16, 8, 4, 2]  # strides 4, 8, 16, 32
    assert maps[0].shape[-1] in (16, 32)  # the stem: stride 4 (ResNet, ConvNeXt) or 2
    assert [m.shape[1] for m in maps] == encoder.feature_channels


@pytest.mark.parametrize("arch", NON_RESNETS)
def test_width_scales_every_layer(arch):
    half = sum(p.numel() for p in build_encoder(arch, 3, width=16).parameters())
    full = sum(p.numel() for p in build_encoder(arch, 3, width=32).parameters())
    assert half < 0.5 * full  # channels halve: weights shrink about four times


def test_torchvision_weights_of_another_family_load_and_skip_the_head(tmp_path):
    reference = torchvision.models.mobilenet_v3_small(num_classes=1000)
    path = tmp_path / "mobilenet_v3_small.pth"
    torch.save(reference.state_dict(), path)
    assert is_torchvision_weights(torch.load(path, weights_only=True))
    encoder = build_encoder("mobilenet_v3_small", 4, width=64)
    untouched = load(encoder, str(path))
    assert untouched == ["classifier.3.bias", "classifier.3.weight"]  # 4 classes, not 1000
    assert torch.equal(
        encoder.features[4].block[0][0].weight, reference.features[4].block[0][0].weight
    )
    with pytest.raises(UserError, match="--width 64"):
        load(build_encoder("mobilenet_v3_small", 4, width=32), str(path))


def test_a_mapping_of_another_arch_reads_its_own_encoder():
    masker = build_masker(
        "resnet18", 3, width=8, shared_encoder=False, mapping_arch="mobilenet_v3_small",
        mapping_width=16,
    ).eval()  # fmt: skip
    assert masker.mapping_encoder.arch == "mobilenet_v3_small"
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        masks, logits = masker(images)
        alone = masker.masks_only()(images)
    assert masks.shape == (2, 1, 32, 32) and logits.shape == (2, 3)
    assert torch.equal(masks, alone)  # the masks need no classifier


def test_a_shared_mapping_has_no_masks_only_part():
    with pytest.raises(UserError, match="shares the classifier"):
        build_masker("resnet18", 3, width=8).masks_only()
    with pytest.raises(UserError, match="of the mapping's own"):
        build_masker("resnet18", 3, width=8, mapping_arch="resnet18")
