import dataclasses
import json

import cv2
import numpy as np
import pytest
import torch

from casm_deploy.config import EvalConfig, SynthConfig
from casm_deploy.errors import UserError
from casm_deploy.evaluation import benchmark as evaluate
from casm_deploy.evaluation.benchmark import score_batch
from casm_deploy.evaluation.methods import Method, choose_meters, label_map

KEYS = {"LE", "OM", "F1", "F1a", "mask_mean", "mask_std", "mask_entropy", "mask_tv", "n_images"}
KEYS |= {"MaxBoxAccV2", "MaxBoxAcc@0.3", "MaxBoxAcc@0.5", "MaxBoxAcc@0.7", "ms_per_image"}
MASK_KEYS = KEYS | {"PxAP"}  # data with object masks beside its XMLs (as data synth writes)


def test_scores_of_constructed_masks():
    """Two images: a mask exactly on the box (hit, F1 1), and a mask off the box (miss, F1 0)."""
    masks = torch.zeros(2, 1, 8, 8)
    masks[0, 0, 2:6, 2:6] = 1.0
    masks[1, 0, 0:2, 6:8] = 1.0
    logits = torch.tensor([[5.0, 0.0], [5.0, 0.0]])  # both predicted class 0
    objects = np.zeros((2, 8, 8), bool)
    objects[:, 2:6, 2:6] = True  # each object fills its box
    method = Method("m", None, labels=[0, 1], meters=choose_meters(masks=True))
    boxes = [[[2, 2, 6, 6]], [[2, 2, 6, 6]]]
    score_batch(method, masks, logits, torch.tensor([0, 1]), boxes, object_masks=list(objects))
    result = method.result()
    assert result["LE"] == 0.5 and result["OM"] == 0.5  # image 2 also misclassified
    assert result["F1"] == pytest.approx(0.5, abs=1e-5)
    assert result["mask_mean"] == pytest.approx((16 / 64 + 4 / 64) / 2)
    assert result["n_images"] == 2
    # At every threshold image 1's one box is its object's (IoU 1), image 2's is off it.
    assert result["MaxBoxAccV2"] == 0.5 and result["MaxBoxAcc@0.7"] == 0.5
    # Pooled pixels: at >= 1 image 1's 16 object pixels and image 2's 4 background ones
    # (precision 0.8, recall 16 / 32); at >= 0 all 128, 32 of them object (precision 0.25).
    assert result["PxAP"] == pytest.approx(0.8 * 0.5 + 0.25 * 0.5)
    assert set(result) == MASK_KEYS


def test_unknown_classes_are_left_out_of_om_only():
    method = Method("m", None, labels=[0, -1])
    masks = torch.zeros(2, 1, 8, 8)
    masks[:, 0, 2:6, 2:6] = 1.0
    score_batch(method, masks, torch.zeros(2, 3), torch.tensor([0, 1]), [[[2, 2, 6, 6]]] * 2)
    result = method.result()
    assert result["LE"] == 0 and result["OM"] == 0 and result["n_images"] == 2
    assert label_map(["a", "b"], ["b", "c", "a"]) == [1, -1, 0]


@pytest.fixture(scope="module")
def centred_data(tmp_path_factory):
    """A hand-made ImageNet-layout set: 4 val images whose object sits in the centre."""
    root = tmp_path_factory.mktemp("centred")
    (root / "classes.txt").write_text("n001 square\nn002 disk\n")
    for i, wnid in enumerate(["n001", "n001", "n002", "n002"]):
        folder = root / "val" / wnid
        folder.mkdir(parents=True, exist_ok=True)
        image = np.full((80, 80, 3), 90, np.uint8)
        image[15:65, 15:65] = (200, 40, 40)
        cv2.imwrite(str(folder / f"img{i}.png"), image)
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"img{i}.xml").write_text(
            "<annotation><size><width>80</width><height>80</height></size>"
            f"<object><name>{wnid}</name><bndbox><xmin>15</xmin><ymin>15</ymin>"
            "<xmax>65</xmax><ymax>65</ymax></bndbox></object>"
            "<object><name>n999</name><bndbox><xmin>0</xmin><ymin>0</ymin>"
            "<xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>"
        )
    return root


