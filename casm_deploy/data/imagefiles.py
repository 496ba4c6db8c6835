"""Image files as `infer` and the loaders meet them: a streamed recursive scan, and the checked
reading of a file's bytes and header that comes before any decoding (`decode.py`).

A file is checked before it is decoded, each step bounding what the next may cost: it must
be a regular file (a FIFO would block the reader forever) no larger than `max_file_bytes`;
its header, read first, must declare at most `max_pixels` pixels; then the whole file is
read and must hold a whole JPEG or PNG (bytes after the image's end are allowed). What is
wrong with a file is an `ImageError`, its message the one-line reason.
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# PIL warns of a "decompression bomb" from 89 MP; the cap here (checked right after the
# header) is the one that decides, so its warning would only be noise on the user's console.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# The one list: what infer's scan yields and what an ImageNet layout lists (`imagenet.py`).
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
NO_IMAGES = f"no image files (looked for {' '.join(EXTENSIONS)}, any case, in all subfolders)"
# The default pixel cap of the functions below, which take theirs as `max_pixels` (infer's is
# --max-megapixels, whose default is this one: a test checks it): 120 MP admits the largest
# camera photos (102 MP medium format, 108 MP phones) and refuses what a few kilobytes can
# declare to exhaust memory (a decoded image is 3 bytes a pixel, its mask 1 more). PIL refuses
# more than 178,956,970 pixels whatever the cap says.
MAX_PIXELS = 120_000_000
BYTES_PER_PIXEL = 4  # the most an uncompressed 8-bit RGBA file takes ...
FILE_HEADROOM = 64 << 20  # ... plus metadata, thumbnails, a motion photo's video


class ImageError(Exception):
    """A file that is not a usable image; the message is the reason, without the path."""


class UnreadableFile(ImageError):
    """An image file that cannot be opened at all (missing, a dangling link, an OS error);
    `reason` is the operating system's word for it (the error's strerror)."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


@dataclass(frozen=True)
class Encoded:
    """An image file's bytes, checked by `read_file`, and what its header says."""

    data: np.ndarray  # the file's bytes (uint8)
    width: int  # as shown: after the EXIF orientation
    height: int
    orientation: int  # EXIF orientation, 1 (as stored) to 8
    mode: str  # PIL's mode of the stored pixels: RGB (also YCbCr JPEGs), L, CMYK, ...

    @property
    def is_jpeg(self) -> bool:
        return is_jpeg(self.data)


@dataclass(frozen=True)
class Entry:
    """One input file: its path relative to the scanned folder (POSIX separators) and on disk.

    `error` is set for what the scan could not look at (a folder it cannot list: `rel` ends
    with "/"; an entry it cannot stat): the reason, one line, without the path.
    """

    rel: str
    path: Path
    error: str | None = None


def is_image_name(name: str) -> bool:
    return name.lower().endswith(EXTENSIONS)


def max_file_bytes(max_pixels: int = MAX_PIXELS) -> int:
    """The largest file accepted: an uncompressed RGBA image at `max_pixels`, plus headroom."""
    return BYTES_PER_PIXEL * max_pixels + FILE_HEADROOM


def scan(root: str | Path, exclude: Path | None = None) -> Iterator[Entry]:
    """Every file under `root` with an image extension (any case), depth first, sorted by name.

    Streamed: one directory listing per level is in memory, never the whole tree. Symbolic
    links to files are yielded (dangling ones too: reading them reports the error); links to
    directories are not followed, so a tree cannot loop or reach outside `root`. `exclude`
    (an output folder inside `root`) is skipped. What cannot be listed or stat'ed is yielded
    with its `error`, so every problem is reported and the scan goes on.
    """
    root = Path(root)
    try:
        excluded = os.stat(exclude) if exclude is not None else None
    except OSError:
        excluded = None  # not there: nothing to skip

    def listing(folder: Path, prefix: str) -> Iterator[tuple[os.DirEntry, str] | Entry]:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as error:
            return iter([Entry(prefix or "./", folder, _reason(error))])
        return ((entry, prefix) for entry in entries)

    stack = [listing(root, "")]  # one listing per level: any depth, no recursion
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        if isinstance(item, Entry):  # a folder that could not be listed
            yield item
            continue
        entry, prefix = item
        rel = prefix + entry.name
        try:
            if entry.is_dir(follow_symlinks=False):
                if excluded is None or not _same(entry.stat(follow_symlinks=False), excluded):
                    stack.append(listing(Path(entry.path), rel + "/"))
            elif is_image_name(entry.name) and (
                entry.is_symlink() or entry.is_file(follow_symlinks=False)
            ):
                yield Entry(rel, Path(entry.path))
        except OSError as error:  # this entry alone: the scan goes on
            yield Entry(rel, Path(entry.path), _reason(error))


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def read_encoded(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, int, int]:
    """The bytes of an image file and its width and height as shown, after the header checks.

    Raises:
        ImageError: as `decode.read_image`, for everything but undecodable image data.
    """
    encoded = read_file(path, max_pixels=max_pixels)
    return encoded.data, encoded.width, encoded.height


