"""`data tiny-imagenet`: Tiny ImageNet's official layout (a zip, or the folder it was extracted
to) converted to the ImageNet layout; boxes made exclusive; a second run a no-op; errors of one
line that leave nothing behind; hostile members skipped; grayscale JPEGs read as RGB by every
reader. The archives are built here: no image of the real one is ever in the repository."""

from __future__ import annotations

import json
import os
import stat
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from casm_deploy.cli import app
from casm_deploy.data.imagenet import list_images, read_annotation, read_classes

runner = CliRunner()
WNIDS = ["n01443537", "n01641577", "n02124075"]
WORDS = {"n01443537": "goldfish, Carassius auratus", "n01641577": "bullfrog, Rana catesbeiana"}
NAMES = {"n01443537": "goldfish", "n01641577": "bullfrog", "n02124075": "n02124075"}
TRAIN, VAL = 4, 2  # images a class
ODD = "val_1"  # 48 wide, 40 high, its box at its edges
OWNED = ("train", "val", "annotations", "classes.txt", "tiny-imagenet.json")
STAGING = ".tiny-imagenet.partial"


def jpeg(image: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def picture(height: int, width: int, seed: int, gray: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 50, np.uint8)
    image[height // 4 : height // 2, width // 4 : width // 2] = rng.integers(100, 256, 3)
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if gray else image


def make_tiny(root: Path, top: str = "tiny-imagenet-200") -> tuple[Path, dict]:
    """A small Tiny ImageNet in the official layout under root/top, every third image
    grayscale (one channel); returns the top folder and each image's (wnid, inclusive box)."""
    base = root / top
    (base / "val" / "images").mkdir(parents=True)
    (base / "test" / "images").mkdir(parents=True)  # no labels: ignored
    (base / "test" / "images" / "test_0.JPEG").write_bytes(jpeg(picture(64, 64, 0, False)))
    (base / "wnids.txt").write_text("\n".join(reversed(WNIDS)) + "\n")
    words = {"n00000001": "entity", **WORDS, "n09999999": "other, thing"}
    (base / "words.txt").write_text("".join(f"{w}\t{n}\n" for w, n in words.items()))
    truth, count = {}, 0
    for wnid in WNIDS:
        images = base / "train" / wnid / "images"
        images.mkdir(parents=True)
        lines = []
        for i in range(TRAIN):
            name, count = f"{wnid}_{i}.JPEG", count + 1
            box = (0, 0, 63, 63) if i == 0 else (i, 2 * i, 40 + i, 50)
            (images / name).write_bytes(jpeg(picture(64, 64, count, count % 3 == 0)))
            lines.append(f"{name}\t" + "\t".join(map(str, box)))
            truth[name[:-5]] = (wnid, box)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("\n".join(lines) + "\n")
    lines = []
    for j in range(len(WNIDS) * VAL):
        wnid, name, count = WNIDS[j % len(WNIDS)], f"val_{j}.JPEG", count + 1
        height, width = (40, 48) if name == f"{ODD}.JPEG" else (64, 64)
        box = (0, 0, width - 1, height - 1) if j < 2 else (3, 4, 30, 31)
        image = picture(height, width, count, count % 3 == 0)
        (base / "val" / "images" / name).write_bytes(jpeg(image))
        lines.append(f"{name}\t{wnid}\t" + "\t".join(map(str, box)))
        truth[name[:-5]] = (wnid, box)
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base, truth


def zip_tree(base: Path, path: Path, top: str, extra=(), method=zipfile.ZIP_DEFLATED) -> Path:
    """`base`'s files in a zip under `top`/, then the `extra` (ZipInfo or name, bytes)."""
    with zipfile.ZipFile(path, "w", method) as archive:
        for file in sorted(base.rglob("*")):
            if file.is_file():
                archive.write(file, f"{top}/{file.relative_to(base).as_posix()}")
        for info, data in extra:
            archive.writestr(info, data)
    return path


def convert(*args) -> object:
    return runner.invoke(app, ["data", "tiny-imagenet", *map(str, args)])


def files(root: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] not in skip
    }


def error_line(result) -> str:
    """The one error line of a failed command: exit 2, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.output.rstrip().endswith(errors[0]), result.output
    return errors[0]


def warnings(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("warning:")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small Tiny ImageNet as a folder and as a zip (of another top folder name), and the
    truth of its images."""
    root = tmp_path_factory.mktemp("tiny")
    base, truth = make_tiny(root / "src", top="my-tiny")
    archive = zip_tree(base, root / "tiny-imagenet-200.zip", "tiny-imagenet-200")
    return {"folder": base.parent, "top": base, "zip": archive, "truth": truth}


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    """The small Tiny ImageNet converted, every class."""
    out = tmp_path_factory.mktemp("converted") / "data"
    result = convert(tiny["zip"], out)
    assert result.exit_code == 0, result.output
    return out


def test_zip_and_folder_give_the_same_layout_names_and_exclusive_boxes(tiny, converted, tmp_path):
    from_folder, from_top = tmp_path / "folder", tmp_path / "top"
    for src, out in ((tiny["folder"], from_folder), (tiny["top"], from_top)):
        result = convert(src, out)
        assert result.exit_code == 0, result.output
    expected = files(converted, skip=("tiny-imagenet.json",))
    assert files(from_folder, ("tiny-imagenet.json",)) == files(from_top, ("tiny-imagenet.json",))
    assert files(from_folder, ("tiny-imagenet.json",)) == expected
    assert sorted(os.listdir(converted)) == sorted(OWNED)  # no staging folder left

    info = read_classes(converted)
    assert info.wnids == WNIDS and info.names == [NAMES[w] for w in WNIDS]
    assert len(list_images(converted, "train", WNIDS)) == len(WNIDS) * TRAIN
    assert len(list_images(converted, "val", WNIDS)) == len(WNIDS) * VAL
    truth = tiny["truth"]
    for stem, (wnid, (x0, y0, x1, y1)) in truth.items():
        split = "val" if stem.startswith("val_") else "train"
        image = converted / split / wnid / f"{stem}.JPEG"
        assert image.read_bytes() == (tiny["top"] / _source_rel(split, wnid, stem)).read_bytes()
        annotation = read_annotation(converted / "annotations" / f"{stem}.xml")
        assert annotation.objects == [(wnid, [x0, y0, x1 + 1, y1 + 1])]  # right, bottom + 1
        decoded = cv2.imread(str(image), cv2.IMREAD_UNCHANGED)
        assert (annotation.width, annotation.height) == (decoded.shape[1], decoded.shape[0])
    assert read_annotation(converted / "annotations" / "n01443537_0.xml").objects[0][1] == [
        0, 0, 64, 64
    ]  # fmt: skip
    odd = read_annotation(converted / "annotations" / f"{ODD}.xml")
    assert (odd.width, odd.height, odd.objects[0][1]) == (48, 40, [0, 0, 48, 40])
    record = json.loads((converted / "tiny-imagenet.json").read_text())
    assert record["counts"] == {"train": 12, "val": 6, "grayscale": 6, "skipped": 0}
    assert record["source"]["top"] == "tiny-imagenet-200" and record["wnids"] == WNIDS


def _source_rel(split: str, wnid: str, stem: str) -> str:
    return f"train/{wnid}/images/{stem}.JPEG" if split == "train" else f"val/images/{stem}.JPEG"


def test_classes_and_wnids_choose_the_classes(tiny, tmp_path):
    result = convert(tiny["zip"], tmp_path / "two", "--classes", "2")
    assert result.exit_code == 0, result.output
    assert read_classes(tmp_path / "two").wnids == WNIDS[:2]
    val = list_images(tmp_path / "two", "val", WNIDS[:2])
    assert len(val) == 2 * VAL  # the third class's val images are left out
    assert not any(p.stem.startswith(WNIDS[2]) for p in (tmp_path / "two/annotations").iterdir())
    listed = tmp_path / "wnids.txt"
    listed.write_text(f"{WNIDS[2]}\n\n{WNIDS[0]}\n")
    result = convert(tiny["folder"], tmp_path / "listed", "--wnids", listed)
    assert result.exit_code == 0, result.output
    assert read_classes(tmp_path / "listed").wnids == [WNIDS[0], WNIDS[2]]

    listed.write_text(f"{WNIDS[0]}\nn07777777\n")
    line = error_line(convert(tiny["zip"], tmp_path / "bad", "--wnids", listed))
    assert f"{listed}:2:" in line and "n07777777" in line and "wnids.txt" in line
    assert "has 3 classes" in error_line(convert(tiny["zip"], tmp_path / "bad", "--classes", "4"))
    both = convert(tiny["zip"], tmp_path / "bad", "--classes", "1", "--wnids", listed)
    assert "--wnids" in error_line(both)
    assert not (tmp_path / "bad").exists()


def test_a_second_run_is_a_no_op_other_settings_are_refused_overwrite_keeps_the_rest(
    tiny, tmp_path
):
    out = tmp_path / "out"
    assert convert(tiny["zip"], out, "--classes", "2").exit_code == 0
    before = files(out)
    again = convert(tiny["zip"], out, "--classes", "2")
    assert again.exit_code == 0 and "nothing to do" in again.output
    assert files(out) == before
    other = error_line(convert(tiny["zip"], out, "--classes", "1"))
    assert str(out) in other and "--overwrite" in other
    assert files(out) == before

    (out / "notes.txt").write_text("mine")
    (out / "mine").mkdir()
    (out / "mine" / "keep.JPEG").write_bytes(b"x")
    result = convert(tiny["zip"], out, "--classes", "1", "--overwrite")
    assert result.exit_code == 0, result.output
    assert read_classes(out).wnids == WNIDS[:1]
    assert (out / "notes.txt").read_text() == "mine" and (out / "mine/keep.JPEG").exists()
    assert sorted(os.listdir(out)) == sorted([*OWNED, "notes.txt", "mine"])

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "a.txt").write_text("a")
    assert "--overwrite" in error_line(convert(tiny["zip"], stranger))
    assert os.listdir(stranger) == ["a.txt"]
    inside = error_line(convert(tiny["top"], tiny["top"] / "out"))
    assert "inside the source" in inside and not (tiny["top"] / "out").exists()


