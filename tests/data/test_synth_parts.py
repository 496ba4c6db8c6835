"""Tests of `data synth --parts`: objects made of parts, any one of which identifies the class."""

from __future__ import annotations

import dataclasses
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from casm_deploy.config import SynthConfig
from casm_deploy.data.draw import SHAPES, tight_box
from casm_deploy.data.imagenet import list_images, read_classes
from casm_deploy.data.parts import FAVOURITE, PART_KINDS, make_parts_sample, part_annotation
from casm_deploy.data.synth import generate, make_sample
from casm_deploy.data.torch_loader import ImageDataset
from casm_deploy.errors import UserError


def tiny(out: Path, **kwargs) -> SynthConfig:
    values = dict(
        out=str(out), num_classes=3, train_per_class=4, val_per_class=3, min_side=48,
        max_side=64, parts=3, workers=1,
    )  # fmt: skip
    values.update(kwargs)
    return SynthConfig(**values)


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def samples(cfg: SynthConfig, count: int = 3):
    """`(class_index, i, image, labels)` for `count` validation images of every class."""
    for k in range(len(SHAPES)):
        for i in range(count):
            yield (k, i, *make_parts_sample(cfg, "val", k, i))


@pytest.fixture(scope="module")
def parts_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth_parts") / "set"
    generate(tiny(out), progress=False)
    return out


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_label_map_holds_each_part_once_with_its_box(parts):
    cfg = SynthConfig(parts=parts, min_side=40, max_side=64)
    for _, _, image, labels in samples(cfg):
        assert labels.shape == image.shape[:2] and labels.dtype == np.uint8
        assert set(np.unique(labels)) == set(range(parts + 1))  # every part is drawn
        record = part_annotation(labels, parts)
        assert [p["name"] for p in record["parts"]] == list(PART_KINDS[:parts])
        assert record["favourite"] == FAVOURITE == 0
        for k, part in enumerate(record["parts"]):
            x0, y0, x1, y1 = part["box"]
            inside = np.zeros_like(labels, bool)
            inside[y0:y1, x0:x1] = True
            mask = labels == k + 1
            assert not (mask & ~inside).any()  # nothing outside the box
            assert mask[y0, x0:x1].any() and mask[y1 - 1, x0:x1].any()  # tight on every side
            assert mask[y0:y1, x0].any() and mask[y0:y1, x1 - 1].any()


def test_parts_are_apart_and_the_favourite_is_largest():
    for cfg in (SynthConfig(parts=3), SynthConfig(parts=3, min_side=40, max_side=48)):
        for _, _, _, labels in samples(cfg):
            boxes = [part["box"] for part in part_annotation(labels, 3)["parts"]]
            for a in range(3):
                for b in range(a + 1, 3):
                    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes[a], boxes[b]
                    # A gap of at least one empty pixel column or row between the two boxes.
                    assert ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0, (a, b, boxes)
            sides = [max(x1 - x0, y1 - y0) for x0, y0, x1, y1 in boxes]
            assert sides[FAVOURITE] == max(sides) and sides.count(max(sides)) == 1


