"""imagefiles.py and decode.py: the scan and the checks that come before decoding (bad
entries, limits), the orientation of every format, whole images with bytes after them, the
overlay's image. The loaders' decoder: tests/data/test_loader.py.

What could hang or take the machine's memory runs in a subprocess with a timeout.
"""

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pictures import scene
from PIL import Image, ImageOps

from casm_deploy.config import InferConfig
from casm_deploy.data.decode import orient, orient_array, read_image, read_overlay
from casm_deploy.data.imagefiles import MAX_PIXELS, ImageError, max_file_bytes, read_file, scan


def _encode(image: np.ndarray, kind: str, orientation: int = 1) -> bytes:
    picture = Image.fromarray(image)
    exif = picture.getexif()
    if orientation != 1:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    options = {"quality": 95} if kind in ("JPEG", "WEBP") else {}
    picture.save(buffer, kind, exif=exif, **options)
    return buffer.getvalue()


# The peak resident memory of this process in MB. Not getrusage's ru_maxrss: a child starts
# with its parent's (pytest's, with torch) peak there.
PEAK = (
    "peak = lambda: int(next(line.split()[1] for line in open('/proc/self/status') "
    "if line.startswith('VmHWM'))) // 1024"
)


def _run(code: str, timeout: float = 60) -> str:
    """`code` in a fresh interpreter; its stdout. A hang fails the test instead of blocking it."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s")
    assert done.returncode == 0, done.stderr
    return done.stdout


# --- 8: one bad entry stops nothing -----------------------------------------------------------


def test_symlink_loop_is_an_error_entry_not_a_crash(tmp_path):
    (tmp_path / "a.jpg").symlink_to(tmp_path / "b.jpg")
    (tmp_path / "b.jpg").symlink_to(tmp_path / "a.jpg")
    (tmp_path / "c.png").write_bytes(_encode(scene(8, 8), "PNG"))
    assert [e.rel for e in scan(tmp_path)] == ["a.jpg", "b.jpg", "c.png"]
    with pytest.raises(ImageError, match="symbolic links"):
        read_file(tmp_path / "a.jpg")


@pytest.mark.parametrize("target", ["fifo", "/dev/zero"])
def test_fifo_or_device_named_jpg_is_refused_without_blocking(tmp_path, target):
    if target == "fifo":
        os.mkfifo(tmp_path / "pipe")
        target = tmp_path / "pipe"
    (tmp_path / "x.jpg").symlink_to(target)
    out = _run(
        f"""
        from casm_deploy.data.imagefiles import ImageError, read_file, scan
        print([e.rel for e in scan({str(tmp_path)!r})])
        try:
            read_file({str(tmp_path / "x.jpg")!r})
        except ImageError as error:
            print(error)
        """,
        timeout=30,
    )
    kind = "a FIFO" if "pipe" in str(target) else "a character device"
    assert out.splitlines() == ["['x.jpg']", f"not a regular file ({kind})"]


def _make_folders(root: Path, names: list[str]) -> None:
    """root/names[0]/names[1]/...: made level by level, relative to a descriptor, so neither
    the depth (mkdir(parents=True) recurses) nor the path's length limits it."""
    fd = os.open(root, os.O_RDONLY)
    for name in names:
        os.mkdir(name, dir_fd=fd)
        child = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(fd)


def _remove_folders(root: Path, names: list[str]) -> None:
    """Undo `_make_folders` (and a file at the bottom) without recursing: pytest's cleanup of
    old temporary folders (shutil.rmtree) would hit the recursion limit."""
    fds = [os.open(root, os.O_RDONLY)]
    for name in names:
        fds.append(os.open(name, os.O_RDONLY, dir_fd=fds[-1]))
    for entry in os.scandir(fds[-1]):
        os.unlink(entry.name, dir_fd=fds[-1])
    for name in reversed(names):
        os.close(fds.pop())
        os.rmdir(name, dir_fd=fds[-1])
    os.close(fds.pop())


def test_deep_tree_is_scanned_without_recursion(tmp_path):
    names = ["d"] * 1000
    _make_folders(tmp_path, names)
    try:
        tmp_path.joinpath(*names, "x.jpg").write_bytes(b"")
        (tmp_path / "z.jpg").write_bytes(b"")
        assert [e.rel for e in scan(tmp_path)] == ["d/" * 1000 + "x.jpg", "z.jpg"]
    finally:
        _remove_folders(tmp_path, names)


