"""What `casm-deploy infer` shows a person: a folder without images, the image libraries'
own warnings kept off the console, and overlays with a readable label.

The model is a tiny random checkpoint (32 px); the images are small files made here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from casm_deploy.cli import app
from casm_deploy.data.decode import quiet_decoders
from casm_deploy.data.imagefiles import EXTENSIONS, Entry
from casm_deploy.deploy.infer import outputs

runner = CliRunner()


@pytest.fixture(scope="module")
def model(make_checkpoint, tiny_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    return make_checkpoint(folder / "checkpoint.pt", tiny_data, image_size=32)


def infer_args(images: Path, out: Path, model: str, *extra: str) -> list[str]:
    return ["infer", str(images), "--model", model, "--out", str(out), "--batch", "2", *extra]


def picture(height: int = 48, width: int = 64) -> np.ndarray:
    image = np.full((height, width, 3), 60, np.uint8)
    image[height // 4 : height // 2, width // 4 : width // 2] = (40, 200, 240)
    return image


# --- a folder without images --------------------------------------------------------------


def test_a_folder_without_images_is_a_user_error_before_the_model(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub" / "clip.mp4").write_bytes(b"\0" * 16)
    out = tmp_path / "out"
    # the model does not exist: the folder is refused first, nothing is written
    result = runner.invoke(app, infer_args(folder, out, str(tmp_path / "no-model.onnx")))
    assert result.exit_code == 2, result.output
    assert "no image files" in result.output and "Traceback" not in result.output
    assert all(ext in result.output for ext in EXTENSIONS)
    assert not out.exists()


def test_images_only_inside_out_count_as_none(model, tmp_path):
    folder = tmp_path / "photos"
    out = folder / "out"  # inside the folder: its overlays are no input
    (out / "overlays").mkdir(parents=True)
    cv2.imwrite(str(out / "overlays" / "a.jpg"), picture())
    result = runner.invoke(app, infer_args(folder, out, model))
    assert result.exit_code == 2 and "no image files" in result.output, result.output


def test_a_rerun_of_a_finished_run_is_a_quiet_no_op(model, tmp_path):
    folder, out = tmp_path / "photos", tmp_path / "out"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), picture())
    assert runner.invoke(app, infer_args(folder, out, model)).exit_code == 0
    again = runner.invoke(app, infer_args(folder, out, model))
    assert again.exit_code == 0, again.output
    assert "0 image files to do, 1 already" in again.output
    assert "no image files" not in again.output


# --- the image libraries' own warnings ----------------------------------------------------


def noisy_images(folder: Path) -> None:
    """A PNG whose ICC profile libpng complains of, and a JPEG libjpeg warns about: both
    decode. And a PNG with a broken CRC, which does not (an error row)."""
    folder.mkdir(parents=True)
    Image.fromarray(picture()).save(folder / "icc.png", icc_profile=b"\0" * 200)
    jpeg = cv2.imencode(".jpg", picture())[1].tobytes()
    (folder / "extra.jpg").write_bytes(jpeg[:-2] + b"\0" * 3 + jpeg[-2:])
    png = bytearray(cv2.imencode(".png", picture())[1].tobytes())
    png[60:80] = bytes(20)  # inside IDAT: its CRC no longer matches
    (folder / "broken.png").write_bytes(bytes(png))


def test_library_warnings_stay_off_the_console(model, tmp_path):
    folder, out = tmp_path / "photos", tmp_path / "out"
    noisy_images(folder)
    # what the libraries print without the filter: the lines the test must not see below
    loud = subprocess.run(
        [sys.executable, "-c", "import cv2, sys; cv2.imread(sys.argv[1]); cv2.imread(sys.argv[2])"]
        + [str(folder / "icc.png"), str(folder / "extra.jpg")],
        capture_output=True,
        text=True,
    )
    assert "libpng warning" in loud.stderr and "Corrupt JPEG data" in loud.stderr
    command = [sys.executable, "-m", "casm_deploy", *infer_args(folder, out, model, "--overlay")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 3, result.stdout + result.stderr  # broken.png failed
    for line in ("libpng", "Corrupt JPEG data"):
        assert line not in result.stderr and line not in result.stdout, result.stderr
    rows = {}
    for text in (out / "boxes.jsonl").read_text().splitlines():
        row = json.loads(text)
        rows[row["path"]] = row
    assert rows["icc.png"]["status"] == rows["extra.jpg"]["status"] == "ok"
    assert rows["broken.png"]["status"] == "error" and rows["broken.png"]["error"]


def test_quiet_decoders_passes_every_other_line(capfd):
    with quiet_decoders():
        os.write(2, b"libpng warning: iCCP: known incorrect sRGB profile\n")
        os.write(2, b"a real problem\n")
        os.write(2, b"libpng is fine\n")
        os.write(2, b"Corrupt JPEG data: 3 extraneous bytes before marker 0xd9\n")
    os.write(2, b"after\n")
    err = capfd.readouterr().err
    assert err == "a real problem\nlibpng is fine\nafter\n"


# --- overlays: box, label and score -------------------------------------------------------


def draw(tmp_path: Path, height: int, width: int, box, label: str = "tabby cat 0.87"):
    path = tmp_path / f"{height}x{width}.png"
    cv2.imwrite(str(path), np.full((height, width, 3), 128, np.uint8))
    mask = np.ones((32, 32), np.float32)  # all salient: the picture stays plain grey
    jpeg = outputs.overlay(path, mask, box, width, height, label=label)
    return cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).astype(int)


def green(image: np.ndarray) -> np.ndarray:  # the box and the label's background (BGR)
    return image[..., 1] - np.maximum(image[..., 0], image[..., 2]) > 50  # JPEG blurs a thin line


def dark(image: np.ndarray) -> np.ndarray:  # the label's text
    return image.max(axis=2) < 60


def test_overlay_label_is_the_name_and_score_from_the_row(tmp_path, monkeypatch):
    seen = []
    real = outputs.overlay
    monkeypatch.setattr(outputs, "overlay", lambda *a, **k: seen.append(k) or real(*a, **k))
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), picture())
    row = {"box": [8, 8, 40, 30], "name": "tabby cat", "score": 0.8712, "width": 64, "height": 48}
    out = tmp_path / "out"
    out.mkdir()
    writer = outputs.Writer(out, masks="none", overlay=True)
    writer.write(Entry("a.png", path), np.ones((32, 32), np.float32), row)
    assert seen == [{"label": "tabby cat 0.87"}]
    assert (out / "overlays" / "a.png.jpg").is_file()


def test_overlay_draws_the_label_on_a_filled_background_above_the_box(tmp_path):
    image = draw(tmp_path, 300, 400, [100, 120, 300, 280])
    assert green(image)[120:280, 100].all()  # the box's left edge
    above = image[:120, 100:300]
    assert green(above).sum() > 300 and dark(above).sum() > 30  # background and text
    assert not green(image[:80]).any()  # just above the box, not at the top


def test_overlay_lines_grow_with_the_image(tmp_path):
    def thickness(image: np.ndarray, y: int, x: int) -> int:  # across the box's left edge
        return int(green(image)[y, x - 10 : x + 10].sum())

    small = draw(tmp_path, 120, 160, [40, 40, 120, 100], label="")
    large = draw(tmp_path, 480, 512, [120, 160, 480, 400], label="")
    assert thickness(large, 280, 120) > thickness(small, 70, 40) >= 1


@pytest.mark.parametrize(
    "box",
    [[0, 0, 400, 300], [0, 0, 30, 12], [380, 0, 400, 8], [370, 290, 400, 300], [0, 0, 0, 0], None],
)
def test_overlay_label_stays_inside_the_picture(tmp_path, box):
    label = "a very long class name, longer than the picture is wide, even so 0.99"
    image = draw(tmp_path, 300, 400, box, label=label)
    plain = draw(tmp_path, 300, 400, box, label="")
    assert image.shape == (300, 400, 3)
    changed = np.abs(image - plain).max(axis=2) > 40
    assert changed.sum() > 1000 and dark(image).sum() > 100  # drawn, not cut off outside


def test_overlay_of_a_tiny_image(tmp_path):
    assert draw(tmp_path, 6, 5, [1, 1, 4, 5], label="x 0.50").shape == (6, 5, 3)
