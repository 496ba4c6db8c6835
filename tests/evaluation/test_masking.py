"""masking.py: masked-in / masked-out on hand cases, Telea inpainting, shapes and dtypes."""

from __future__ import annotations

import pytest
import torch

from casm_deploy.evaluation import masking


def _images() -> torch.Tensor:
    return torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2) / 24


def test_masked_in_and_out_hand_case():
    images = _images()
    binary = torch.tensor([[[[True, False], [False, True]]], [[[False, False], [True, True]]]])
    inside = masking.masked_in(images, binary)
    outside = masking.masked_out(images, binary)
    keep = binary.expand(-1, 3, -1, -1)
    assert torch.equal(inside, torch.where(keep, images, torch.zeros_like(images)))
    assert torch.equal(outside, torch.where(keep, torch.zeros_like(images), images))
    assert torch.equal(inside + outside, images)


def test_float_mask_works_like_bool():
    images = _images()
    binary = torch.rand(2, 1, 2, 2) > 0.5
    assert torch.equal(masking.masked_in(images, binary), masking.masked_in(images, binary.float()))
    assert torch.equal(
        masking.masked_out(images, binary), masking.masked_out(images, binary.float())
    )


def test_binarize_keeps_the_bright_pixels():
    masks = torch.zeros(2, 1, 8, 8)
    masks[0, 0, 2:4, 2:4] = 1.0
    masks[1, 0, 5:, :] = 1.0
    binary = masking.binarize(masks)
    assert binary.dtype == torch.bool and binary.shape == (2, 1, 8, 8)
    assert torch.equal(binary[0, 0], masks[0, 0] > 0.5)
    assert torch.equal(binary[1, 0], masks[1, 0] > 0.5)
    with pytest.raises(ValueError):
        masking.binarize(masks[:, 0])


def test_inpaint_fills_a_hole_with_the_surrounding_constant():
    color = torch.tensor([0.2, 0.5, 0.8]).view(1, 3, 1, 1)
    images = color.expand(1, 3, 32, 32).clone()
    images[:, :, 10:20, 12:22] = torch.tensor([1.0, 0.0, 0.3]).view(1, 3, 1, 1)  # the hole
    binary = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    binary[:, :, 10:20, 12:22] = True
    filled = masking.inpaint(images, binary)
    assert filled.shape == images.shape and filled.dtype == images.dtype
    expected = (color * 255).round() / 255
    hole = binary.expand(-1, 3, -1, -1)
    inside_error = (filled - expected).abs()[hole].max()
    outside_error = (filled - images).abs()[~hole].max()
    assert inside_error <= 2 / 255 + 1e-6
    assert outside_error <= 1 / 255 + 1e-6


def test_inpaint_empty_mask_is_a_no_op_and_full_mask_does_not_crash():
    images = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    empty = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    same = masking.inpaint(images, empty)
    assert same.dtype == torch.float64 and same.shape == images.shape
    assert (same - images).abs().max() <= 0.5 / 255 + 1e-9
    full = masking.inpaint(images, torch.ones(2, 1, 16, 16))
    assert full.shape == images.shape and full.min() >= 0 and full.max() <= 1
