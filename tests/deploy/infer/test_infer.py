"""`casm-deploy infer` and `casm_deploy.Masker`: outputs, bad input, exit codes, resume, OUT.

The models are tiny random mappings (32 px) in the three formats infer reads; the images
are a corpus of good and bad files built here.
"""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import casm_deploy
from casm_deploy.cli import EXIT_SOME_FAILED, app
from casm_deploy.data.decode import read_image
from casm_deploy.data.imagefiles import ImageError, scan
from casm_deploy.deploy.infer.outfolder import OutputError, read_record
from casm_deploy.deploy.infer.outputs import Writer
from casm_deploy.deploy.runtime.masker import scale_box
from casm_deploy.errors import UserError

runner = CliRunner()
SIZE = 32


@pytest.fixture(scope="module")
def models(make_exports, tiny_data, tmp_path_factory):
    """The same tiny mapping as a checkpoint, a TorchScript file and an ONNX file."""
    return make_exports(tmp_path_factory.mktemp("models"), tiny_data, SIZE)


def _jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def _picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 60, np.uint8)
    y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
    image[y : y + height // 2, x : x + width // 2] = rng.integers(120, 255, 3)
    return image


def build_corpus(root: Path) -> dict[str, str]:
    """Good and bad files under `root`; returns each image file's expected status."""
    root.mkdir(parents=True)
    expected = {}

    def put(rel: str, data: bytes, status: str) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[rel] = status

    put("good.jpg", _jpeg(_picture(48, 64)), "ok")
    put("UPPER.JPEG", _jpeg(_picture(40, 40, 1)), "ok")
    put("gray.png", cv2.imencode(".png", _picture(30, 50)[:, :, 0])[1].tobytes(), "ok")
    sixteen = _picture(36, 36, 2).astype(np.uint16) * 257
    put("sixteen.png", cv2.imencode(".png", sixteen)[1].tobytes(), "ok")
    alpha = np.dstack([_picture(33, 44, 3), np.full((33, 44), 128, np.uint8)])
    put("alpha.png", cv2.imencode(".png", alpha)[1].tobytes(), "ok")
    cmyk = io.BytesIO()
    Image.fromarray(_picture(40, 60, 4)).convert("CMYK").save(cmyk, "JPEG")
    put("cmyk.jpg", cmyk.getvalue(), "ok")
    put("one.png", cv2.imencode(".png", np.full((1, 1, 3), 200, np.uint8))[1].tobytes(), "ok")
    put("large.jpg", _jpeg(_picture(3000, 4000, 5), quality=70), "ok")
    put("with space ü 名前.png", cv2.imencode(".png", _picture(20, 30, 6))[1].tobytes(), "ok")
    put("nested/deeper/x.bmp", cv2.imencode(".bmp", _picture(25, 25, 7))[1].tobytes(), "ok")
    put("nested/y.webp", cv2.imencode(".webp", _picture(30, 20, 8))[1].tobytes(), "ok")
    put("nested/z.tif", cv2.imencode(".tiff", _picture(22, 28, 9))[1].tobytes(), "ok")
    good = _jpeg(_picture(64, 64, 10))
    put("empty.jpg", b"", "error")
    put("corrupt.jpg", np.random.default_rng(0).bytes(3000), "error")
    put("truncated.jpg", good[: len(good) // 2], "error")
    png = cv2.imencode(".png", _picture(64, 64, 11))[1].tobytes()
    put("truncated.png", png[: len(png) // 2], "error")
    put("text.png", b"this is not an image\n" * 20, "error")
    (root / "dangling.jpg").symlink_to(root / "missing-target.jpg")
    expected["dangling.jpg"] = "error"
    (root / "notes.txt").write_text("not an image name: not an input\n")
    return expected


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus") / "images"
    return root, build_corpus(root)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "boxes.jsonl").read_text().splitlines()]


def test_bad_input_corpus(models, corpus, tmp_path):
    root, expected = corpus
    out = tmp_path / "out"
    coco = tmp_path / "coco.json"
    args = ["infer", str(root), "--model", str(models["onnx"]), "--out", str(out)]
    result = runner.invoke(app, [*args, "--batch", "4", "--coco", str(coco)])
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    records = _records(out)
    paths = [r["path"] for r in records]
    assert sorted(paths) == sorted(expected)  # every image file once; notes.txt is not one
    for record in records:
        assert record["status"] == expected[record["path"]], record
        if record["status"] == "error":
            assert record["error"]
            continue
        path = root / record["path"]
        height, width = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED).shape[:2]
        assert (record["width"], record["height"]) == (width, height)
        mask = cv2.imdecode(np.fromfile(out / "masks" / (record["path"] + ".png"), np.uint8), -1)
        assert mask.shape == (height, width) and mask.dtype == np.uint8
        assert 0 <= record["mask_mean"] <= 1 and 0 < record["score"] <= 1
        assert record["label"] in ("n90000001", "n90000002", "n90000003")
        if record["box"] is not None:
            x0, y0, x1, y1 = record["box"]
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    reasons = {r["path"]: r.get("error", "") for r in records}
    assert reasons["empty.jpg"] == "empty file"
    assert "truncated" in reasons["truncated.jpg"] and "truncated" in reasons["truncated.png"]
    assert "dangling" in reasons["dangling.jpg"]
    assert "not an image" in reasons["text.png"]
    summary = json.loads((out / "summary.json").read_text())
    n_errors = sum(s == "error" for s in expected.values())
    assert (summary["ok"], summary["error"]) == (len(expected) - n_errors, n_errors)
    assert summary["backend"] == "onnx" and summary["provider"] == "CPUExecutionProvider"
    detections = json.loads(coco.read_text())
    assert len(detections["images"]) == len(expected) - n_errors
    assert all(len(a["bbox"]) == 4 and a["score"] > 0 for a in detections["annotations"])
    assert {c["id"] for c in detections["categories"]} == {1, 2, 3}


def test_all_ok_exits_zero_and_resume_is_a_no_op(models, tiny_data, tmp_path):
    out = tmp_path / "out"
    args = ["infer", str(tiny_data / "val"), "--model", str(models["torchscript"])]
    args += ["--out", str(out), "--batch", "5", "--masks", "npy", "--mask-size", "model"]
    assert runner.invoke(app, args).exit_code == 0
    first = (out / "boxes.jsonl").read_text()
    assert len(first.splitlines()) == 12
    mask = np.load(out / "masks" / (json.loads(first.splitlines()[0])["path"] + ".npy"))
    assert mask.shape == (SIZE, SIZE) and mask.dtype == np.float32
    assert runner.invoke(app, args).exit_code == 0  # again: nothing to do, nothing duplicated
    assert (out / "boxes.jsonl").read_text() == first
    assert json.loads((out / "summary.json").read_text())["this_run"]["ok"] == 0


def test_usage_errors_exit_2(models, tiny_data, tmp_path):
    val = str(tiny_data / "val")
    onnx = str(models["onnx"])
    cases = [
        (["infer", str(tmp_path / "nowhere"), "--model", onnx], "no such folder"),
        (["infer", val, "--model", str(tmp_path / "none.onnx")], "no such model file"),
        (["infer", val, "--model", onnx, "--masks", "gif"], "--masks"),
        (["infer", val, "--model", onnx, "--backend", "torchscript"], "cannot run with"),
        (["infer", val, "--model", str(tiny_data / "classes.txt")], "unknown model file type"),
    ]
    if not torch.cuda.is_available():
        cases.append((["infer", val, "--model", onnx, "--device", "cuda"], "CUDA"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    cases.append((["infer", val, "--model", onnx, "--out", str(foreign)], "not an infer output"))
    for args, message in cases:
        fresh = ["--out", str(tmp_path / "fresh")]  # OUT is checked before the model
        result = runner.invoke(app, [*args, *fresh] if "--out" not in args else args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    assert (foreign / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / "fresh").exists()  # refused before anything is written


def test_another_runs_out_is_refused_unless_overwrite(models, tiny_data, tmp_path):
    out = tmp_path / "out"
    base = ["infer", str(tiny_data / "val"), "--out", str(out), "--batch", "8"]
    assert runner.invoke(app, [*base, "--model", str(models["onnx"])]).exit_code == 0
    (out / "boxes.jsonl").write_text((out / "boxes.jsonl").read_text().splitlines()[0] + "\n")
    other = runner.invoke(app, [*base, "--model", str(models["eager"])])
    assert other.exit_code == 2 and "model_sha256" in other.output
    again = runner.invoke(app, [*base, "--model", str(models["eager"]), "--overwrite"])
    assert again.exit_code == 0
    assert len(_records(out)) == 12
    assert json.loads((out / "summary.json").read_text())["backend"] == "eager"


def test_backends_agree(models, tiny_data):
    images = [str(p) for p in sorted((tiny_data / "val").rglob("*.JPEG"))]
    results = {
        name: casm_deploy.Masker.load(path, device="cpu").predict(images, mask_size="model")
        for name, path in models.items()
    }
    eager = results["eager"]
    for name in ("torchscript", "onnx"):
        got = results[name]
        assert got.indices == eager.indices, name
        difference = max(np.abs(a - b).max() for a, b in zip(got.masks, eager.masks, strict=True))
        assert difference < 1e-4, name


def test_api_accepts_paths_arrays_and_tensors(models, corpus):
    root, _ = corpus
    masker = casm_deploy.Masker.load(models["onnx"])
    assert masker.info.backend == "onnx" and masker.image_size == SIZE
    path = root / "good.jpg"
    image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)  # (48, 64, 3) uint8
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255  # (3, 48, 64) in [0, 1]
    by_path = masker.predict(path)
    by_array = masker.predict(image)
    by_tensor = masker.predict(tensor)
    by_batch = masker.predict(tensor[None].repeat(3, 1, 1, 1), batch_size=2)
    assert len(by_path) == len(by_array) == len(by_tensor) == 1 and len(by_batch) == 3
    assert by_path.masks[0].shape == (48, 64)
    assert by_path.boxes == by_array.boxes == by_tensor.boxes
    assert by_batch.boxes == by_path.boxes * 3
    assert by_path.labels[0] in masker.info.wnids
    with pytest.raises(ValueError, match="empty file"):
        masker.predict(root / "empty.jpg")
    with pytest.raises(ValueError, match="shape"):
        masker.predict(np.zeros((4, 4, 5)))


def test_read_image_and_scan(corpus):
    root, expected = corpus
    assert sorted(e.rel for e in scan(root)) == sorted(expected)
    image, width, height = read_image(root / "large.jpg", 64)  # decoded at 1/8 scale
    assert image.shape == (64, 64, 3) and (width, height) == (4000, 3000)
    with pytest.raises(ImageError, match="empty"):
        read_image(root / "empty.jpg", 64)
    exif = io.BytesIO()  # stored 40 wide, 20 high; EXIF orientation 6 shows it 20 x 40
    picture = Image.fromarray(_picture(20, 40))
    exif_data = picture.getexif()
    exif_data[0x0112] = 6
    picture.save(exif, "JPEG", exif=exif_data)
    (root.parent / "rotated.jpg").write_bytes(exif.getvalue())
    assert read_image(root.parent / "rotated.jpg", 16)[1:] == (20, 40)


def test_scale_box():
    assert scale_box([0, 0, 32, 32], 32, 100, 50) == [0, 0, 100, 50]
    assert scale_box([1, 2, 3, 4], 32, 64, 64) == [2, 4, 6, 8]
    assert scale_box([1, 1, 2, 2], 32, 50, 50) == [1, 1, 4, 4]  # edges move outwards
    assert scale_box(None, 32, 10, 10) is None


def test_outputs_never_leave_out(models, tiny_data, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "masks").symlink_to(outside)  # planted: masks would land outside OUT
    (out / "infer.json").write_text("{}")
    args = ["infer", str(tiny_data / "val"), "--model", str(models["onnx"]), "--out", str(out)]
    result = runner.invoke(app, [*args, "--overwrite"])  # removes the link, not its target
    assert result.exit_code == 0, result.output
    assert outside.is_dir() and not any(outside.iterdir())
    (out / "masks").rename(tmp_path / "real-masks")
    (out / "masks").symlink_to(outside)
    (out / "boxes.jsonl").write_text("")  # redo every file, through the planted link
    result = runner.invoke(app, args)
    assert result.exit_code == EXIT_SOME_FAILED
    assert not any(outside.iterdir())
    assert all("outside" in r["error"] for r in _records(out))
    writer = Writer(out)
    for rel in ("../escape.jpg", "/etc/passwd"):
        with pytest.raises(OutputError):
            writer.target("overlays", rel, ".png")


def test_out_inside_the_folder_is_not_scanned(models, tiny_data, tmp_path):
    import shutil

    root = tmp_path / "images"
    shutil.copytree(tiny_data / "val", root)
    args = ["infer", str(root), "--model", str(models["onnx"]), "--out", str(root / "out")]
    assert runner.invoke(app, args).exit_code == 0
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert len(_records(root / "out")) == 12


def test_read_record_drops_a_line_cut_short(tmp_path):
    path = tmp_path / "boxes.jsonl"
    line = '{"path": "a.jpg", "status": "error", "error": "empty file"}\n'
    path.write_text(line + '{"path": "b.jpg", "sta')
    assert read_record(path).done == {"a.jpg"}
    assert path.read_text() == line


def test_sigkill_and_resume(models, tmp_path):
    """Kill a run mid-way; the rerun does the rest: each file once, the same records."""
    root = tmp_path / "images"
    for i in range(240):
        path = root / f"d{i % 3}" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), _picture(24, 24, i))
    command = [sys.executable, "-m", "casm_deploy", "infer", str(root)]
    command += ["--model", str(models["onnx"]), "--batch", "2", "--workers", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    process = subprocess.Popen([*command, "--out", str(killed)], env=env)
    record = killed / "boxes.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if record.is_file() and record.read_text().count("\n") >= 20:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = record.read_text().count("\n")
    assert 20 <= partial < 240, "the run was not killed mid-way"
    with open(record, "a") as f:  # as if the kill cut a write short
        f.write('{"path": "d0/000.png", "sta')
    subprocess.run([*command, "--out", str(killed)], env=env, check=True)
    whole = tmp_path / "whole"
    subprocess.run([*command, "--out", str(whole)], env=env, check=True)

    def by_path(folder):
        return {r["path"]: r for r in _records(folder)}

    resumed = _records(killed)
    assert len(resumed) == len({r["path"] for r in resumed}) == 240
    assert by_path(killed) == by_path(whole)
    assert not list((killed / "masks").rglob(".*.partial"))


@pytest.mark.gpu
def test_onnx_cuda_provider_and_torchscript_on_cuda(models, tiny_data):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without the CUDA provider")
    images = [str(p) for p in sorted((tiny_data / "val").rglob("*.JPEG"))]
    cpu = casm_deploy.Masker.load(models["onnx"], device="cpu").predict(images)
    cuda = casm_deploy.Masker.load(models["onnx"], device="cuda")
    assert cuda.info.provider in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    assert cuda.predict(images).indices == cpu.indices
    scripted = casm_deploy.Masker.load(models["torchscript"], device="cuda").predict(images)
    assert scripted.indices == cpu.indices


def test_cuda_requested_without_cuda_is_a_user_error(models):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="CUDA"):
        casm_deploy.Masker.load(models["onnx"], device="cuda")


@pytest.mark.parametrize("decoder", ["dali", "torchvision"])
def test_jpeg_decoders_match_opencv(models, corpus, tmp_path, decoder):
    """--decoder dali / torchvision (their CPU decoders here, nvJPEG on a GPU): the same
    records as OpenCV."""
    if decoder == "dali":
        pytest.importorskip("nvidia.dali")
    root, expected = corpus
    runs = {}
    for name in ("opencv", decoder):
        out = tmp_path / name
        args = ["infer", str(root), "--model", str(models["onnx"]), "--out", str(out)]
        result = runner.invoke(app, [*args, "--batch", "4", "--decoder", name])
        assert result.exit_code == EXIT_SOME_FAILED, result.output
        runs[name] = {r["path"]: r for r in _records(out)}
    assert runs[decoder].keys() == runs["opencv"].keys() == expected.keys()
    for path, record in runs[decoder].items():
        reference = runs["opencv"][path]
        assert record["status"] == reference["status"], path
        if record["status"] == "ok":
            assert (record["width"], record["height"]) == (reference["width"], reference["height"])
            # different JPEG decoders and resizers: the masks of a random model stay close
            assert abs(record["mask_mean"] - reference["mask_mean"]) < 0.05, path
