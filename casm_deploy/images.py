"""Image files as `infer` meets them: a streamed recursive scan, and a decoder that turns any
file into the model's (S, S, 3) RGB input or a one-line reason why it cannot.

infer: scan -> read_image (parallel threads; OpenCV releases the GIL) -> batch -> backend.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MAX_PIXELS = 1 << 30  # OpenCV's own decoding limit (CV_IO_MAX_IMAGE_PIXELS)


class ImageError(Exception):
    """A file that is not a usable image; the message is the reason, without the path."""


@dataclass(frozen=True)
class Entry:
    """One input file: its path relative to the scanned folder (POSIX separators) and on disk."""

    rel: str
    path: Path


def is_image_name(name: str) -> bool:
    return name.lower().endswith(EXTENSIONS)


def scan(root: str | Path, exclude: Path | None = None) -> Iterator[Entry]:
    """Every file under `root` with an image extension (any case), depth first, sorted by name.

    Streamed: one directory listing is in memory at a time, never the whole tree. Symbolic
    links to files are yielded (dangling ones too: reading them reports the error); links to
    directories are not followed, so a tree cannot loop or reach outside `root`. `exclude` (an
    output folder inside `root`) is skipped.
    """
    root = Path(root)
    exclude = exclude.resolve() if exclude is not None else None

    def walk(folder: Path, prefix: str) -> Iterator[Entry]:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            return  # an unreadable subfolder holds no files we could name
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                sub = Path(entry.path)
                if exclude is None or sub.resolve() != exclude:
                    yield from walk(sub, f"{prefix}{entry.name}/")
            elif is_image_name(entry.name) and (entry.is_file() or entry.is_symlink()):
                yield Entry(prefix + entry.name, Path(entry.path))

    yield from walk(root, "")


def read_image(path: str | Path, size: int) -> tuple[np.ndarray, int, int]:
    """Decode `path` and resize the whole image to `size` x `size` (no crop: the mask must cover
    every pixel of the original).

    Grayscale, 16-bit, alpha (dropped) and CMYK files come out as 8-bit RGB; the EXIF
    orientation is applied, as a viewer shows the image. Large JPEGs are decoded at a reduced
    scale (libjpeg's DCT scaling), which keeps memory and time small.

    Returns:
        The (size, size, 3) uint8 RGB image, and the original width and height.

    Raises:
        ImageError: the file is missing, empty, truncated, not an image, or too large.
    """
    data, width, height = read_encoded(path)
    return decode(data, width, height, size), width, height


def read_encoded(path: str | Path) -> tuple[np.ndarray, int, int]:
    """The bytes of an image file and its width and height as shown, after the header checks.

    Raises:
        ImageError: as `read_image`, for everything but undecodable image data.
    """
    try:
        data = np.fromfile(path, dtype=np.uint8)  # with imdecode: any file name works
    except FileNotFoundError:
        kind = "dangling symbolic link" if os.path.islink(path) else "file not found"
        raise ImageError(kind) from None
    except IsADirectoryError:
        raise ImageError("a directory, not a file") from None
    except OSError as error:
        raise ImageError(f"cannot read: {error.strerror or error}") from None
    if data.size == 0:
        raise ImageError("empty file")
    width, height = _header_size(data)
    if width * height > MAX_PIXELS:
        raise ImageError(f"too large: {width}x{height} pixels (limit {MAX_PIXELS})")
    return data, width, height


def is_jpeg(data: np.ndarray) -> bool:
    return data[:2].tobytes() == b"\xff\xd8"


def decode(data: np.ndarray, width: int, height: int, size: int) -> np.ndarray:
    """Encoded bytes (checked by `read_encoded`) -> (size, size, 3) uint8 RGB, with OpenCV."""
    import cv2

    image = cv2.imdecode(data, _read_flag(data, width, height, size))
    if image is None:
        raise ImageError("corrupt or unsupported image data")
    return cv2.cvtColor(resize_square(image, size), cv2.COLOR_BGR2RGB)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """The whole image at `size` x `size`: area filter when shrinking, bilinear when growing."""
    import cv2

    interpolation = cv2.INTER_AREA if min(image.shape[:2]) > size else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(image), (size, size), interpolation=interpolation)


def _header_size(data: np.ndarray) -> tuple[int, int]:
    """Width and height from the header (PIL reads only the header), after checks that catch
    what OpenCV would decode silently: a JPEG or PNG cut short."""
    import io

    from PIL import Image, UnidentifiedImageError

    raw = data.tobytes()
    try:
        with Image.open(io.BytesIO(raw)) as image:
            width, height = image.size
            kind = image.format
            orientation = image.getexif().get(0x0112, 1) if kind in ("JPEG", "TIFF", "WEBP") else 1
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
    tail = raw[-4096:].rstrip(b"\0\n\r ")
    if kind == "JPEG" and b"\xff\xd9" not in tail[-64:]:
        raise ImageError("truncated JPEG (no end-of-image marker)")
    if kind == "PNG" and b"IEND" not in tail[-16:]:
        raise ImageError("truncated PNG (no IEND chunk)")
    if orientation in (5, 6, 7, 8):  # transposed by the EXIF orientation OpenCV applies
        width, height = height, width
    return width, height


def _read_flag(data: np.ndarray, width: int, height: int, size: int) -> int:
    """IMREAD_COLOR, or for a large JPEG the strongest reduction that keeps >= 2x `size`."""
    import cv2

    if is_jpeg(data):  # only JPEG decodes at a reduced scale for free
        reduced = (
            (8, cv2.IMREAD_REDUCED_COLOR_8),
            (4, cv2.IMREAD_REDUCED_COLOR_4),
            (2, cv2.IMREAD_REDUCED_COLOR_2),
        )
        for factor, flag in reduced:
            if min(width, height) // factor >= 2 * size:
                return flag
    return cv2.IMREAD_COLOR
