"""Tests of the synthetic ImageNet-layout generator (tiny sets, CPU)."""

from __future__ import annotations

import dataclasses
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from casm_deploy.cli import app
from casm_deploy.config import SynthConfig
from casm_deploy.data.draw import SHAPES, render, tight_box, wnid_for
from casm_deploy.data.synth import generate, make_sample
from casm_deploy.errors import UserError


def tiny(out: Path, **kwargs) -> SynthConfig:
    values = dict(
        out=str(out),
        num_classes=3,
        train_per_class=4,
        val_per_class=2,
        min_side=40,
        max_side=64,
        workers=1,
    )
    values.update(kwargs)
    return SynthConfig(**values)


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "set"
    generate(tiny(out), progress=False)
    return out


def test_shapes_and_wnids():
    assert len(SHAPES) >= 12 and len(set(SHAPES)) == len(SHAPES)
    wnids = [wnid_for(k) for k in range(len(SHAPES))]
    assert all(w[0] == "n" and len(w) == 9 and w[1:].isdigit() for w in wnids)
    assert wnids == sorted(wnids)  # label i = i-th sorted folder = i-th shape


def test_determinism(tmp_path, tiny_set):
    generate(tiny(tmp_path / "b", workers=2), progress=False)
    a, b = files(tiny_set), files(tmp_path / "b")
    assert a.keys() == b.keys()
    # synth.json records `out` and `workers`; every data file must be byte-identical.
    assert {k: v for k, v in a.items() if k != "synth.json"} == {
        k: v for k, v in b.items() if k != "synth.json"
    }
    config_a = json.loads(a["synth.json"])["config"]
    config_b = json.loads(b["synth.json"])["config"]
    for key in ("out", "workers"):
        del config_a[key], config_b[key]
    assert config_a == config_b

    generate(tiny(tmp_path / "c", seed=1), progress=False)
    c = files(tmp_path / "c")
    assert any(a[k] != c[k] for k in a if k.endswith(".JPEG"))


def test_layout(tiny_set):
    lines = (tiny_set / "classes.txt").read_text().splitlines()
    wnids = [line.split()[0] for line in lines]
    assert [line.split(maxsplit=1)[1] for line in lines] == SHAPES[:3]
    assert wnids == sorted(wnids) == [wnid_for(k) for k in range(3)]
    for split, n in (("train", 4), ("val", 2)):
        assert sorted(p.name for p in (tiny_set / split).iterdir()) == wnids
        for wnid in wnids:
            assert len(list((tiny_set / split / wnid).glob("*.JPEG"))) == n
    stems = [p.stem for p in (tiny_set / "val").rglob("*.JPEG")]
    assert len(set(stems)) == 6
    assert sorted(p.stem for p in (tiny_set / "annotations").glob("*.xml")) == sorted(stems)
    assert sorted(stems)[0] == "ILSVRC2012_val_00000001"
    record = json.loads((tiny_set / "synth.json").read_text())
    assert record["counts"] == {"train": 12, "val": 6}
    assert not (tiny_set / ".synth-incomplete").exists()
    assert not list(tiny_set.glob(".*"))  # synth.json's temporary (common.files) is gone too