def test_centred_objects_give_the_centre_baseline_le_zero(
    centred_data, tmp_path, make_checkpoint, capsys
):
    model = make_checkpoint(tmp_path / "run" / "checkpoint.pt", centred_data, image_size=64)
    out = tmp_path / "scores.json"
    cfg = EvalConfig(
        models=(model,),
        data=str(centred_data),
        baselines=("center", "full"),
        batch_size=3,
        workers=0,
        json=str(out),
    )
    result = evaluate.run(cfg)
    assert result["scores"]["center"]["LE"] == 0.0
    # In the 64 px frame the object is [12, 12, 52, 52]: IoU 0.76 with the centre box
    # [9, 9, 55, 55], 0.39 with the full frame.
    assert result["scores"]["full"]["LE"] == 1.0
    # The centre box at its one threshold: IoU 0.76, right at 0.3, 0.5 and 0.7. The full mask
    # is constant: it normalises to zeros and gives no box.
    assert result["scores"]["center"]["MaxBoxAccV2"] == 1.0
    assert result["scores"]["full"]["MaxBoxAccV2"] == 0.0
    # No object masks beside the XMLs: no PxAP (not 0), and the table says so.
    assert set(json.loads(out.read_text())) == KEYS
    assert "PxAP: not measured" in " ".join(capsys.readouterr().out.split())
    assert set(json.loads((tmp_path / "scores.center.json").read_text())) == KEYS
    assert json.loads((tmp_path / "scores.config.json").read_text())["baselines"] == [
        "center",
        "full",
    ]


def test_eval_on_synthetic_data_with_classifiers_and_gradcam(tiny_data, tmp_path, make_checkpoint):
    model = make_checkpoint(tmp_path / "casm" / "checkpoint.pt", tiny_data)
    judge = make_checkpoint(tmp_path / "judge" / "checkpoint.pt", tiny_data, seed=3)
    cfg = EvalConfig(
        models=(model,),
        data=str(tiny_data),
        baselines=("gradcam",),
        classifiers=(judge,),
        batch_size=5,
        workers=0,
        resize="stretch",
    )
    result = evaluate.run(cfg)
    for scores in result["scores"].values():
        assert scores["n_images"] == 12
        assert set(scores) == MASK_KEYS  # data synth writes the object masks: PxAP too
        assert all(0 <= scores[k] <= 1 for k in MASK_KEYS - {"n_images", "ms_per_image"})
    accuracy = result["classifiers"]["casm"]["judge"]
    assert set(accuracy) == {"clean", "masked_in", "masked_out", "inpainted"}
    assert all(0 <= v <= 1 for v in accuracy.values())
    assert result["leak"] == {}  # only when asked


def test_eval_leak_control_writes_its_json(tiny_data, tmp_path, make_checkpoint):
    model = make_checkpoint(tmp_path / "casm" / "checkpoint.pt", tiny_data)
    out = tmp_path / "eval.json"
    cfg = EvalConfig(
        models=(model,), data=str(tiny_data), workers=0, leak_control=True, json=str(out)
    )
    leak = evaluate.run(cfg)["leak"]["casm"]
    assert (leak["n_train"], leak["n_val"]) == (72, 12) and leak["chance"] == pytest.approx(1 / 3)
    assert json.loads((tmp_path / "eval.leak.json").read_text()) == {"casm": leak}


