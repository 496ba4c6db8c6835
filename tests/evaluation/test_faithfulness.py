"""Faithfulness (`evaluation/faithfulness.py`): the AUC and ROAD on hand-made cases, and
`eval --faithfulness` writing its keys for models and baselines alike."""

import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from casm_deploy.cli import app
from casm_deploy.config import EvalConfig
from casm_deploy.evaluation import faithfulness as fa
from casm_deploy.evaluation.meters import Batch

KEYS = {*fa.KEYS, *fa.INFO_KEYS}
SIZE, REGION = 64, (slice(8, 24), slice(32, 48))  # a 16 x 16 region: 256 of 4,096 pixels


class RegionContrast(nn.Module):
    """A two-class judge that looks only at REGION's fine detail: class 0's logit is
    20 (c - 0.5), c the mean absolute difference of horizontal neighbours in the red channel
    there. On a 0/1 checkerboard c = 1 (logit 10, p(class 0) = 0.99995); once the region is the
    mean colour c = 0, and once blurred by RISE's 3 x 3 kernel at 64 px (sigma 1.43, nearly
    uniform) c is about 1/9: logit below -7, p under 0.001."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patch = images[:, 0, REGION[0], REGION[1]]
        contrast = (patch[:, :, 1:] - patch[:, :, :-1]).abs().mean((1, 2))
        return torch.stack([20 * (contrast - 0.5), torch.zeros_like(contrast)], 1)


def evidence_images(n: int = 2) -> torch.Tensor:
    """Grey images with a 0/1 checkerboard in REGION, the only thing the judge sees."""
    images = torch.full((n, 3, SIZE, SIZE), 0.5)
    y, x = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    images[:, :, REGION[0], REGION[1]] = ((x + y) % 2).float()
    return images


def region_masks(n: int = 2, inverted: bool = False) -> np.ndarray:
    masks = np.zeros((n, SIZE, SIZE), np.float32)
    masks[:, REGION[0], REGION[1]] = 1.0
    return 1 - masks if inverted else masks


def test_trapezoid_rule_on_known_curves():
    # a straight line from 1 to 0: the triangle under it, 1/2
    fractions = np.array([0.0, 0.5, 1.0])
    assert fa.trapezoid_auc(fractions, np.array([1.0, 0.5, 0.0])) == pytest.approx(0.5)
    # y = x^2 at 0, 1/2, 1: 1/2 (0 + 1/4) / 2 + 1/2 (1/4 + 1) / 2 = 1/16 + 5/16 = 0.375
    # (the integral is 1/3: the trapezoids overestimate a convex curve)
    assert fa.trapezoid_auc(fractions, fractions**2) == pytest.approx(0.375)
    # a batch of curves at unequal steps: each its own area
    curves = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    areas = fa.trapezoid_auc(np.array([0.0, 0.25, 1.0]), curves)
    assert areas == pytest.approx([1.0, 0.125 + 0.75])
    # the pixels changed at each step: whole pixels, 0 first and all last
    assert fa.step_counts(10, 4).tolist() == [0, 2, 5, 8, 10]


def test_pixel_ranks_are_most_salient_first_and_ties_broken_the_same_way():
    maps = np.array([[[0.1, 0.9], [0.5, 0.3]]])
    assert fa.pixel_ranks(maps).tolist() == [[3, 0, 1, 2]]
    constant = np.zeros((2, 8, 8))
    ranks = fa.pixel_ranks(constant)
    assert sorted(ranks[0]) == list(range(64))  # a strict order of all 64 pixels
    assert (ranks[0] == ranks[1]).all() and (ranks == fa.pixel_ranks(constant)).all()
    assert ranks[0].tolist() != list(range(64))  # not raster order (top rows first)
    box = np.zeros((1, 8, 8))
    box[0, 2:6, 2:6] = 1.0
    assert (fa.pixel_ranks(box)[0].reshape(8, 8)[2:6, 2:6] < 16).all()  # the box first


def test_the_rise_blur_keeps_the_mean_colour_and_blurs():
    assert fa.rise_kernel(224).shape == (11, 11)  # RISE's gkern(11, 5) at its size
    assert fa.rise_kernel(SIZE).shape == (3, 3) and fa.rise_kernel(SIZE).sum() == pytest.approx(1)
    flat = fa.mean_colour(torch.zeros(1)).expand(1, 3, 16, 16)
    assert torch.allclose(fa.rise_blur(flat), flat, atol=1e-6)  # zero padding = mean colour
    assert fa.rise_blur(evidence_images(1)).std() < evidence_images(1).std()


def test_deletion_and_insertion_of_a_mask_on_the_evidence_and_of_its_inverse():
    """The judge sees REGION only, 1/16 of the pixels: with 16 steps the first step changes
    exactly the region when the mask ranks it first.

    Mask on the region: deletion's curve is p = 1 at 0 and about 0 from 1/16 on, area
    (1/16)(1 + 0)/2 = 1/32; insertion's is about 0 then 1, area 1 - 1/32. The inverted mask
    reaches the region at the last step: deletion 15/16 + 1/32, insertion 1/32."""
    model, images, targets = RegionContrast(), evidence_images(), [0, 0]
    on = fa.pixel_ranks(region_masks())
    deletion, insertion = fa.deletion_insertion(model, images, on, targets, steps=16)
    assert deletion == pytest.approx([1 / 32] * 2, abs=2e-3)
    assert insertion == pytest.approx([1 - 1 / 32] * 2, abs=2e-3)
    off = fa.pixel_ranks(region_masks(inverted=True))
    deletion, insertion = fa.deletion_insertion(model, images, off, targets, steps=16)
    assert deletion == pytest.approx([15 / 16 + 1 / 32] * 2, abs=2e-3)
    assert insertion == pytest.approx([1 / 32] * 2, abs=2e-3)
    # the other class: p(class 1) = 1 - p(class 0), so its curves are 1 minus these
    deletion, _ = fa.deletion_insertion(model, images, off, [1, 1], steps=16)
    assert deletion == pytest.approx([1 - 15 / 16 - 1 / 32] * 2, abs=2e-3)


def test_road_through_the_package_ranks_a_mask_on_the_evidence_above_a_random_one():
    """ROAD at 20, 40, 60 and 80% removed. The mask on the region: MoRF removes the whole
    region at every percentage and the imputer fills it smoothly from its grey surround
    (contrast about 0.01, the imputer's noise), so p falls from 1 to about 0: MoRF about -1.
    LeRF removes only pixels outside it (80% < 15/16): p stays 1, LeRF about 0, combined about
    1/2. A random mask removes the region's pixels only in proportion: a higher MoRF."""
    model, images, targets = RegionContrast(), evidence_images(), [0, 0]
    morf, lerf, combined = fa.road(model, images, fa.pixel_ranks(region_masks()), targets)
    assert morf == pytest.approx([-1.0] * 2, abs=0.01)
    assert lerf == pytest.approx([0.0] * 2, abs=0.01)
    assert combined == pytest.approx((lerf - morf) / 2)
    noise = np.random.default_rng(1).random((2, SIZE, SIZE))
    random_morf, random_lerf, _ = fa.road(model, images, fa.pixel_ranks(noise), targets)
    assert (morf < random_morf - 0.2).all() and (lerf > random_lerf).all()
    # the imputer's noise is drawn under a fixed seed: the same scores again, and the global
    # random state as it was
    state = torch.random.get_rng_state()
    again = fa.road(model, images, fa.pixel_ranks(noise), targets)
    assert (again[0] == random_morf).all() and torch.equal(torch.random.get_rng_state(), state)


def test_the_meter_leaves_out_the_classes_the_judge_does_not_know():
    judge = fa.Judge("region", RegionContrast(), labels=[0, -1])  # data class 1: unknown
    meter = fa.Faithfulness(fa.FaithfulnessSettings(judge, steps=16, percentages=(20, 80)))
    masks = torch.from_numpy(region_masks(3))[:, None]
    images = evidence_images(3)
    batch = Batch(masks, [[]] * 3, [0, 0, 0], None, images=images, data_labels=[0, 1, 0])
    meter.update(batch)
    result = meter.result()
    assert set(result) == KEYS and result["n_faithfulness_images"] == 2
    assert result["faithfulness_judge"] == "region"
    assert result["deletion_auc"] == pytest.approx(1 / 32, abs=2e-3)
    with pytest.raises(ValueError, match="images"):
        meter.update(Batch(masks, [[]] * 3, [0, 0, 0], None))
    empty = fa.Faithfulness(fa.FaithfulnessSettings(judge)).result()
    assert empty["n_faithfulness_images"] == 0 and empty["road_morf"] is None


@pytest.fixture(scope="module")
def checkpoints(tiny_data, make_checkpoint, tmp_path_factory):
    """The model scored (runs/casm) and an independent classifier (runs/judge), at 32 px."""
    root = tmp_path_factory.mktemp("faithfulness")
    model = make_checkpoint(root / "casm" / "checkpoint.pt", tiny_data)
    judge = make_checkpoint(root / "judge" / "checkpoint.pt", tiny_data, seed=3)
    return model, judge


QUICK = ("--faithfulness", "--faithfulness-steps", "4", "--road-percentages", "50")


def run_eval(tiny_data, model, out, *options):
    """`eval MODEL DATA --baseline center` on 4 images: the first model's and the centre
    baseline's records, and what it printed."""
    args = ["eval", model, str(tiny_data), "--baseline", "center", "--limit", "4"]
    result = CliRunner().invoke(app, [*args, "--workers", "0", "--json", str(out), *options])
    assert result.exit_code == 0, result.output
    first = json.loads(out.read_text())
    return first, json.loads(out.with_name(f"{out.stem}.center.json").read_text()), result.output


@pytest.fixture(scope="module")
def judged_by_the_model(tiny_data, checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("own") / "eval.json"
    return run_eval(tiny_data, checkpoints[0], out, *QUICK)


def test_eval_faithfulness_writes_its_keys_for_the_model_and_the_baseline(judged_by_the_model):
    first, center, output = judged_by_the_model
    for scores in (first, center):
        assert set(scores) >= KEYS
        assert scores["faithfulness_judge"] == "casm"  # the first model's classifier
        assert scores["n_faithfulness_images"] == scores["n_images"] == 4
        assert all(0 <= scores[k] <= 1 for k in ("deletion_auc", "insertion_auc"))
        assert all(-1 <= scores[k] <= 1 for k in ("road_morf", "road_lerf", "road_combined"))
        assert list(scores)[-1] == "ms_per_image"  # still the record's last key
    assert first["deletion_auc"] != center["deletion_auc"]  # each method its own masks
    assert "faithfulness (RISE, ROAD): casm's probability" in output


def test_eval_faithfulness_uses_the_judge_given(
    tiny_data, checkpoints, judged_by_the_model, tmp_path
):
    model, judge = checkpoints
    first, center, _ = run_eval(tiny_data, model, tmp_path / "eval.json", *QUICK, "--judge", judge)
    assert first["faithfulness_judge"] == center["faithfulness_judge"] == "judge"
    own = judged_by_the_model[0]
    assert first["deletion_auc"] != own["deletion_auc"]  # another classifier, other scores
    assert {k: first[k] for k in ("LE", "F1")} == {k: own[k] for k in ("LE", "F1")}


def test_eval_without_faithfulness_writes_none_of_its_keys(tiny_data, checkpoints, tmp_path):
    first, center, output = run_eval(tiny_data, checkpoints[0], tmp_path / "eval.json")
    assert not KEYS & (set(first) | set(center))
    assert "faithfulness" not in output


def test_faithfulness_options_are_checked():
    with pytest.raises(ValueError, match="--judge"):
        EvalConfig(judge="judge.pt")
    for bad in ("0,50", "x", "", "20,100"):
        with pytest.raises(ValueError, match="--road-percentages"):
            EvalConfig(faithfulness=True, road_percentages=bad)
    assert EvalConfig(road_percentages="10, 90").road_levels == (10, 90)