def test_an_interrupted_run_leaves_nothing_and_an_unwritable_out_is_one_line(
    tiny, tmp_path, monkeypatch
):
    from casm_deploy.data import tinyimagenet

    done = []

    def interrupted(*args):
        if len(done) == 5:
            raise KeyboardInterrupt
        done.append(1)
        return real(*args)

    real = tinyimagenet.convert_one
    monkeypatch.setattr(tinyimagenet, "convert_one", interrupted)
    result = convert(tiny["zip"], tmp_path / "new" / "out")
    assert result.exit_code == 130 and not (tmp_path / "new").exists()
    monkeypatch.undo()
    a_file = tmp_path / "file"
    a_file.write_text("")
    line = error_line(convert(tiny["zip"], a_file / "out"))
    assert "cannot write" in line and str(a_file) in line


KILLED = """
import sys, time
from pathlib import Path
from casm_deploy.data import tinyimagenet
from casm_deploy.cli import main
real, ready = tinyimagenet.convert_one, Path(sys.argv[1])
def slow(*args):
    result = real(*args)
    ready.touch()  # one image written: the test kills this process now
    time.sleep(60)
tinyimagenet.convert_one = slow
sys.argv = ["casm-deploy", "data", "tiny-imagenet", *sys.argv[2:]]
main()
"""


