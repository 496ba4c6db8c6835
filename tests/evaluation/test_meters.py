"""Eval's meters (issue 30): one protocol, `update(batch)` and `result()`; each wraps one
family of pure metrics, a method's record is their results in order, and a meter plugged in
where the meters are chosen shows up in the JSON and the tables with no other edit."""

import json

import numpy as np
import pytest
import torch

from casm_deploy.config import EvalConfig
from casm_deploy.evaluation import benchmark as evaluate
from casm_deploy.evaluation import boxacc, methods
from casm_deploy.evaluation.benchmark import score_batch
from casm_deploy.evaluation.meters import (
    Batch,
    Copies,
    Images,
    Localisation,
    MaskStatistics,
    MaxBoxAcc,
    Meter,
    Parts,
    PxAP,
    results,
)
from casm_deploy.evaluation.methods import Method, choose_meters
from casm_deploy.evaluation.metrics import MaskStats
from casm_deploy.evaluation.pxap import PxAPMeter

BOX = [[2, 2, 6, 6]]


def on_and_off_the_box() -> torch.Tensor:
    """Two 8 x 8 masks: one exactly on BOX, one in a corner off it."""
    masks = torch.zeros(2, 1, 8, 8)
    masks[0, 0, 2:6, 2:6] = 1.0
    masks[1, 0, 0:2, 6:8] = 1.0
    return masks


def batch_of(masks, labels=(0, 0), logits=None, **truth) -> Batch:
    boxes = truth.pop("boxes", [BOX] * len(masks))
    return Batch(masks, boxes, list(labels), logits, **truth)


class Darkest:
    """A meter no module knows of: the lowest mask value seen."""

    def __init__(self) -> None:
        self.low = None

    def update(self, batch: Batch) -> None:
        low = float(batch.arrays.min())
        self.low = low if self.low is None else min(self.low, low)

    def result(self) -> dict:
        return {"darkest": self.low}


def test_the_batch_makes_the_arrays_once_and_tells_om_what_is_right():
    masks = torch.rand(3, 1, 8, 8, dtype=torch.float16)
    logits = torch.tensor([[5.0, 0.0], [5.0, 0.0], [5.0, 0.0]])  # all class 0
    batch = batch_of(masks, labels=(0, -1, 1), logits=logits, boxes=[BOX] * 3)
    assert batch.arrays.shape == (3, 8, 8) and batch.arrays.dtype == np.float32
    assert batch.arrays is batch.arrays  # made once, for every meter
    assert np.array_equal(batch.arrays, masks[:, 0].float().numpy())
    assert batch.correct == [True, None, False]  # -1: a class the classifier does not know
    assert batch_of(masks, labels=(0, -1, 1), boxes=[BOX] * 3).correct == [None] * 3


def test_every_meter_is_one_protocol_and_the_record_keeps_their_order():
    chosen = choose_meters(copies=True, parts=True, masks=True)
    assert all(isinstance(m, Meter) for m in chosen) and isinstance(Darkest(), Meter)
    assert [type(m) for m in chosen] == [
        Localisation, MaskStatistics, MaxBoxAcc, PxAP, Copies, Parts, Images,
    ]  # fmt: skip
    assert [type(m) for m in choose_meters()] == [Localisation, MaskStatistics, MaxBoxAcc, Images]
    masks = torch.ones(1, 1, 8, 8)
    parts = np.zeros((1, 8, 8), np.uint8)
    parts[0, :, :4], parts[0, :, 4:] = 1, 2
    batch = batch_of(
        masks, labels=(0,), boxes=[[[0, 0, 4, 8], [4, 0, 8, 8]]],
        object_masks=np.ones((1, 8, 8), bool), part_maps=parts,
    )  # fmt: skip
    for meter in chosen:
        meter.update(batch)
    assert list(results(chosen)) == [
        "LE", "OM", "F1", "F1a", "mask_mean", "mask_std", "mask_entropy", "mask_tv",
        *boxacc.KEYS, "PxAP", "copy_share_lighter", "copy_touch_both",
        "part_coverage", "parts_all_touched", "part_share_least", "n_part_images",
        "OM_note", "n_images",
    ]  # fmt: skip


def test_two_meters_may_not_give_the_same_key():
    with pytest.raises(ValueError, match=r"Darkest repeats \['darkest'\]"):
        results([Darkest(), Darkest()])


def test_localisation_scores_le_om_and_f1():
    meter = Localisation()
    logits = torch.tensor([[5.0, 0.0], [5.0, 0.0]])  # both class 0: image 2 (class 1) wrong
    meter.update(batch_of(on_and_off_the_box(), labels=(0, 1), logits=logits))
    result = meter.result()
    assert list(result) == ["LE", "OM", "F1", "F1a"]  # n_images: the Images meter's
    assert result["LE"] == 0.5 and result["OM"] == 0.5
    assert result["F1"] == pytest.approx(0.5, abs=1e-5) == result["F1a"]
    assert Localisation().result() == dict.fromkeys(["LE", "OM", "F1", "F1a"])


def test_mask_statistics_are_mask_stats_of_the_same_masks():
    masks = torch.rand(4, 1, 8, 8)
    meter, stats = MaskStatistics(), MaskStats()
    meter.update(batch_of(masks[:3], boxes=[BOX] * 3, labels=(0, 0, 0)))
    meter.update(batch_of(masks[3:], boxes=[BOX], labels=(0,)))
    stats.update(masks)
    assert meter.result() == pytest.approx(stats.result())


