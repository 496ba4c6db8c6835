import pytest
import torch
from torch import nn

from casm_deploy.evaluation.maskopt import objective, optimize_masks, reference_images
from casm_deploy.models.mapping import build_masker


class PlantedEncoder(nn.Module):
    """Logits: 20 x the mean of channels 0 and 1, so class 0's evidence is where channel 0 is."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.full((), 20.0))

    def forward(self, images):
        logits = torch.stack([images[:, 0].mean((1, 2)), images[:, 1].mean((1, 2))], 1)
        return logits * self.scale, [images] * 5


class PlantedMasker(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = PlantedEncoder()

    def normalize(self, images):
        return images


def planted_images():
    images = torch.zeros(2, 3, 32, 32)
    images[0, 0, 4:12, 20:28] = 1.0  # class 0's evidence in the top right
    images[1, 0, 18:30, 2:14] = 1.0  # and in the bottom left
    return images


def test_optimised_masks_lower_the_objective_and_cover_the_evidence():
    masker, images = PlantedMasker(), planted_images()
    result = optimize_masks(masker, images, steps=60, fill="black", jitter=0, mask_size=8)
    start = objective(
        masker,
        images,
        reference_images(images, "black"),
        torch.full_like(result.low_res, 0.5),
        result.classes,
    )
    assert result.classes.tolist() == [0, 0]
    assert (result.objective < start).all()
    # The deleted region is the planted square: mean mask inside well above outside.
    inside = [result.masks[0, 0, 4:12, 20:28], result.masks[1, 0, 18:30, 2:14]]
    outside = [result.masks[0, 0, 16:, :16], result.masks[1, 0, :14, 16:]]
    for kept, rest in zip(inside, outside, strict=True):
        assert kept.mean() > rest.mean() + 0.3


def test_shapes_ranges_and_weights_untouched():
    torch.manual_seed(0)
    masker = build_masker("resnet18", 3, width=8).eval()
    before = {k: v.clone() for k, v in masker.state_dict().items()}
    images = torch.rand(3, 3, 32, 32)
    result = optimize_masks(masker, images, steps=3)
    assert result.masks.shape == (3, 1, 32, 32)
    assert result.low_res.shape == (3, 1, 4, 4)  # H // 8
    assert result.logits.shape == (3, 3) and result.classes.shape == (3,)
    assert result.objective.shape == (3,)
    assert result.masks.min() >= 0 and result.masks.max() <= 1
    assert all(p.requires_grad for p in masker.parameters())
    for key, value in masker.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_seeded_jitter_is_deterministic():
    masker, images = PlantedMasker(), planted_images()

    def run(seed):
        return optimize_masks(masker, images, steps=10, jitter=3, seed=seed).low_res

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_a_batch_is_independent_optimisations():
    masker, images = PlantedMasker(), planted_images()
    together = optimize_masks(masker, images, steps=20, jitter=0, fill="blur").low_res
    alone = [optimize_masks(masker, images[i : i + 1], steps=20, jitter=0).low_res for i in (0, 1)]
    torch.testing.assert_close(together, torch.cat(alone))


def test_given_classes_are_explained():
    masker, images = PlantedMasker(), planted_images()
    result = optimize_masks(masker, images, torch.tensor([1, 0]), steps=2)
    assert result.classes.tolist() == [1, 0]


def test_unknown_fill_is_refused():
    with pytest.raises(ValueError, match="fill"):
        reference_images(torch.rand(1, 3, 8, 8), "grey")