def read_file(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> Encoded:
    """An image file's bytes and header facts, after the checks of `read_encoded`.

    Raises:
        ImageError: as `read_encoded`.
    """
    with open(_open_regular(path, max_file_bytes(max_pixels)), "rb") as file:
        size = os.fstat(file.fileno()).st_size
        width, height, orientation, mode = _header(file)  # PIL reads the header only
        if width * height > max_pixels:
            raise ImageError(f"too large: {width}x{height} pixels (limit {max_pixels})")
        file.seek(0)
        buffer = bytearray(size)
        done = 0
        while done < size and (n := file.readinto(memoryview(buffer)[done:])):
            done += n
    del buffer[done:]  # a file cut short while being read: the checks below see it
    _check_whole(buffer)
    return Encoded(np.frombuffer(buffer, np.uint8), width, height, orientation, mode)


def check_bytes(data: bytes, *, max_pixels: int = MAX_PIXELS) -> Encoded:
    """An image already in memory (a member of an archive), checked as `read_file` checks a
    file's bytes: an image a reader of this package would refuse is refused here.

    Raises:
        ImageError: as `read_encoded`.
    """
    import io

    width, height, orientation, mode = _header(io.BytesIO(data))
    if width * height > max_pixels:
        raise ImageError(f"too large: {width}x{height} pixels (limit {max_pixels})")
    _check_whole(data)
    return Encoded(np.frombuffer(data, np.uint8), width, height, orientation, mode)


def _check_whole(data: bytes | bytearray) -> None:
    if is_jpeg(data) and not _jpeg_ends(data):
        raise ImageError("truncated JPEG (no end-of-image marker after the image data)")
    if data.startswith(PNG_SIGNATURE) and not _png_ends(data):
        raise ImageError("truncated PNG (no IEND chunk)")


def _open_regular(path: str | Path, limit: int) -> int:
    """A descriptor of `path` open for reading, once known to be a regular file of 1 to
    `limit` bytes.

    Opened without blocking, so a FIFO cannot hang the reader; checked again once open, so a
    file swapped in between is still seen for what it is.
    """
    try:
        _check_regular(os.stat(path), limit)  # before opening: a device is never opened
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError as error:
        kind = "dangling symbolic link" if os.path.islink(path) else "file not found"
        raise UnreadableFile(kind, _reason(error)) from None
    except OSError as error:
        raise UnreadableFile(f"cannot read: {_reason(error)}", _reason(error)) from None
    try:
        _check_regular(os.fstat(fd), limit)
    except ImageError:
        os.close(fd)
        raise
    return fd


def _check_regular(st: os.stat_result, limit: int) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise ImageError("a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"not a regular file ({_file_kind(st.st_mode)})")
    if st.st_size == 0:
        raise ImageError("empty file")
    if st.st_size > limit:
        raise ImageError(f"too large: {st.st_size} bytes (limit {limit}, from the pixel limit)")


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((name for test, name in kinds if test(mode)), "not a file")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_jpeg(data) -> bool:
    return bytes(data[:2]) == b"\xff\xd8"


def _jpeg_ends(data: bytes | bytearray) -> bool:
    """Whether an end-of-image marker follows the first scan's data.

    The marker segments are walked to the first start of scan (an EXIF thumbnail's own EOI
    lies inside one of them); the entropy-coded data after it cannot hold FF D9 (byte
    stuffing), so the first FF D9 there ends the image, and whatever follows is extra.
    """
    at, end = 2, len(data)
    while at + 4 <= end:
        if data[at] != 0xFF:  # stray bytes between segments: skipped, as libjpeg does
            at = data.find(b"\xff", at)
            if at < 0:
                return False
            continue
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            at += 2
        elif marker == 0xD9:  # the end before any image data
            return False
        else:
            length = data[at + 2] << 8 | data[at + 3]
            if marker == 0xDA:  # start of scan
                return data.find(b"\xff\xd9", at + 2 + length) >= 0
            at += 2 + length
    return False


def _png_ends(data: bytes | bytearray) -> bool:
    """Whether the chunks (4-byte length, type, data, CRC) reach IEND inside the file."""
    at, end = len(PNG_SIGNATURE), len(data)
    while at + 12 <= end:
        if data[at + 4 : at + 8] == b"IEND":
            return True
        at += 12 + int.from_bytes(data[at : at + 4], "big")
    return False


# EXIF orientation -> (transpose, flip rows, flip columns) that show the stored pixels as a
# viewer does (PIL's ImageOps.exif_transpose), in this order
ORIENTATIONS = {
    1: (False, False, False),
    2: (False, False, True),
    3: (False, True, True),
    4: (False, True, False),
    5: (True, False, False),
    6: (True, False, True),
    7: (True, True, True),
    8: (True, True, False),
}


def _header(file) -> tuple[int, int, int, str]:
    """Width and height as shown, EXIF orientation and pixel mode, from the header of an open
    file (PIL reads the header, not the pixels)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            kind, mode = image.format, image.mode
            width, height = image.size
            if kind == "TIFF":  # PIL gives a TIFF's size as shown: take the stored one
                width, height = image.tag_v2.get(256, width), image.tag_v2.get(257, height)
            # a PNG's EXIF after the pixels would make PIL decode them all to find it
            exif = kind in ("JPEG", "MPO", "TIFF", "WEBP") or "exif" in image.info
            orientation = image.getexif().get(0x0112, 1) if exif else 1
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as error:
        raise ImageError(f"too large ({error})") from None
    except Exception as error:  # PIL raises many kinds on broken headers
        if "truncated" in str(error).lower():
            raise ImageError(f"truncated file ({error})") from None
        raise ImageError(f"broken image header ({type(error).__name__}: {error})") from None
    if width < 1 or height < 1:
        raise ImageError(f"invalid size {width}x{height}")
    if orientation not in ORIENTATIONS:
        orientation = 1  # a broken tag: OpenCV shows the image as stored too
    if orientation >= 5:  # transposed by the orientation
        width, height = height, width
    return width, height, orientation, mode


def orientation_of(data: np.ndarray) -> int:
    """The header's orientation, or 1 where PIL cannot read it (OpenCV then says why)."""
    import io

    try:
        return _header(io.BytesIO(data))[2]
    except ImageError:
        return 1