def test_max_box_acc_reports_eval_keys_only():
    meter = MaxBoxAcc()
    assert meter.result() == dict.fromkeys(boxacc.KEYS)
    meter.update(batch_of(on_and_off_the_box()))
    assert meter.result() == dict.fromkeys(boxacc.KEYS, 0.5)  # image 1's box is BOX, image 2's not


def test_pxap_pools_the_pixels_of_every_image_and_needs_object_masks():
    masks = torch.rand(3, 1, 8, 8)
    objects = np.zeros((3, 8, 8), bool)
    objects[:, 2:6, 2:6] = True
    meter, pure = PxAP(), PxAPMeter()
    meter.update(batch_of(masks, boxes=[BOX] * 3, labels=(0, 0, 0), object_masks=objects))
    for mask, truth in zip(masks[:, 0].numpy(), objects, strict=True):
        pure.add(mask, truth)
    assert meter.result() == pure.result() and meter.result()["PxAP"] is not None
    with pytest.raises(ValueError, match="object mask"):
        PxAP().update(batch_of(masks, boxes=[BOX] * 3, labels=(0, 0, 0)))


def test_copies_means_over_images():
    meter = Copies()
    assert meter.result() == {"copy_share_lighter": None, "copy_touch_both": None}
    masks = torch.zeros(2, 1, 8, 16)
    masks[0] = 1.0  # both copies alike
    masks[1, 0, 2:6, 2:6] = 1.0  # the left copy only
    meter.update(batch_of(masks, boxes=[[[2, 2, 6, 6], [10, 2, 14, 6]]] * 2))
    assert meter.result() == {"copy_share_lighter": 0.25, "copy_touch_both": 0.5}


def test_parts_count_only_images_with_parts_in_the_frame():
    maps = np.zeros((2, 8, 8), np.uint8)
    maps[0, 2:6, 2:4], maps[0, 2:6, 4:6] = 1, 2  # image 2: every part cut away
    masks = torch.zeros(2, 1, 8, 8)
    masks[:, 0, 2:6, 2:4] = 1.0  # the first of the two parts
    meter = Parts()
    assert meter.result()["n_part_images"] == 0 and meter.result()["part_coverage"] is None
    meter.update(batch_of(masks, part_maps=maps))
    assert meter.result() == {
        "part_coverage": 0.5, "parts_all_touched": 0.0, "part_share_least": 0.0,
        "n_part_images": 1,
    }  # fmt: skip
    with pytest.raises(ValueError, match="part label map"):
        Parts().update(batch_of(masks))


@pytest.mark.parametrize(
    ("labels", "logits", "note"),
    [
        ((0, 1), torch.zeros(2, 2), None),
        ((0, -1), torch.zeros(2, 2), "OM counts only the 1 images of the model's classes: it is "
         "not defined for the other 1"),
        ((-1, -1), torch.zeros(2, 2), "OM is not defined for these 2 images: the model does not "
         "know their classes"),
        ((0, 1), None, "OM is not defined: no classifier (a masks-only export predicts no class)"),
    ],
)  # fmt: skip
def test_images_counts_and_says_what_om_leaves_out(labels, logits, note):
    meter = Images()
    meter.update(batch_of(on_and_off_the_box(), labels=labels, logits=logits))
    expected = {"n_images": 2} if note is None else {"OM_note": note, "n_images": 2}
    assert meter.result() == expected and list(meter.result()) == list(expected)


def test_a_meter_plugged_into_a_method_is_in_its_record():
    method = Method("m", None, labels=[0, 1])
    method.meters.insert(-1, Darkest())
    masks = on_and_off_the_box() * 0.5 + 0.25
    score_batch(method, masks, torch.zeros(2, 2), torch.tensor([0, 1]), [BOX] * 2)
    result = method.result()
    assert result["darkest"] == 0.25
    assert list(result)[-3:] == ["darkest", "n_images", "ms_per_image"]


def test_a_meter_chosen_with_the_others_is_in_eval_json_and_tables(
    tiny_data, tmp_path, make_checkpoint, monkeypatch, capsys
):
    """One line where the meters are chosen is all a new metric needs."""
    chosen = methods.choose_meters
    monkeypatch.setattr(
        methods, "choose_meters", lambda *a: [*chosen(*a)[:-1], Darkest(), Images()]
    )
    model = make_checkpoint(tmp_path / "m" / "checkpoint.pt", tiny_data)
    out = tmp_path / "scores.json"
    cfg = EvalConfig(
        models=(model,), data=str(tiny_data), baselines=("full",), workers=0, json=str(out)
    )
    scores = evaluate.run(cfg)["scores"]
    written = json.loads(out.read_text())
    assert list(written)[-3:] == ["darkest", "n_images", "ms_per_image"]
    assert 0 <= written["darkest"] <= 1
    assert json.loads((tmp_path / "scores.full.json").read_text())["darkest"] == 1.0
    assert scores["m"]["darkest"] == written["darkest"]
    header = next(line for line in capsys.readouterr().out.splitlines() if "method" in line)
    assert header.replace("┃", " ").split()[-3:] == ["TV", "darkest", "images"]