def read_boxes(xml_path: Path) -> tuple[ET.Element, list[tuple[int, ...]]]:
    root = ET.parse(xml_path).getroot()
    boxes = []
    for obj in root.iter("object"):
        b = obj.find("bndbox")
        boxes.append(tuple(int(b.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")))
    return root, boxes


def check_object_masks(root: Path) -> None:
    """Every XML has its object mask beside it: the image's size, 0 off the objects and k on
    the k-th object's pixels, whose tight box is exactly the k-th box."""
    for xml in sorted((root / "annotations").glob("*.xml")):
        tree, boxes = read_boxes(xml)
        objects = cv2.imread(str(xml.with_suffix(".png")), cv2.IMREAD_UNCHANGED)
        size = (int(tree.findtext("size/height")), int(tree.findtext("size/width")))
        assert objects.dtype == np.uint8 and objects.shape == size
        assert set(np.unique(objects)) == set(range(len(boxes) + 1))
        for k, box in enumerate(boxes, 1):
            assert tight_box(objects == k) == box


def test_annotations(tiny_set):
    cfg = tiny(tiny_set)
    check_object_masks(tiny_set)
    for path in (tiny_set / "val").rglob("*.JPEG"):
        image = cv2.imread(str(path))
        h, w = image.shape[:2]
        root, boxes = read_boxes(tiny_set / "annotations" / f"{path.stem}.xml")
        assert root.findtext("filename") == path.stem
        assert int(root.findtext("size/width")) == w and int(root.findtext("size/height")) == h
        assert len(boxes) == 1
        assert [o.findtext("name") for o in root.iter("object")] == [path.parent.name]
        x0, y0, x1, y1 = boxes[0]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        fraction = (x1 - x0) * (y1 - y0) / (w * h)
        assert cfg.min_area * 0.7 <= fraction <= cfg.max_area * 1.1


@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_box_is_tight_box_of_object(shape):
    cfg = SynthConfig(min_side=40, max_side=64)
    for i in range(3):
        image, boxes = make_sample(cfg, "val", shape, i)
        _, mask = render(
            np.random.default_rng([cfg.seed, 1, shape, i]), SHAPES[shape], 40, 64, 0.1, 0.6
        )
        assert boxes == [tight_box(mask)]
        x0, y0, x1, y1 = boxes[0]
        assert mask[y0:y1, x0:x1].sum() == mask.sum()  # nothing outside
        assert mask[y0, x0:x1].any() and mask[y1 - 1, x0:x1].any()  # tight on every side
        assert mask[y0:y1, x0].any() and mask[y0:y1, x1 - 1].any()
        # The object is drawn: its pixels differ in colour from the background's.
        pixels = image.astype(np.float32)
        inside, outside = pixels[mask].mean(0), pixels[~mask].mean(0)
        assert np.abs(inside - outside).max() > 10


def test_copies(tmp_path):
    cfg = tiny(tmp_path / "two", num_classes=2, train_per_class=1, val_per_class=2, copies=2)
    single, _ = make_sample(dataclasses.replace(cfg, copies=1), "val", 1, 0)
    image, boxes = make_sample(cfg, "val", 1, 0)
    h, w = single.shape[:2]
    assert image.shape == (h, 2 * w, 3)
    assert np.array_equal(image[:, :w], single) and np.array_equal(image[:, w:], single)
    (x0, y0, x1, y1), second = boxes
    assert second == (x0 + w, y0, x1 + w, y1)

    generate(cfg, progress=False)
    for path in (tmp_path / "two" / "val").rglob("*.JPEG"):
        decoded = cv2.imread(str(path)).astype(np.int16)
        half = decoded.shape[1] // 2
        assert (
            np.abs(decoded[:, :half] - decoded[:, half:]).mean() < 6
        )  # JPEG blocks fall differently in the two halves
        _, boxes = read_boxes(tmp_path / "two" / "annotations" / f"{path.stem}.xml")
        assert len(boxes) == 2 and boxes[1][0] == boxes[0][0] + half
    check_object_masks(tmp_path / "two")  # objects 1 and 2, one per copy


def test_clutter_on_the_right(tmp_path):
    cfg = tiny(
        tmp_path / "clutter", num_classes=2, train_per_class=1, val_per_class=2, copies=2,
        right="clutter",
    )  # fmt: skip
    copy_image, copy_boxes = make_sample(dataclasses.replace(cfg, right="copy"), "val", 1, 0)
    image, boxes = make_sample(cfg, "val", 1, 0)
    w = image.shape[1] // 2
    assert image.shape == copy_image.shape
    assert np.array_equal(image[:, :w], copy_image[:, :w])  # the same left half as with copies
    assert np.abs(image[:, w:].astype(int) - image[:, :w]).mean() > 5  # not a copy
    assert boxes == copy_boxes[:1]  # only the left object is annotated
    again, _ = make_sample(cfg, "val", 1, 0)
    assert np.array_equal(image, again)  # deterministic

    generate(cfg, progress=False)
    for xml in (tmp_path / "clutter" / "annotations").glob("*.xml"):
        assert len(read_boxes(xml)[1]) == 1
    check_object_masks(tmp_path / "clutter")  # the left object only: no mask on the clutter
    # A data set made with the other --right is another data set.
    with pytest.raises(UserError, match="--overwrite"):
        generate(dataclasses.replace(cfg, right="copy"), progress=False)


def test_clutter_needs_two_copies(tmp_path):
    with pytest.raises(UserError, match="--copies 2"):
        generate(tiny(tmp_path / "x", right="clutter"), progress=False)
    with pytest.raises(UserError, match="--right"):
        generate(tiny(tmp_path / "y", copies=2, right="noise"), progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_set_recorded_before_right_existed_is_still_recognised(tmp_path):
    out = tmp_path / "set"
    cfg = tiny(out, train_per_class=1, val_per_class=1)
    generate(cfg, progress=False)
    record = json.loads((out / "synth.json").read_text())
    del record["config"]["right"]  # as written before the setting was added
    (out / "synth.json").write_text(json.dumps(record))
    assert generate(cfg, progress=False)["generated"] is False


def test_a_set_made_before_object_masks_is_written_again_with_them(tmp_path):
    out = tmp_path / "set"
    cfg = tiny(out, train_per_class=1, val_per_class=1)
    generate(cfg, progress=False)
    made = files(out)
    for png in (out / "annotations").glob("*.png"):
        png.unlink()  # as synth wrote a set before it wrote masks
    assert generate(cfg, progress=False)["generated"] is True
    assert files(out) == made  # the same files, and the masks back


def test_class_subset(tmp_path):
    summary = generate(
        tiny(tmp_path / "sub", classes=("heart", "n90000001", "Ring")), progress=False
    )
    expected = {wnid_for(SHAPES.index(n)): n for n in ("disk", "ring", "heart")}
    assert summary["classes"] == expected
    assert sorted(p.name for p in (tmp_path / "sub" / "train").iterdir()) == sorted(expected)
    with pytest.raises(UserError, match="valid classes"):
        generate(tiny(tmp_path / "bad", classes=("disk", "dodecahedron")), progress=False)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_classes=0),
        dict(num_classes=len(SHAPES) + 1),
        dict(train_per_class=0),
        dict(val_per_class=0),
        dict(min_side=8, max_side=8),
        dict(min_side=64, max_side=40),
        dict(min_area=0.0),
        dict(min_area=0.5, max_area=0.4),
        dict(max_area=0.95),
        dict(copies=3),
    ],
)
def test_invalid_config(tmp_path, kwargs):
    with pytest.raises(UserError):
        generate(tiny(tmp_path / "x", **kwargs), progress=False)
    assert not (tmp_path / "x").exists()


def test_existing_output(tmp_path):
    out = tmp_path / "set"
    generate(tiny(out, train_per_class=1, val_per_class=1), progress=False)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    summary = generate(tiny(out, train_per_class=1, val_per_class=1, workers=2), progress=False)
    assert summary["generated"] is False and summary["counts"] == {"train": 3, "val": 3}
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes

    with pytest.raises(UserError, match="--overwrite"):
        generate(tiny(out, train_per_class=2, val_per_class=1), progress=False)

    (out / "notes.txt").write_text("keep me")
    generate(tiny(out, train_per_class=2, val_per_class=1, overwrite=True), progress=False)
    assert len(list((out / "train").rglob("*.JPEG"))) == 6
    assert (out / "notes.txt").read_text() == "keep me"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "photo.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match="not empty"):
        generate(tiny(foreign), progress=False)
    generate(tiny(foreign, train_per_class=1, val_per_class=1, overwrite=True), progress=False)
    assert (foreign / "photo.jpg").exists() and (foreign / "synth.json").exists()


def test_interrupted_run_is_redone(tmp_path):
    out = tmp_path / "set"
    cfg = tiny(out, train_per_class=1, val_per_class=1)
    generate(cfg, progress=False)
    (out / "synth.json").unlink()
    (out / ".synth-incomplete").write_text("")
    assert generate(cfg, progress=False)["generated"] is True
    assert (out / "synth.json").exists() and not (out / ".synth-incomplete").exists()


def test_aspect_ratios_vary():
    cfg = SynthConfig()
    shapes = [make_sample(cfg, "train", 0, i)[0].shape[:2] for i in range(30)]
    ratios = [w / h for h, w in shapes]
    assert min(ratios) < 0.9 and max(ratios) > 1.1
    assert all(0.6 < r < 1.6 for r in ratios)
    assert all(80 <= min(h, w) <= 128 for h, w in shapes)


def test_a_data_set_1000_folders_deep_is_made_and_replaced(deep_tmp_path):
    """Issue 27: the output folder is made without recursion, and --overwrite removes the old
    set without it (shutil.rmtree recursed on Python 3.11)."""
    out = deep_tmp_path / "/".join(["d"] * 1000)
    args = ["data", "synth", str(out), "--num-classes", "2", "--train-per-class", "1"]
    args += ["--val-per-class", "1", "--min-side", "40", "--max-side", "48", "--workers", "1"]
    for extra in ([], ["--overwrite", "--seed", "1"]):
        result = CliRunner().invoke(app, [*args, *extra])
        assert result.exit_code == 0, result.output
        assert len(list((out / "val").glob("*/*.JPEG"))) == 2