def test_gradcam_stage_is_chosen_and_checked(tiny_data, tmp_path, make_checkpoint):
    model = make_checkpoint(tmp_path / "casm" / "checkpoint.pt", tiny_data)
    scores = {}
    for stage in (2, 4):
        cfg = EvalConfig(
            models=(model,), data=str(tiny_data), baselines=("gradcam",), gradcam_stage=stage,
            workers=0, resize="stretch",
        )  # fmt: skip
        scores[stage] = evaluate.run(cfg)["scores"]["gradcam"]
    # stage 2 is 8x8 at 32 px, stage 4 2x2: different maps, so different mask statistics
    assert scores[2]["mask_tv"] != scores[4]["mask_tv"]
    with pytest.raises(ValueError, match="--gradcam-stage"):
        EvalConfig(gradcam_stage=5)


def test_a_model_of_a_subset_of_classes(tmp_path, make_checkpoint):
    """The unseen-class case: data with classes the model never saw still gets LE and F1."""
    from casm_deploy.data.synth import generate

    small = SynthConfig(
        out=str(tmp_path / "seen"),
        classes=("disk", "square"),
        train_per_class=1,
        val_per_class=2,
        min_side=40,
        max_side=48,
        workers=1,
    )
    wide = SynthConfig(
        out=str(tmp_path / "all"),
        classes=("disk", "square", "star"),
        train_per_class=1,
        val_per_class=2,
        min_side=40,
        max_side=48,
        workers=1,
    )
    generate(small, progress=False)
    generate(wide, progress=False)
    model = make_checkpoint(tmp_path / "m" / "checkpoint.pt", tmp_path / "seen")
    result = evaluate.run(EvalConfig(models=(model,), data=wide.out, workers=0))
    scores = result["scores"]["m"]
    assert scores["n_images"] == 6 and scores["LE"] is not None and scores["OM"] is not None

    # --classes splits the same images into the seen classes and the unseen one.
    seen = evaluate.run(EvalConfig(models=(model,), data=wide.out, workers=0, classes="seen"))
    unseen = evaluate.run(EvalConfig(models=(model,), data=wide.out, workers=0, classes="unseen"))
    seen, unseen = seen["scores"]["m"], unseen["scores"]["m"]
    assert (seen["n_images"], unseen["n_images"]) == (4, 2)
    assert seen["LE"] * 4 + unseen["LE"] * 2 == pytest.approx(scores["LE"] * 6)
    assert unseen["OM"] is None  # no image the classifier could get right
    with pytest.raises(UserError, match="no class"):
        evaluate.run(EvalConfig(models=(model,), data=small.out, workers=0, classes="unseen"))


def test_copies_scores_both_copies(tmp_path, make_checkpoint):
    from casm_deploy.data.synth import generate

    data = tmp_path / "two"
    synth = SynthConfig(
        out=str(data), num_classes=2, train_per_class=1, val_per_class=3, min_side=32,
        max_side=40, copies=2, workers=1,
    )  # fmt: skip
    generate(synth, progress=False)
    model = make_checkpoint(tmp_path / "m" / "checkpoint.pt", data)
    out = tmp_path / "scores.json"
    cfg = EvalConfig(
        models=(model,), data=str(data), baselines=("full",), resize="stretch", workers=0,
        copies=True, json=str(out),
    )  # fmt: skip
    result = evaluate.run(cfg)
    copy_keys = {"copy_share_lighter", "copy_touch_both"}
    written = json.loads(out.read_text())
    assert set(written) == MASK_KEYS | copy_keys
    assert 0 <= written["copy_share_lighter"] <= 0.5 and 0 <= written["copy_touch_both"] <= 1
    full = result["scores"]["full"]  # a mask of ones covers both copies alike
    assert full["copy_share_lighter"] == pytest.approx(0.5, abs=0.05)
    assert full["copy_touch_both"] == 1.0
    assert set(json.loads((tmp_path / "scores.full.json").read_text())) == MASK_KEYS | copy_keys
    # Without --copies the keys stay out.
    plain = evaluate.run(dataclasses.replace(cfg, copies=False, json=""))
    assert set(plain["scores"]["m"]) == MASK_KEYS