def test_scan_order_and_rules(tmp_path):
    """Depth first, sorted by name (resumes rely on the order), links to folders not
    followed, the excluded folder skipped, other names left out."""
    for rel in ["b/2.jpg", "b/1.png", "a.JPG", "b/c/0.tif", "ba.bmp", "out/x.jpg", "note.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path / "b", target_is_directory=True)
    (tmp_path / "file-link.webp").symlink_to(tmp_path / "a.JPG")
    rels = [e.rel for e in scan(tmp_path, exclude=tmp_path / "out")]
    assert rels == ["a.JPG", "b/1.png", "b/2.jpg", "b/c/0.tif", "ba.bmp", "file-link.webp"]
    assert all(e.error is None for e in scan(tmp_path))


def test_unlistable_folder_is_an_error_entry(tmp_path):
    """A folder scandir refuses (here: its path is longer than PATH_MAX, which even root
    cannot list) is yielded with the reason; the scan goes on after it."""
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "z.jpg").write_bytes(b"")
    _make_folders(tmp_path, ["n" * 250] * 20)  # 5,000 characters
    entries = list(scan(tmp_path))
    assert [e.rel for e in entries][0] == "a.jpg" and entries[-1].rel == "z.jpg"
    bad = [e for e in entries if e.error]
    assert len(bad) == 1 and bad[0].rel.endswith("/") and bad[0].rel.startswith("n" * 250 + "/")
    assert "too long" in bad[0].error.lower() and "\n" not in bad[0].error


# --- 9: memory: the pixel and file size limits, checked before reading ------------------------


