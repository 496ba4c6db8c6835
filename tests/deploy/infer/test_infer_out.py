"""`casm-deploy infer` and its OUT folder: links, short writes, a full disk, the lock,
retries, damaged records, output paths checked up front, long names.

The model is a tiny random checkpoint (32 px); the images are a few small PNGs made here.
"""

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from casm_deploy.cli import EXIT_OUT_UNWRITABLE, EXIT_SOME_FAILED, app
from casm_deploy.data.imagefiles import Entry
from casm_deploy.deploy.infer import job as infer
from casm_deploy.deploy.infer import outfolder, outputs
from casm_deploy.deploy.infer.locks import Lock
from casm_deploy.deploy.infer.outfolder import read_record, write_atomic

runner = CliRunner()
real_write = os.write


@pytest.fixture(scope="module")
def model(make_checkpoint, tiny_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    return make_checkpoint(folder / "checkpoint.pt", tiny_data, image_size=32)


def make_images(root: Path, n: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        image = rng.integers(0, 255, (24 + 8 * i, 64, 3), dtype=np.uint8)
        cv2.imwrite(str(root / f"{i}.png"), image)
    return root


def infer_args(images: Path, out: Path, model: str, *extra: str) -> list[str]:
    return ["infer", str(images), "--model", model, "--out", str(out), "--batch", "2", *extra]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "boxes.jsonl").read_text().splitlines()]


def by_path(out: Path) -> dict[str, dict]:
    return {r["path"]: r for r in records(out)}


# --- links (item 1) -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["boxes.jsonl", "summary.json", "infer.json", ".lock"])
def test_a_link_at_an_own_file_is_refused(model, tmp_path, name):
    images, out = make_images(tmp_path / "images"), tmp_path / "out"
    assert runner.invoke(app, infer_args(images, out, model)).exit_code == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / name).unlink()
    (out / name).symlink_to(victim)
    result = runner.invoke(app, infer_args(images, out, model))
    assert result.exit_code == 2, result.output
    assert str(out / name) in result.output and "symbolic link" in result.output
    assert "Traceback" not in result.output
    assert victim.read_text() == "precious\n"


def test_links_at_temporaries_masks_and_coco_are_not_followed(model, tmp_path):
    images, out = make_images(tmp_path / "images"), tmp_path / "out"
    assert runner.invoke(app, infer_args(images, out, model)).exit_code == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / ".summary.json.partial").symlink_to(victim)  # a temporary's name: removed
    (out / "masks" / "0.png.png").unlink()
    (out / "masks" / "0.png.png").symlink_to(victim)  # a mask: an error row for its image
    lines = (out / "boxes.jsonl").read_text().splitlines(keepends=True)
    (out / "boxes.jsonl").write_text("".join(x for x in lines if '"0.png"' not in x))
    result = runner.invoke(app, infer_args(images, out, model))
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    row = by_path(out)["0.png"]
    assert row["status"] == "error" and "symbolic link" in row["error"]
    assert not os.path.lexists(out / ".summary.json.partial")
    coco = tmp_path / "coco.json"
    coco.symlink_to(victim)
    result = runner.invoke(app, infer_args(images, out, model, "--coco", str(coco)))
    assert result.exit_code == 2 and "--coco" in result.output and "symbolic link" in result.output
    assert victim.read_text() == "precious\n"


