import pytest
import torch

from casm_deploy.errors import UserError
from casm_deploy.models.backbones import WEIGHTS_WANTED, load_encoder_weights, weights_file
from casm_deploy.models.encoder import Encoder
from casm_deploy.torchfile import load_file


def load(encoder: Encoder, weights: str) -> list[str]:
    """What `train --weights` does: find the file, read it, load it."""
    path = weights_file(encoder.arch, weights)
    return load_encoder_weights(encoder, load_file(path, WEIGHTS_WANTED), path)


def test_full_width_encoder_matches_torchvision_state_dict(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    encoder = Encoder("resnet18", num_classes=4, width=64)
    untouched = load(encoder, str(path))
    assert untouched == ["fc.bias", "fc.weight"]  # another number of classes: head kept
    assert torch.equal(encoder.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)


def test_weights_of_another_width_are_refused(tmp_path):
    import torchvision

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