def _declaring(width: int, height: int) -> bytes:
    """A small JPEG whose header (SOF0) declares `width` x `height` pixels."""
    data = bytearray(_encode(scene(16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_pixel_limit_refuses_a_small_file_declaring_a_huge_image(tmp_path):
    path = tmp_path / "bomb.jpg"
    path.write_bytes(_declaring(13_000, 13_000))  # 169 MP: under PIL's own limit
    assert path.stat().st_size < 5_000
    with pytest.raises(ImageError, match="too large: 13000x13000 pixels"):
        read_file(path)
    with pytest.raises(ImageError, match="too large"):
        read_image(path, 32)
    small = tmp_path / "small.png"
    small.write_bytes(_encode(scene(20, 30), "PNG"))
    assert read_file(small).width == 30
    with pytest.raises(ImageError, match="too large: 30x20 pixels"):
        read_file(small, max_pixels=599)
    with pytest.raises(ImageError, match="too large"):
        read_image(small, 32, max_pixels=599)


def _refused_with_peak(path: Path) -> tuple[str, int]:
    """read_file's refusal of `path`, in a fresh interpreter, and the MB its peak grew by."""
    out = _run(
        f"""
        from casm_deploy.data.imagefiles import ImageError, read_file
        import cv2, PIL.Image
        {PEAK}
        before = peak()
        try:
            read_file({str(path)!r})
        except ImageError as error:
            print(error)
        print(peak() - before)
        """
    )
    reason, grown = out.splitlines()
    return reason, int(grown)


def test_file_size_limit_is_checked_before_reading(tmp_path):
    path = tmp_path / "sparse.jpg"
    with open(path, "wb") as f:
        f.write(_encode(scene(16, 16), "JPEG"))
        f.truncate(max_file_bytes() + 1)  # sparse: no disk used
    reason, grown = _refused_with_peak(path)
    assert reason.startswith(f"too large: {max_file_bytes() + 1} bytes")
    assert grown < 50  # megabytes: the 0.5 GB file was never read


def test_header_is_checked_before_the_whole_file_is_read(tmp_path):
    path = tmp_path / "zeros.png"
    with open(path, "wb") as f:
        f.truncate(200 << 20)  # 200 MB of zeros, under the size limit
    reason, grown = _refused_with_peak(path)
    assert "not an image" in reason
    assert grown < 50  # megabytes


def test_default_limits():
    assert 100_000_000 <= MAX_PIXELS < 13_000 * 13_000
    assert max_file_bytes(1000) > 4 * 1000 and max_file_bytes() < 1 << 30
    # infer's default limit is the one of everything else that reads images
    assert InferConfig().max_pixels == MAX_PIXELS == InferConfig().max_megapixels * 1e6
    assert InferConfig(max_megapixels=0.5).max_pixels == 500_000
    with pytest.raises(ValueError, match="max-megapixels"):
        InferConfig(max_megapixels=0)


def test_infer_has_the_max_megapixels_option():
    from typer.testing import CliRunner

    from casm_deploy.cli import app

    result = CliRunner().invoke(app, ["infer", "--help"], env={"COLUMNS": "200"})
    assert "--max-megapixels" in result.output


def test_read_overlay_decodes_large_jpegs_reduced(tmp_path, monkeypatch):
    path = tmp_path / "large.jpg"
    image = cv2.resize(scene(30, 40), (4000, 3000), interpolation=cv2.INTER_LINEAR)
    path.write_bytes(_encode(image, "JPEG"))
    flags = []
    imdecode = cv2.imdecode
    monkeypatch.setattr(
        cv2, "imdecode", lambda data, flag: flags.append(flag) or imdecode(data, flag)
    )
    overlay = read_overlay(path, 512)
    assert overlay.shape == (384, 512, 3) and overlay.dtype == np.uint8
    assert flags == [cv2.IMREAD_REDUCED_COLOR_4 | cv2.IMREAD_IGNORE_ORIENTATION]  # 1000 x 750
    reference = cv2.resize(image[:, :, ::-1], (512, 384), interpolation=cv2.INTER_AREA)  # BGR
    assert np.abs(overlay.astype(int) - reference).mean() < 3
    small = tmp_path / "small.png"
    small.write_bytes(_encode(scene(20, 30), "PNG"))
    assert read_overlay(small, 512).shape == (20, 30, 3)  # never enlarged
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        read_overlay(tmp_path / "empty.jpg", 512)
    (tmp_path / "bomb.jpg").write_bytes(_declaring(13_000, 13_000))
    with pytest.raises(ImageError, match="too large"):
        read_overlay(tmp_path / "bomb.jpg", 512)


# --- 10: the orientation of every format ------------------------------------------------------


@pytest.mark.parametrize("kind", ["JPEG", "PNG", "TIFF", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_size_and_pixels_are_as_shown(tmp_path, kind, orientation):
    """Width and height, the model's input and the overlay are all the image as a viewer
    shows it (PIL's exif_transpose), whatever the format."""
    data = _encode(scene(48, 64), kind, orientation)  # stored 64 wide, 48 high
    path = tmp_path / f"x.{kind.lower()}"
    path.write_bytes(data)
    shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    image, width, height = read_image(path, 32)
    assert (width, height) == (shown.shape[1], shown.shape[0])
    assert (width, height) == ((48, 64) if orientation >= 5 else (64, 48))
    expected = cv2.resize(shown, (32, 32), interpolation=cv2.INTER_AREA)
    assert np.abs(image.astype(int) - expected).mean() < 4
    overlay = read_overlay(path, 32)[:, :, ::-1]  # BGR -> RGB
    assert overlay.shape[:2] == (round(height * 32 / 64), round(width * 32 / 64))
    expected = cv2.resize(shown, overlay.shape[1::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(overlay.astype(int) - expected).mean() < 4


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_array_and_orient_agree_with_pil(orientation):
    image = scene(5, 7)
    stored = Image.fromarray(image)
    exif = stored.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, "PNG", exif=exif)
    shown = np.asarray(ImageOps.exif_transpose(Image.open(buffer)))
    np.testing.assert_array_equal(orient_array(image, orientation), shown)
    tensor = orient(torch.from_numpy(image).permute(2, 0, 1), orientation).permute(1, 2, 0)
    np.testing.assert_array_equal(tensor.numpy(), shown)


# --- 11: whole images with bytes after them; images cut short ---------------------------------


TRAILER = (np.random.default_rng(1).integers(0, 0x7F, 200_000, dtype=np.uint8)).tobytes()


@pytest.mark.parametrize("kind", ["JPEG", "progressive JPEG", "PNG"])
def test_trailing_bytes_after_a_whole_image_are_accepted(tmp_path, kind):
    """Motion photos append a video; other tools append their data."""
    if kind == "progressive JPEG":  # several scans, tables between them
        buffer = io.BytesIO()
        Image.fromarray(scene(48, 64)).save(buffer, "JPEG", quality=95, progressive=True)
        data = buffer.getvalue()
    else:
        data = _encode(scene(48, 64), kind)
    (tmp_path / "plain").write_bytes(data)
    (tmp_path / "motion").write_bytes(data + b"\0\0\0\x18ftypmp42" + TRAILER)
    image, width, height = read_image(tmp_path / "motion", 32)
    assert (width, height) == (64, 48)
    np.testing.assert_array_equal(image, read_image(tmp_path / "plain", 32)[0])


def _with_thumbnail(data: bytes) -> bytes:
    """`data` with an APP1 segment holding a whole small JPEG (an EXIF thumbnail's FF D9)."""
    thumbnail = _encode(scene(8, 8, 3), "JPEG")
    segment = b"Exif\0\0" + thumbnail
    return data[:2] + b"\xff\xe1" + (len(segment) + 2).to_bytes(2, "big") + segment + data[2:]


@pytest.mark.parametrize("kind", ["JPEG", "PNG"])
def test_image_cut_short_is_truncated_even_with_data_after_the_cut(tmp_path, kind):
    data = _encode(scene(64, 64), kind)
    if kind == "JPEG":
        data = _with_thumbnail(data)
        assert read_image_bytes(tmp_path, data)[1:] == (64, 64)
    cut = data[: len(data) * 2 // 3]
    for bad in (cut, cut + TRAILER):
        (tmp_path / "cut").write_bytes(bad)
        with pytest.raises(ImageError, match="truncated"):
            read_file(tmp_path / "cut")


def read_image_bytes(folder: Path, data: bytes) -> tuple[np.ndarray, int, int]:
    (folder / "whole").write_bytes(data)
    return read_image(folder / "whole", 32)