def test_the_parts_are_drawn_and_the_favourite_stands_out_most():
    cfg = SynthConfig(parts=3)
    contrast = np.zeros(3)
    for _, _, image, labels in samples(cfg):
        pixels = image.astype(np.float32)
        ring = cv2.dilate((labels > 0).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
        around = pixels[ring & (labels == 0)].mean(0)  # the clutter around the object
        for k in range(3):
            inside = pixels[labels == k + 1]
            contrast[k] += np.abs(inside - around).mean()
    contrast /= len(SHAPES) * 3
    assert contrast.min() > 10  # every part is visible
    assert contrast.argmax() == FAVOURITE


def test_dropping_a_part_changes_only_its_pixels():
    cfg = SynthConfig(parts=3, min_side=40, max_side=64)
    for k, i, image, labels in samples(cfg, count=2):
        for drop in range(3):
            without, dropped_labels = make_parts_sample(cfg, "val", k, i, drop=drop)
            assert np.array_equal(dropped_labels, np.where(labels == drop + 1, 0, labels))
            # What changed lies within the part's box and the pixel of anti-aliasing around it.
            x0, y0, x1, y1 = tight_box(labels == drop + 1)
            changed = (image != without).any(2)
            near = np.zeros_like(changed)
            near[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1] = True
            assert changed.any() and not (changed & ~near).any()
            # The part is gone: its pixels are those of the clutter, not of the part.
            part = labels == drop + 1
            assert np.abs(image[part].astype(int) - without[part]).mean() > 10
            # make_sample agrees and gives the box of the parts left.
            again, boxes = make_sample(cfg, "val", k, i, drop=drop)
            assert np.array_equal(again, without) and boxes == [tight_box(dropped_labels > 0)]


def test_dropping_needs_parts_and_a_part_to_drop():
    with pytest.raises(ValueError):
        make_sample(SynthConfig(), "val", 0, 0, drop=0)
    with pytest.raises(ValueError):
        make_parts_sample(SynthConfig(parts=3), "val", 0, 0, drop=3)
    with pytest.raises(ValueError):
        make_parts_sample(SynthConfig(parts=1), "val", 0, 0, drop=0)  # nothing would be left


def test_determinism(tmp_path, parts_set):
    cfg = SynthConfig(parts=3)
    a, la = make_parts_sample(cfg, "train", 2, 7)
    b, lb = make_parts_sample(cfg, "train", 2, 7)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    generate(tiny(tmp_path / "b", workers=2), progress=False)
    one, two = files(parts_set), files(tmp_path / "b")
    assert one.keys() == two.keys()
    assert {k: v for k, v in one.items() if k != "synth.json"} == {
        k: v for k, v in two.items() if k != "synth.json"
    }
    generate(tiny(tmp_path / "c", seed=1), progress=False)
    other = files(tmp_path / "c")
    assert any(one[k] != other[k] for k in one if k.startswith("parts/"))


def read_box(xml_path: Path) -> list[int]:
    (box,) = ET.parse(xml_path).getroot().iter("bndbox")
    return [int(box.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]


def test_the_set_on_disk(parts_set):
    assert sorted(p.name for p in parts_set.iterdir()) == [
        "annotations", "classes.txt", "parts", "synth.json", "train", "val",
    ]  # fmt: skip
    val = sorted((parts_set / "val").rglob("*.JPEG"))
    assert sorted(p.name for p in (parts_set / "parts").iterdir()) == sorted(
        f"{p.stem}{ext}" for p in val for ext in (".json", ".png")
    )  # validation images only
    for path in val:
        h, w = cv2.imread(str(path)).shape[:2]
        labels = cv2.imread(str(parts_set / "parts" / f"{path.stem}.png"), cv2.IMREAD_UNCHANGED)
        assert labels.shape == (h, w) and labels.dtype == np.uint8
        record = json.loads((parts_set / "parts" / f"{path.stem}.json").read_text())
        assert record == part_annotation(labels, 3)
        # The object's box is the union of its parts' boxes, the tight box of all their pixels.
        boxes = np.array([part["box"] for part in record["parts"]])
        union = [*boxes[:, :2].min(0).tolist(), *boxes[:, 2:].max(0).tolist()]
        assert read_box(parts_set / "annotations" / f"{path.stem}.xml") == union
        assert union == list(tight_box(labels > 0))
        # The object's mask beside its XML: all its parts' pixels, as object 1.
        objects = cv2.imread(
            str(parts_set / "annotations" / f"{path.stem}.png"), cv2.IMREAD_UNCHANGED
        )
        assert np.array_equal(objects, (labels > 0).astype(np.uint8))
    assert json.loads((parts_set / "synth.json").read_text())["config"]["parts"] == 3


def test_solid_shapes_are_recorded_as_before_parts_existed(tmp_path):
    out = tmp_path / "set"
    cfg = tiny(out, parts=0, train_per_class=1, val_per_class=1)
    generate(cfg, progress=False)
    assert "parts" not in json.loads((out / "synth.json").read_text())["config"]
    assert not (out / "parts").exists()
    assert generate(cfg, progress=False)["generated"] is False
    with pytest.raises(UserError, match="--overwrite"):  # objects of parts are another set
        generate(dataclasses.replace(cfg, parts=3), progress=False)
    generate(dataclasses.replace(cfg, parts=3, overwrite=True), progress=False)
    assert (out / "parts").is_dir()
    generate(dataclasses.replace(cfg, overwrite=True), progress=False)
    assert not (out / "parts").exists()  # overwrite removes the old part annotations


@pytest.mark.parametrize("kwargs", [dict(parts=4), dict(parts=-1), dict(parts=2, copies=2)])
def test_invalid_parts(tmp_path, kwargs):
    with pytest.raises(UserError, match="--parts"):
        generate(tiny(tmp_path / "x", **kwargs), progress=False)
    assert not (tmp_path / "x").exists()


def test_the_cli_option(tmp_path):
    from typer.testing import CliRunner

    from casm_deploy.cli import app

    out = tmp_path / "cli"
    args = ["data", "synth", str(out), "--parts", "2", "--num-classes", "2"]
    args += ["--train-per-class", "1", "--val-per-class", "1", "--workers", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "synth.json").read_text())["config"]["parts"] == 2
    record = json.loads(next((out / "parts").glob("*.json")).read_text())
    assert [p["name"] for p in record["parts"]] == ["shape", "texture"]


def test_a_parts_set_loads_and_trains_a_step(parts_set):
    from casm_deploy.models.mapping import build_masker

    info = read_classes(parts_set)
    assert len(info.wnids) == 3
    train = list_images(parts_set, "train", info.wnids)
    assert len(train) == 12 and {label for _, label in train} == {0, 1, 2}
    dataset = ImageDataset(train, 32, train=True)
    images = torch.stack([torch.from_numpy(dataset[j][0].copy()) for j in range(len(dataset))])
    images = images.permute(0, 3, 1, 2).float() / 255
    labels = torch.tensor([label for _, label in train])

    torch.manual_seed(0)
    masker = build_masker("resnet18", len(info.wnids), width=8)
    optimizer = torch.optim.SGD(masker.encoder.parameters(), lr=0.1)
    before = [p.detach().clone() for p in masker.encoder.parameters()]
    masks, logits = masker(images)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and masks.shape == (12, 1, 32, 32)
    after = list(masker.encoder.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_parts_check_scores_a_given_classifier(parts_set, make_checkpoint, tmp_path, monkeypatch):
    """`benchmarks/parts_check.py --classifier`, as `make experiments` runs it per seed."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import parts_check

    checkpoint = make_checkpoint(tmp_path / "clf.pt", parts_set, image_size=32)
    out = tmp_path / "check.json"
    argv = ["parts_check.py", "--classifier", checkpoint, "--data", str(parts_set)]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    parts_check.main()
    result = json.loads(out.read_text())
    assert list(result["accuracy"]["without"]) == list(PART_KINDS)
    values = [result["accuracy"]["clean"], *result["accuracy"]["without"].values()]
    assert all(0 <= v <= 1 for v in values)
    assert result["passed"] == (result["redundant"] and result["prefers_favourite"])
    with pytest.raises(SystemExit):
        parts_check.parse_args(["--classifier", checkpoint])  # no --data