def test_a_killed_run_leaves_only_its_staging_folder_which_the_next_run_removes(tiny, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out, ready = tmp_path / "out", tmp_path / "ready"
    args = [sys.executable, "-c", KILLED, str(ready), str(tiny["zip"]), str(out)]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    process = subprocess.Popen(args, cwd=tmp_path, **quiet)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the conversion never wrote an image"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert os.listdir(out) == [STAGING]
    assert any((out / STAGING / "annotations").iterdir())
    result = convert(tiny["zip"], out, "--classes", "1")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == sorted(OWNED)


def _flip_a_member(archive: Path, rel: str) -> str:
    """Flip one byte of a stored member's data; returns its name."""
    with zipfile.ZipFile(archive) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(rel))
    data = bytearray(archive.read_bytes())
    name_length = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_length = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    at = info.header_offset + 30 + name_length + extra_length + info.compress_size // 2
    data[at] ^= 0xFF
    archive.write_bytes(bytes(data))
    return info.filename


def _broken(case: str, root: Path) -> tuple[Path, str]:
    """A source with one thing wrong, and what its error must name."""
    base, _ = make_tiny(root / "src")
    if case == "missing val line":
        lines = (base / "val" / "val_annotations.txt").read_text().splitlines()
        (base / "val" / "val_annotations.txt").write_text("\n".join(lines[:3] + lines[4:]))
        return base.parent, "val_3.JPEG: missing val_annotations.txt line"
    if case == "box outside":
        boxes = base / "train" / WNIDS[1] / f"{WNIDS[1]}_boxes.txt"
        lines = boxes.read_text().splitlines()
        lines[2] = f"{WNIDS[1]}_2.JPEG\t0\t0\t64\t10"  # x1 = 64: past the last column
        boxes.write_text("\n".join(lines) + "\n")
        return base.parent, f"{boxes}:3: box 0 0 64 10 outside the 64x64 image {WNIDS[1]}_2.JPEG"
    if case == "missing wnids.txt":
        (base / "wnids.txt").unlink()
        return zip_tree(base, root / "t.zip", "tiny"), "wnids.txt"
    if case == "missing boxes file":
        boxes = base / "train" / WNIDS[2] / f"{WNIDS[2]}_boxes.txt"
        boxes.unlink()
        return base.parent, f"{boxes}: missing"
    if case == "unparsable line":
        (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn01443537\t1\t2\n")
        return base.parent, "val_annotations.txt:1: expected"
    archive = zip_tree(base, root / "t.zip", "tiny", method=zipfile.ZIP_STORED)
    if case == "flipped byte":
        name = _flip_a_member(archive, f"{WNIDS[1]}_2.JPEG")
        return archive, f"{archive}:{name}: damaged zip member"
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])  # truncated
    return archive, f"{archive}: not a zip file"


