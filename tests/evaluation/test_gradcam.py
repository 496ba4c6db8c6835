import pytest
import torch
from torch import nn

from casm_deploy.evaluation.gradcam import gradcam
from casm_deploy.models.mapping import build_masker


class PlantedEncoder(nn.Module):
    """Logit 0 = the mean of channel 0, so the evidence for class 0 is where channel 0 is high."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, images):
        stage = images * self.scale  # the last "stage" is the image itself
        logits = torch.stack([stage[:, 0].mean((1, 2)), stage[:, 1].mean((1, 2))], 1)
        features = [stage] * 5
        return logits, features


class PlantedMasker(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = PlantedEncoder()

    def normalize(self, images):
        return images


def test_gradcam_lights_the_planted_feature():
    images = torch.zeros(2, 3, 16, 16)
    images[0, 0, 2:6, 10:14] = 1.0  # the evidence for class 0 in the top right
    images[1, 0, 9:15, 1:5] = 1.0
    masks, logits = gradcam(PlantedMasker(), images)
    assert masks.shape == (2, 1, 16, 16) and logits.argmax(1).tolist() == [0, 0]
    assert masks.min() >= 0 and masks.max() == pytest.approx(1.0)
    assert masks[0, 0, 2:6, 10:14].min() == pytest.approx(1.0)
    assert masks[0, 0, 8:, :8].max() == 0 and masks[1, 0, :8, 8:].max() == 0


def test_gradcam_explains_the_requested_class():
    images = torch.zeros(1, 3, 8, 8)
    images[0, 0, :4] = 1.0
    images[0, 1, 4:] = 0.5  # class 1's evidence is the bottom half
    masks, _ = gradcam(PlantedMasker(), images, classes=torch.tensor([1]))
    assert masks[0, 0, 4:].min() == pytest.approx(1.0) and masks[0, 0, :4].max() == 0


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_gradcam_shapes_on_the_real_encoder(stage):
    masker = build_masker("resnet18", 4, width=8).eval()
    masks, logits = gradcam(masker, torch.rand(3, 3, 32, 32), stage=stage)
    assert masks.shape == (3, 1, 32, 32) and logits.shape == (3, 4)
    assert masks.min() >= 0 and masks.max() <= 1
    assert all(p.grad is None for p in masker.parameters())  # nothing accumulated


def test_gradcam_stage_is_checked():
    with pytest.raises(ValueError):
        gradcam(PlantedMasker(), torch.zeros(1, 3, 8, 8), stage=5)
