import pytest
import torch

from casm_deploy.models.decoder import Decoder
from casm_deploy.models.encoder import Encoder
from casm_deploy.models.mapping import build_masker


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


def test_state_dict_keys_are_torchvisions_and_the_checkpoints():
    """The keys checkpoints and torchvision files are written with: the head is the encoder's fc."""
    import torchvision

    encoder = Encoder("resnet18", num_classes=4, width=16)
    reference = torchvision.models.resnet18(num_classes=4)
    assert list(encoder.state_dict()) == list(reference.state_dict())
    masker = build_masker("resnet18", 4, width=16, shared_encoder=False)
    prefixes = {key.split(".")[0] for key in masker.state_dict()}
    assert prefixes == {"encoder", "decoder", "mapping_encoder"}
    assert "encoder.fc.weight" in masker.state_dict()