@pytest.mark.parametrize(
    "case",
    [
        "missing val line",
        "box outside",
        "missing wnids.txt",
        "missing boxes file",
        "unparsable line",
        "flipped byte",
        "truncated zip",
    ],
)
@pytest.mark.parametrize("before", ["absent", "a conversion"])
def test_errors_are_one_line_and_leave_out_as_it_was(tiny, tmp_path, case, before):
    src, named = _broken(case, tmp_path)
    out = tmp_path / "new" / "deeper" / "out"
    if before == "a conversion":
        assert convert(tiny["zip"], out, "--classes", "1").exit_code == 0
    was = files(out) if out.exists() else None
    line = error_line(convert(src, out, "--overwrite"))
    assert named in line, line
    assert (files(out) if out.exists() else None) == was
    assert not (out / STAGING).exists()
    if before == "absent":
        assert not (tmp_path / "new").exists()  # and the parents this run made are gone


def _hostile_zip(tmp_path: Path) -> tuple[Path, list[str], Path]:
    """The small archive plus hostile members; returns it, their names, and where the
    absolute one points."""
    escape = tmp_path / "escaped.JPEG"
    top = "tiny-imagenet-200"
    link = zipfile.ZipInfo(f"{top}/train/{WNIDS[0]}/images/{WNIDS[0]}_90.JPEG")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    bomb = zipfile.ZipInfo(f"{top}/val/images/val_90.JPEG")
    bomb.compress_type = zipfile.ZIP_DEFLATED
    extra = [
        (str(escape), jpeg(picture(64, 64, 1, False))),
        (f"{top}/val/images/../../../../escaped.JPEG", jpeg(picture(64, 64, 2, False))),
        (link, str(escape).encode()),
        (bomb, bytes(50 << 20)),  # 50 MB of zeros, some 50 kB deflated
        (f"{top}/val/images/val_91.JPEG", b"not a JPEG at all"),
        (f"{top}/val/images/val_92.JPEG", b"\xff\xd8\xff" + bytes(300)),
        (f"{top}/val/images/notes.txt", b"what is this"),
    ]
    names = [str(escape), extra[1][0], link.filename, bomb.filename, *(e[0] for e in extra[4:])]
    base, _ = make_tiny(tmp_path / "src", top="t")
    with (base / "val" / "val_annotations.txt").open("a") as f:  # lines for the skipped ones
        f.write("".join(f"val_{j}.JPEG\t{WNIDS[0]}\t0\t0\t9\t9\n" for j in (90, 91, 92)))
    with (base / "train" / WNIDS[0] / f"{WNIDS[0]}_boxes.txt").open("a") as f:
        f.write(f"{WNIDS[0]}_90.JPEG\t0\t0\t9\t9\n")
    return zip_tree(base, tmp_path / "hostile.zip", top, extra), names, escape


