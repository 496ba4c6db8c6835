import pytest
import torch

from casm_deploy.errors import UserError
from casm_deploy.models.mapping import Decoder, Encoder, build_masker, load_encoder_weights


@pytest.mark.parametrize(
    "arch, width, channels",
    [
        ("resnet18", 64, [64, 64, 128, 256, 512]),
        ("resnet18", 32, [32, 32, 64, 128, 256]),
        ("resnet50", 64, [64, 256, 512, 1024, 2048]),
    ],
)
def test_encoder_features_and_decoder_shapes(arch, width, channels):
    encoder = Encoder(arch, num_classes=7, width=width).eval()
    images = torch.rand(2, 3, 64, 64)
    logits, features = encoder(images)
    assert logits.shape == (2, 7)
    assert [f.shape[1] for f in features] == channels
    assert [f.shape[-1] for f in features] == [16, 16, 8, 4, 2]
    decoder = Decoder(encoder.feature_channels).eval()
    masks = decoder(features, size=(64, 64))
    assert masks.shape == (2, 1, 64, 64)
    assert masks.min() >= 0 and masks.max() <= 1


@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_masker_takes_unnormalised_images_and_any_size(upsample):
    masker = build_masker("resnet18", 5, width=16, upsample=upsample).eval()
    masks, logits = masker(torch.rand(3, 3, 72, 96))
    assert masks.shape == (3, 1, 72, 96) and logits.shape == (3, 5)
    if upsample == "nearest":  # 4x4 blocks of equal values
        assert torch.equal(masks[..., 0::4, 0::4], masks[..., 1::4, 1::4])


def test_full_width_encoder_matches_torchvision_state_dict(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    encoder = Encoder("resnet18", num_classes=4, width=64)
    untouched = load_encoder_weights(encoder, str(path))
    assert untouched == ["fc.bias", "fc.weight"]  # another number of classes: head kept
    assert torch.equal(encoder.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)


def test_weights_of_another_width_are_refused(tmp_path):
    import torchvision

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(UserError, match="width"):
        load_encoder_weights(Encoder("resnet18", 4, width=32), str(path))


def test_named_weights_without_network_say_which_file(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(UserError) as error:
        load_encoder_weights(Encoder("resnet50", 4), "IMAGENET1K_V2")
    message = str(error.value)
    assert "cannot download" in message and "resnet50-" in message and ".pth" in message


def test_unknown_weight_name_and_arch():
    with pytest.raises(UserError, match="neither a file"):
        load_encoder_weights(Encoder("resnet18", 4), "no/such/file.pth")
    with pytest.raises(UserError, match="unknown --arch"):
        Encoder("vgg16", 4)


def test_weights_from_a_casm_deploy_checkpoint(tmp_path):
    source = Encoder("resnet18", 4, width=16)
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "casm-deploy/checkpoint", "encoder": source.state_dict()}, path)
    target = Encoder("resnet18", 4, width=16)
    assert load_encoder_weights(target, str(path)) == []
    assert torch.equal(target.fc.weight, source.fc.weight)
