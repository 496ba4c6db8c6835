"""visualize.run: grid size, an HTML gallery whose images exist, the JSON record, user errors."""

from __future__ import annotations

import dataclasses
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from casm_deploy.config import VisualizeConfig
from casm_deploy.errors import UserError
from casm_deploy.evaluation import figures, visualize


class _ImageSources(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_run_writes_grid_gallery_and_json(tiny_data, tmp_path, make_checkpoint):
    first = make_checkpoint(tmp_path / "run-a" / "checkpoint.pt", tiny_data)
    second = make_checkpoint(tmp_path / "run-b" / "checkpoint.pt", tiny_data, seed=1)
    import cv2

    one = visualize.run(
        VisualizeConfig(
            models=(first,), data=str(tiny_data), out=str(tmp_path / "one"), num_images=4
        )
    )
    two = visualize.run(
        VisualizeConfig(
            models=(first, second), data=str(tiny_data), out=str(tmp_path / "two"), num_images=4
        )
    )
    grid_one, grid_two = cv2.imread(one["grid"]), cv2.imread(two["grid"])
    cell = figures.cell_size(32)
    assert cell >= 128
    assert grid_one.shape[:2] == figures.grid_shape(4, 1, 32)
    assert grid_two.shape[:2] == figures.grid_shape(4, 2, 32)
    assert grid_one.shape[1] == figures.LABEL_WIDTH + 4 * (cell + figures.PAD)
    assert grid_two.shape[0] - grid_one.shape[0] == 4 * (cell + figures.PAD)

    parser = _ImageSources()
    parser.feed(Path(two["html"]).read_text())
    assert len(parser.sources) == 4 * 2 * 2  # per image and model: boxes + heatmap
    for src in parser.sources:
        assert not Path(src).is_absolute()
        assert (Path(two["html"]).parent / src).is_file()

    record = json.loads(Path(two["json"]).read_text())
    assert record["config"]["models"] == [first, second]
    assert record["config"]["annotations"] == str(tiny_data / "annotations")
    images = record["images"]
    assert len(images) == 4
    assert len({image["class"] for image in images}) == 3  # spread over the classes
    for image in images:
        assert Path(image["path"]).is_file() and image["boxes"]
        assert [m["model"] for m in image["models"]] == ["run-a", "run-b"]
        for result in image["models"]:
            assert 0.0 <= result["iou"] <= 1.0
            assert result["hit"] == (result["iou"] > 0.5)
            assert result["box"] is None or len(result["box"]) == 4

    again = visualize.run(
        VisualizeConfig(
            models=(first,), data=str(tiny_data), out=str(tmp_path / "again"), num_images=4
        )
    )
    paths = [i["path"] for i in json.loads(Path(again["json"]).read_text())["images"]]
    assert paths == [i["path"] for i in images]  # the same seed picks the same images


def test_models_of_different_sizes_are_refused(tiny_data, tmp_path, make_checkpoint):
    a = make_checkpoint(tmp_path / "a" / "checkpoint.pt", tiny_data, image_size=32)
    b = make_checkpoint(tmp_path / "b" / "checkpoint.pt", tiny_data, image_size=64)
    cfg = VisualizeConfig(models=(a, b), data=str(tiny_data), out=str(tmp_path / "out"))
    with pytest.raises(UserError, match="image size"):
        visualize.run(cfg)


def test_missing_checkpoint_is_named(tiny_data, tmp_path):
    missing = str(tmp_path / "nowhere" / "checkpoint.pt")
    cfg = VisualizeConfig(models=(missing,), data=str(tiny_data), out=str(tmp_path / "out"))
    with pytest.raises(UserError, match="nowhere"):
        visualize.run(cfg)


def test_pick_samples_is_seeded_and_spread():
    samples = [(Path(f"{label}-{i}.png"), label) for label in range(3) for i in range(5)]
    picked = visualize.pick_samples(samples, 6, seed=3)
    assert picked == visualize.pick_samples(samples, 6, seed=3)
    assert sorted(label for _, label in picked) == [0, 0, 1, 1, 2, 2]
    assert len(visualize.pick_samples(samples, 100, seed=0)) == 15


def _photos(root: Path) -> Path:
    """5 images in a folder and a subfolder, extensions in any case, a text file and a file
    that is no image: not an ImageNet layout."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(5):
        folder = root / "trip" if i % 2 else root
        folder.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 255, (48 + 8 * i, 64, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"{i}.{'JPG' if i < 3 else 'png'}"), image)
    (root / "notes.txt").write_text("not an image")
    (root / "broken.png").write_bytes(b"not a png either")
    return root


def test_a_plain_folder_of_images_gets_a_gallery_without_ground_truth(
    tiny_data, tmp_path, make_checkpoint, capsys
):
    import cv2

    model = make_checkpoint(tmp_path / "run-a" / "checkpoint.pt", tiny_data)
    photos = _photos(tmp_path / "photos")
    cfg = VisualizeConfig(models=(model,), data=str(photos), out=str(tmp_path / "a"), num_images=4)
    written = visualize.run(cfg)
    printed = capsys.readouterr().out
    assert "not an ImageNet layout" in printed and "no ground truth, no IoU" in printed

    assert cv2.imread(written["grid"]).shape[:2] == figures.grid_shape(4, 1, 32)
    page = Path(written["html"]).read_text()
    assert "IoU" not in page.replace("no IoU", "") and "ground truth</span>" not in page
    parser = _ImageSources()
    parser.feed(page)
    assert len(parser.sources) == 4 * 2
    assert all((Path(written["html"]).parent / src).is_file() for src in parser.sources)

    images = json.loads(Path(written["json"]).read_text())["images"]
    paths = [image["path"] for image in images]
    assert len(paths) == 4 and paths == sorted(paths)
    assert all(Path(p).is_relative_to(photos) and Path(p).suffix != ".txt" for p in paths)
    assert str(photos / "broken.png") not in paths
    for image in images:
        assert image["class"] is None and image["boxes"] == []
        (result,) = image["models"]
        assert "iou" not in result and 0.0 <= result["score"] <= 1.0
        assert result["predicted_name"] in page

    again = visualize.run(dataclasses.replace(cfg, out=str(tmp_path / "b")))
    assert [i["path"] for i in json.loads(Path(again["json"]).read_text())["images"]] == paths
    every = visualize.run(dataclasses.replace(cfg, out=str(tmp_path / "c"), num_images=50))
    assert len(json.loads(Path(every["json"]).read_text())["images"]) == 5  # broken.png passed


def test_a_plain_folder_without_images_is_a_user_error(tiny_data, tmp_path, make_checkpoint):
    model = make_checkpoint(tmp_path / "run-a" / "checkpoint.pt", tiny_data)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    cfg = VisualizeConfig(models=(model,), data=str(empty), out=str(tmp_path / "out"))
    with pytest.raises(UserError, match="no image files"):
        visualize.run(cfg)