def test_hostile_zip_members_are_skipped_with_one_line_each(tmp_path):
    archive, names, escape = _hostile_zip(tmp_path / "in")
    assert archive.stat().st_size < 1 << 20
    around = set(files(tmp_path))
    out = tmp_path / "out"
    result = convert(archive, out)
    assert result.exit_code == 0, result.output
    lines = warnings(result)
    assert len(lines) == len(names), result.output
    for name in names:
        assert sum(name in line for line in lines) == 1, name
    assert any("symbolic link" in line for line in lines)
    assert any("over 100x" in line for line in lines)
    assert set(files(tmp_path, skip=("out",))) == around  # nothing written outside OUT
    assert not escape.exists()
    record = json.loads((out / "tiny-imagenet.json").read_text())
    assert record["counts"] == {"train": 12, "val": 6, "grayscale": 6, "skipped": len(names)}
    written = set(files(out))
    assert not any(s in path for path in written for s in ("_90", "val_91", "val_92", "esc"))


def test_a_link_in_a_folder_source_is_not_followed(tmp_path):
    base, _ = make_tiny(tmp_path / "src")
    outside = tmp_path / "outside.JPEG"
    outside.write_bytes(jpeg(picture(64, 64, 5, False)))
    link = base / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_3.JPEG"
    link.unlink()
    link.symlink_to(outside)
    result = convert(base.parent, tmp_path / "out")
    assert result.exit_code == 0, result.output
    (line,) = warnings(result)
    assert str(link) in line and "symbolic link" in line
    assert not (tmp_path / "out" / "train" / WNIDS[0] / link.name).exists()
    assert not (tmp_path / "out" / "annotations" / f"{WNIDS[0]}_3.xml").exists()
    (base / "wnids.txt").rename(tmp_path / "wnids.txt")
    (base / "wnids.txt").symlink_to(tmp_path / "wnids.txt")
    line = error_line(convert(base.parent, tmp_path / "again"))
    assert str(base / "wnids.txt") in line and "symbolic link" in line


# --- every reader takes the grayscale JPEGs as RGB ------------------------------------------