def test_copies_on_single_copy_data_is_a_user_error(tiny_data, tmp_path, make_checkpoint):
    model = make_checkpoint(tmp_path / "m" / "checkpoint.pt", tiny_data)
    cfg = EvalConfig(models=(model,), data=str(tiny_data), workers=0, copies=True)
    with pytest.raises(UserError, match=r"ILSVRC2012_val_\d+\.JPEG.*two boxes"):
        evaluate.run(cfg)


def test_bad_input_is_a_user_error(tiny_data, tmp_path, make_checkpoint):
    model = make_checkpoint(tmp_path / "m" / "checkpoint.pt", tiny_data)
    with pytest.raises(UserError, match="baseline"):
        evaluate.run(EvalConfig(models=(model,), data=str(tiny_data), baselines=("random",)))
    with pytest.raises(UserError, match="annotations"):
        evaluate.run(EvalConfig(models=(model,), data=str(tiny_data), annotations="/nowhere"))
    with pytest.raises(UserError, match="at least one model"):
        evaluate.run(EvalConfig(data=str(tiny_data)))
    with pytest.raises(UserError, match="no such file"):
        evaluate.run(EvalConfig(models=(str(tmp_path / "x.pt"),), data=str(tiny_data)))


def test_a_new_test_set_without_classes_txt_or_train(
    tiny_data, tmp_path, make_checkpoint, make_small_synth, capsys
):
    """val/<class>/ and annotations/ alone: the classes are val/'s folders; LE and F1 need only
    the boxes, and OM, which needs the model's classes, is not defined for the unknown ones."""
    import shutil

    model = make_checkpoint(tmp_path / "m" / "checkpoint.pt", tiny_data)  # disk, triangle, square
    for name, classes in (("new", ("star", "cross")), ("mixed", ("square", "star"))):
        make_small_synth(tmp_path / name, classes)
        (tmp_path / name / "classes.txt").unlink()
        shutil.rmtree(tmp_path / name / "train")

    out = tmp_path / "scores.json"
    cfg = EvalConfig(models=(model,), data=str(tmp_path / "new"), workers=0, json=str(out))
    scores = evaluate.run(dataclasses.replace(cfg, baselines=("center",)))["scores"]
    printed = " ".join(capsys.readouterr().out.split())
    assert "no classes.txt and no train/: the classes are val/'s folder names" in printed
    assert (
        "m: OM is not defined for these 4 images: the model does not know their classes" in printed
    )
    written = json.loads(out.read_text())
    assert set(written) == MASK_KEYS | {"OM_note"} and written["OM"] is None
    assert written["n_images"] == 4 and 0 <= written["LE"] <= 1 and 0 <= written["F1"] <= 1
    assert scores["center"]["OM"] is None and "not defined" in scores["center"]["OM_note"]

    # Some classes known: OM counts their images only, and says so.
    mixed = evaluate.run(dataclasses.replace(cfg, data=str(tmp_path / "mixed")))["scores"]["m"]
    assert mixed["OM"] is not None and mixed["n_images"] == 4
    assert mixed["OM_note"] == (
        "OM counts only the 2 images of the model's classes: it is not defined for the other 2"
    )
    # Every class known (the usual case): no note, the documented keys only.
    known = evaluate.run(dataclasses.replace(cfg, data=str(tiny_data)))["scores"]["m"]
    assert set(known) == MASK_KEYS and known["OM"] is not None


def test_every_image_needs_its_object_mask_once_the_annotations_have_masks(
    tiny_data, tmp_path, make_checkpoint
):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    missing = sorted((data / "annotations").glob("*.png"))[0]
    missing.unlink()
    model = make_checkpoint(tmp_path / "m" / "checkpoint.pt", data)
    with pytest.raises(UserError, match=rf"{missing.name}: object mask not found"):
        evaluate.run(EvalConfig(models=(model,), data=str(data), workers=0))
    for png in (data / "annotations").glob("*.png"):
        png.unlink()  # none at all: scored without PxAP
    scores = evaluate.run(EvalConfig(models=(model,), data=str(data), workers=0))["scores"]
    assert set(scores["m"]) == KEYS