def test_a_fifo_in_out_does_not_hang(tmp_path):
    """A FIFO where boxes.jsonl or a temporary should be: refused, not waited on."""
    os.mkfifo(tmp_path / "boxes.jsonl")
    os.mkfifo(tmp_path / ".x.partial")
    code = (
        "import sys; from pathlib import Path\n"
        "from casm_deploy.deploy.infer import outfolder as o\n"
        "out = Path(sys.argv[1])\n"
        "o.write_atomic(out / 'x', b'data')\n"  # the FIFO at its temporary is removed
        "assert (out / 'x').read_bytes() == b'data'\n"
        "try:\n    o.Record(out / 'boxes.jsonl')\n"
        "except o.UserError as error:\n    print(error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "boxes.jsonl: not a regular file" in done.stdout


# --- whole writes (item 3) ----------------------------------------------------------------


def test_write_atomic_writes_every_byte_of_short_writes(tmp_path, monkeypatch):
    half = lambda fd, data: real_write(fd, data[: max(1, len(data) // 2)])  # noqa: E731
    monkeypatch.setattr(os, "write", half)
    data = bytes(range(256)) * 40
    write_atomic(tmp_path / "mask.png", data)
    assert (tmp_path / "mask.png").read_bytes() == data


def test_write_atomic_failure_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "mask.png"
    target.write_bytes(b"old")

    def fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError):
        write_atomic(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["mask.png"]


# --- a full disk (item 4) -----------------------------------------------------------------


def assert_clean(out: Path, result) -> None:
    """Exit 4, one line naming OUT and its free space, and an OUT a rerun can resume."""
    assert result.exit_code == EXIT_OUT_UNWRITABLE, result.output
    assert "Traceback" not in result.output and str(out) in result.output
    assert "MB free" in result.output
    text = (out / "boxes.jsonl").read_text()
    assert text == "" or text.endswith("\n")  # no torn line
    for row in records(out):
        assert row["status"] == "ok"  # nothing recorded as an error of its file
        assert cv2.imread(str(out / "masks" / (row["path"] + ".png")), -1) is not None
    assert not [p for p in out.rglob("*") if p.name.endswith(".partial")]


def test_disk_full_stops_cleanly_and_a_rerun_resumes(model, tmp_path, monkeypatch):
    images = make_images(tmp_path / "images")
    whole = tmp_path / "whole"
    total = 0

    def counting(fd, data):
        nonlocal total
        total += len(data)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting)
    assert runner.invoke(app, infer_args(images, whole, model)).exit_code == 0
    left = total // 2  # the disk fills half way: a short write, then ENOSPC

    def full(fd, data):
        nonlocal left
        if left <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = min(len(data), left)
        left -= n
        return real_write(fd, data[:n])

    out = tmp_path / "out"
    monkeypatch.setattr(os, "write", full)
    assert_clean(out, runner.invoke(app, infer_args(images, out, model)))
    monkeypatch.setattr(os, "write", real_write)
    assert runner.invoke(app, infer_args(images, out, model)).exit_code == 0
    assert len(records(out)) == 6 and by_path(out) == by_path(whole)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_failed_record_append_is_cut_back(model, tmp_path, monkeypatch, code):
    images, out = make_images(tmp_path / "images"), tmp_path / "out"
    appends = 0

    def write(fd, data):
        nonlocal appends
        if bytes(data[:8]) == b'{"path":':
            appends += 1
            if appends == 2:  # the second batch: half of it lands, then the disk fails
                real_write(fd, data[: len(data) // 2])
                raise OSError(code, os.strerror(code))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    assert_clean(out, runner.invoke(app, infer_args(images, out, model)))
    assert len(records(out)) == 2  # the first batch only
    monkeypatch.setattr(os, "write", real_write)
    assert runner.invoke(app, infer_args(images, out, model)).exit_code == 0
    assert sorted(by_path(out)) == [f"{i}.png" for i in range(6)]


def test_a_full_disk_at_a_mask_is_not_an_error_row(model, tmp_path, monkeypatch):
    images, out = make_images(tmp_path / "images"), tmp_path / "out"
    masks = 0

    def write(fd, data):
        nonlocal masks
        if bytes(data[:4]) == b"\x89PNG":
            masks += 1
            if masks > 3:
                raise OSError(errno.EDQUOT, "Disk quota exceeded")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    result = runner.invoke(app, infer_args(images, out, model, "--workers", "1"))
    assert_clean(out, result)
    assert len(records(out)) == 2


# --- one run per OUT (item 5) -------------------------------------------------------------


def test_a_second_run_on_a_locked_out_is_refused(model, tmp_path):
    images, out = make_images(tmp_path / "images"), tmp_path / "out"
    assert runner.invoke(app, infer_args(images, out, model)).exit_code == 0
    before = (out / "boxes.jsonl").read_text()
    with Lock(out):  # flock: a second open file description conflicts, even in one process
        for extra in ([], ["--overwrite"]):
            result = runner.invoke(app, infer_args(images, out, model, *extra))
            assert result.exit_code == 2, result.output
            assert f"pid {os.getpid()} on {socket.gethostname()}" in result.output
            assert "in use by another infer run" in result.output
        assert (out / "boxes.jsonl").read_text() == before  # --overwrite deleted nothing
    result = runner.invoke(app, infer_args(images, out, model, "--overwrite"))
    assert result.exit_code == 0


# --- retries (item 6) ---------------------------------------------------------------------


def test_retry_errors_does_the_errors_again_once(model, tmp_path):
    images, out = make_images(tmp_path / "images", 3), tmp_path / "out"
    (images / "late.png").write_bytes(b"")  # empty now, fine later
    assert runner.invoke(app, infer_args(images, out, model)).exit_code == EXIT_SOME_FAILED
    (images / "late.png").write_bytes((images / "0.png").read_bytes())
    assert runner.invoke(app, infer_args(images, out, model)).exit_code == EXIT_SOME_FAILED
    assert by_path(out)["late.png"]["status"] == "error"  # not retried unless asked
    result = runner.invoke(app, infer_args(images, out, model, "--retry-errors"))
    assert result.exit_code == 0, result.output
    assert len(records(out)) == 4 and by_path(out)["late.png"]["status"] == "ok"
    assert json.loads((out / "summary.json").read_text())["error"] == 0


# --- damaged records (item 7) -------------------------------------------------------------


def test_read_record_keeps_the_lines_around_a_damaged_one(tmp_path):
    path = tmp_path / "boxes.jsonl"
    good = [json.dumps({"path": f"{i}.png", "status": "error", "error": "x"}) for i in range(6)]
    lines = [*good[:3], '{"path": "3.png", "stat\x00\x00', *good[3:]]
    path.write_text("\n".join(lines) + '\n{"path": "torn')
    recorded = read_record(path)
    assert recorded.done == {f"{i}.png" for i in range(6)} and recorded.damaged == [4]
    assert path.read_text() == "\n".join(lines) + "\n"  # the torn last line only is removed


def test_a_damaged_line_is_kept_skipped_and_its_file_done_again(model, tmp_path):
    images, out = make_images(tmp_path / "images"), tmp_path / "out"
    coco = tmp_path / "coco.json"
    assert runner.invoke(app, infer_args(images, out, model)).exit_code == 0
    lines = (out / "boxes.jsonl").read_text().splitlines(keepends=True)
    lines[2] = lines[2][:40] + "\n"  # damaged mid-file (a disk error, an editor)
    (out / "boxes.jsonl").write_text("".join(lines))
    result = runner.invoke(app, infer_args(images, out, model, "--coco", str(coco)))
    assert result.exit_code == 0, result.output
    assert "damaged line(s) 3" in result.output and "1 image files to do" in result.output
    text = (out / "boxes.jsonl").read_text().splitlines(keepends=True)
    assert text[:6] == lines  # the good lines and the damaged bytes are kept
    good = [outfolder.parse(x.encode()) for x in text]
    assert sorted(r["path"] for r in good if r) == [f"{i}.png" for i in range(6)]
    assert json.loads((out / "summary.json").read_text())["ok"] == 6
    assert len(json.loads(coco.read_text())["images"]) == 6


# --- output paths checked before the first image (item 12) --------------------------------


def test_bad_output_paths_are_refused_before_any_work(model, tmp_path):
    images = make_images(tmp_path / "images")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    out = tmp_path / "out"
    folder = tmp_path / "coco-folder"
    folder.mkdir()
    cases = [
        (dangling, [], "dangling symbolic link"),
        (a_file / "out", [], "is not a folder"),
        (out, ["--coco", str(folder)], "a folder"),
        (out, ["--coco", str(a_file / "coco.json")], "is not a folder"),
        (out, ["--coco", str(out / "boxes.jsonl")], "would replace"),
        (out, ["--coco", str(folder / ("c" * 250 + ".json"))], "too long"),
    ]
    for target, extra, message in cases:
        result = runner.invoke(app, infer_args(images, target, model, *extra))
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output and "Traceback" not in result.output, result.output
    assert not out.exists() and os.listdir(folder) == []  # nothing done, no .partial left


# --- long names (item 14) -----------------------------------------------------------------


def test_names_too_long_for_the_file_system_are_shortened(model, tmp_path):
    images = make_images(tmp_path / "i", 1)
    long_name = "é" * 60 + "a" * 125 + ".png"  # 249 bytes: + ".png" exceeds NAME_MAX
    os.rename(images / "0.png", images / long_name)
    deep = images / "/".join(["d" * 200] * 18)  # the input fits PATH_MAX, its mask does not
    deep.mkdir(parents=True)
    cv2.imwrite(str(deep / "x.png"), np.zeros((20, 30, 3), np.uint8))
    out = tmp_path / "/".join(["o" * 100] * 5)
    result = runner.invoke(app, infer_args(images, out, model, "--overlay"))
    assert result.exit_code == 0, result.output
    rows = by_path(out)
    row = rows[long_name]
    for key in ("mask", "overlay"):
        name = Path(row[key]).name
        assert len(os.fsencode(name)) <= 255 - len(".partial") - 1 and name.startswith("é" * 60)
        assert (out / row[key]).is_file()
    deep_row = rows[str(deep.relative_to(images) / "x.png")]
    assert deep_row["mask"].startswith("masks/~long/x.png~")
    assert cv2.imread(str(out / deep_row["mask"]), -1).shape == (20, 30)
    again = runner.invoke(app, infer_args(images, out, model, "--overlay"))
    assert again.exit_code == 0 and by_path(out) == rows  # nothing redone, nothing added


def _deep_folder(root: Path, depth: int) -> Path:
    """root/d/d/.../d, `depth` folders, made one at a time (os.makedirs would recurse)."""
    folder = root
    for _ in range(depth):
        folder = folder / "d"
        folder.mkdir()
    return folder


def test_a_file_1000_folders_deep_is_one_row_and_stops_nothing(model, deep_tmp_path):
    """Issue 27: its mask's and overlay's folders are made without recursion (Path.mkdir's
    parents=True overflowed the stack); a rerun, --overwrite and merge's clean-up go as deep."""
    tmp_path = deep_tmp_path
    images, out = make_images(tmp_path / "images", 4), tmp_path / "out"
    deep = _deep_folder(images, 1000) / "deep.png"
    cv2.imwrite(str(deep), np.zeros((20, 30, 3), np.uint8))
    rel = deep.relative_to(images).as_posix()
    for extra in ([], [], ["--overwrite"]):  # a first run, a resumed one, then afresh
        result = runner.invoke(app, infer_args(images, out, model, "--overlay", *extra))
        assert result.exit_code == 0, result.output[-2000:]
        rows = records(out)
        assert len(rows) == 5 and all(r["status"] == "ok" for r in rows)
        assert sum(r["path"] == rel for r in rows) == 1
    assert (out / "masks" / (rel + ".png")).is_file()
    assert (out / "overlays" / (rel + ".jpg")).is_file()
    # two shards, the last merging, then merge again: a no-op (batches differ: compare statuses)
    sharded = tmp_path / "sharded"
    for k in range(2):
        result = runner.invoke(
            app, infer_args(images, sharded, model, "--overlay", "--shard", f"{k}/2")
        )
        assert result.exit_code == 0, result.output[-2000:]
    assert runner.invoke(app, ["merge", str(sharded)]).exit_code == 0
    statuses = {path: row["status"] for path, row in by_path(sharded).items()}
    assert statuses == {path: row["status"] for path, row in by_path(out).items()}


def test_a_file_where_a_mask_folder_must_be_is_that_image_s_error_row(model, tmp_path):
    images, out = make_images(tmp_path / "images", 3), tmp_path / "out"
    assert runner.invoke(app, infer_args(images, out, model)).exit_code == 0
    deep = _deep_folder(images, 300) / "deep.png"  # a new file, whose folder is taken
    cv2.imwrite(str(deep), np.zeros((20, 30, 3), np.uint8))
    blocked = out / "masks" / "d" / "d" / "d"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("in the way")
    result = runner.invoke(app, infer_args(images, out, model))
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    rows = by_path(out)
    row = rows.pop(deep.relative_to(images).as_posix())
    assert row["status"] == "error"
    assert row["error"] == "cannot make its output folder: masks/d/d/d is not a folder"
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows.values())
    assert blocked.read_text() == "in the way"


# --- memory: 8-bit masks at the original size (item 9) ------------------------------------


def test_png_masks_are_resized_as_levels_npy_as_floats(tmp_path, monkeypatch):
    seen = []

    def spy(mask, width, height):
        seen.append(mask.dtype)
        return cv2.resize(mask, (width, height), interpolation=cv2.INTER_LINEAR)

    monkeypatch.setattr(outputs, "resize_mask", spy)
    mask = np.random.default_rng(0).random((32, 32), dtype=np.float32)
    row = {"width": 300, "height": 200, "box": None}
    for masks in ("png", "npy"):
        out = tmp_path / masks
        out.mkdir()
        outputs.Writer(out, masks).write(Entry("a.jpg", Path("a.jpg")), mask, row)
    assert seen == [np.uint8, np.float32]
    assert cv2.imread(str(tmp_path / "png/masks/a.jpg.png"), -1).shape == (200, 300)


def test_the_writer_reads_an_overlay_under_the_pixel_limit_it_is_given(tmp_path):
    """Its values are infer's options (--masks, --overlay, --max-megapixels), not the config."""
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), np.zeros((40, 50, 3), np.uint8))  # 2,000 pixels
    row = {"width": 50, "height": 40, "box": None}
    mask = np.ones((32, 32), np.float32)
    for limit, out in ((2000, tmp_path / "ok"), (1999, tmp_path / "refused")):
        out.mkdir()
        writer = outputs.Writer(out, masks="none", overlay=True, max_pixels=limit)
        if limit < 2000:
            with pytest.raises(outfolder.OutputError, match="cannot make the overlay: too large"):
                writer.write(Entry("a.png", path), mask, row)
        else:
            writer.write(Entry("a.png", path), mask, row)
        assert (out / "overlays" / "a.png.jpg").is_file() == (limit == 2000)
        assert not (out / "masks").exists()


# --- entries the scan could not read (item 8) ---------------------------------------------


def test_a_scan_error_becomes_an_error_row_unread(model, tmp_path, monkeypatch):
    images, out = make_images(tmp_path / "images", 2), tmp_path / "out"
    real_scan = infer.scan

    def scan(root, exclude=None):
        yield from real_scan(root, exclude=exclude)
        # readable, but the scan says why it could not use it: it must not be read
        yield Entry("loop/0.png", images / "0.png", error="symbolic link loop")

    monkeypatch.setattr(infer, "scan", scan)
    result = runner.invoke(app, infer_args(images, out, model))
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    assert by_path(out)["loop/0.png"] == {
        "path": "loop/0.png",
        "status": "error",
        "error": "symbolic link loop",
    }


def test_overlay_is_small_and_a_vanished_file_is_an_output_error(tmp_path):
    path = tmp_path / "big.jpg"
    cv2.imwrite(str(path), np.full((900, 1200, 3), 128, np.uint8))
    mask = np.ones((32, 32), np.float32)
    jpeg = outputs.overlay(path, mask, [0, 0, 600, 450], 1200, 900)
    assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (384, 512, 3)
    path.unlink()  # gone between the model's read and the overlay: that file's error row
    with pytest.raises(outfolder.OutputError, match="overlay"):
        outputs.overlay(path, mask, None, 1200, 900)