def _gray(path: Path) -> bool:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED).ndim == 2


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_the_loaders_read_grayscale_jpegs_as_rgb(converted, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    from casm_deploy.data.loader import build_loader

    for split in ("train", "val"):
        batches = build_loader(
            converted, split, WNIDS, 32, 4, train=split == "train", loader=loader, workers=1
        )
        seen = 0
        for images, _, indices in batches:
            assert images.shape[1:] == (3, 32, 32) and images.min() >= 0
            for image, index in zip(images, indices.tolist(), strict=True):
                if _gray(batches.samples[index][0]):
                    seen += 1
                    assert (image[0] == image[1]).all() and (image[1] == image[2]).all()
        assert seen > 0


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_train_runs_on_grayscale_jpegs(converted, tmp_path, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    from casm_deploy.config import TrainConfig
    from casm_deploy.training.train import run

    cfg = TrainConfig(
        data=str(converted), out=str(tmp_path), name=loader, width=8, image_size=32,
        pretrain_epochs=1, epochs=1, batch_size=4, pretrain_batch_size=4, workers=0,
        loader=loader,
    )  # fmt: skip
    run_dir = run(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["phase"] == "casm" and 0 <= records[-1]["val_LE"] <= 1
    assert json.loads((run_dir / "config.json").read_text())["loader"] == loader


def test_eval_visualize_and_infer_read_grayscale_jpegs(converted, tmp_path, make_exports):
    from casm_deploy.config import EvalConfig, VisualizeConfig
    from casm_deploy.evaluation import benchmark, visualize

    models = make_exports(tmp_path / "model", converted, 32, formats=("onnx",))
    checkpoint = str(models["eager"])
    for split, n in (("val", len(WNIDS) * VAL), ("train", len(WNIDS) * TRAIN)):
        cfg = EvalConfig(models=(checkpoint,), data=str(converted), split=split, workers=0)
        scores = benchmark.run(cfg)["scores"]
        assert all(s["n_images"] == n for s in scores.values()), scores
    cfg = VisualizeConfig(
        models=(checkpoint,), data=str(converted), out=str(tmp_path / "vis"), num_images=6
    )
    assert Path(visualize.run(cfg)["grid"]).is_file()
    for decoder in ["opencv", "torchvision", *(["dali"] if _has_dali() else [])]:
        out = tmp_path / f"infer-{decoder}"
        args = ["infer", str(converted / "val"), "--model", str(models["onnx"])]
        args += ["--out", str(out), "--decoder", decoder, "--overlay"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (decoder, result.output)
        records = [json.loads(line) for line in (out / "boxes.jsonl").read_text().splitlines()]
        assert len(records) == len(WNIDS) * VAL and {r["status"] for r in records} == {"ok"}
        odd = next(r for r in records if r["path"].endswith(f"{ODD}.JPEG"))
        assert (odd["width"], odd["height"]) == (48, 40)


def _has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


# --- the real archive, where it is ----------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
REAL = Path(
    os.environ.get("CASM_TINY_IMAGENET", REPO.parent / "shared" / "data" / "tiny-imagenet-100.zip")
)


@pytest.mark.slow  # 27 to 56 s on a busy 2-core machine: convert, train, export, infer
@pytest.mark.skipif(
    not REAL.exists(),
    reason=f"no Tiny ImageNet at {REAL} (set CASM_TINY_IMAGENET to the zip or its folder; "
    "by default ../shared/data/tiny-imagenet-100.zip from the repository)",
)
def test_real_archive_two_classes_train_export_infer(tmp_path):
    from casm_deploy.data.archive import open_source
    from casm_deploy.data.tinyimagenet import read_wnids

    with open_source(REAL, "wnids.txt") as source:
        two = read_wnids(source)[:2]
    listed = tmp_path / "two.txt"
    listed.write_text("\n".join(two) + "\n")
    data = tmp_path / "data"
    result = convert(REAL, data, "--wnids", listed)
    assert result.exit_code == 0, result.output
    counts = json.loads((data / "tiny-imagenet.json").read_text())["counts"]
    assert (counts["train"], counts["val"], counts["skipped"]) == (1000, 100, 0)
    for xml in (data / "annotations").glob("val_*.xml"):
        annotation = read_annotation(xml)
        x0, y0, x1, y1 = annotation.objects[0][1]
        assert 0 <= x0 < x1 <= annotation.width and 0 <= y0 < y1 <= annotation.height

    train = ["train", str(data), "--out", str(tmp_path / "runs"), "--name", "t", "--width", "8"]
    train += ["--image-size", "32", "--pretrain-epochs", "1", "--epochs", "1"]
    train += ["--batch-size", "16", "--pretrain-batch-size", "16", "--epoch-fraction", "0.05"]
    result = runner.invoke(app, [*train, "--workers", "0"])
    assert result.exit_code == 0, result.output
    checkpoint = tmp_path / "runs" / "t" / "checkpoint.pt"
    export = ["export", str(checkpoint), "--out", str(tmp_path / "export"), "--onnx"]
    result = runner.invoke(app, [*export, "--no-torchscript"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "infer"
    infer = ["infer", str(data / "val"), "--model", str(tmp_path / "export" / "masker.onnx")]
    result = runner.invoke(app, [*infer, "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "boxes.jsonl").read_text().splitlines()]
    assert len(records) == 100 and {r["status"] for r in records} == {"ok"}
