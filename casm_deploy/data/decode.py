"""Image files as `infer` meets them: a streamed recursive scan, and a decoder that turns any
file into the model's (S, S, 3) RGB input or a one-line reason why it cannot.

infer: scan -> read_image (parallel threads; OpenCV releases the GIL) -> batch -> backend.
With a GPU, the JPEGs of a batch can instead be decoded there (`TorchvisionJpegs`: nvJPEG
through torchvision; or DALI, `casm_deploy.data.dali.JpegDecoder`), and stay there for the model.

A file is checked before it is decoded, each step bounding what the next may cost: it must
be a regular file (a FIFO would block the reader forever) no larger than `max_file_bytes`;
its header, read first, must declare at most `max_pixels` pixels; then the whole file is
read and must hold a whole JPEG or PNG (bytes after the image's end are allowed).

libpng and libjpeg print their warnings ("libpng warning: iCCP: known incorrect sRGB
profile", "Corrupt JPEG data: ...") to stderr themselves, beneath Python and OpenCV's log
level: `quiet_decoders` keeps them off the console while infer runs.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from casm_deploy.config import InferConfig

# PIL warns of a "decompression bomb" from 89 MP; the cap here (checked right after the
# header) is the one that decides, so its warning would only be noise on the user's console.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
NO_IMAGES = f"no image files (looked for {' '.join(EXTENSIONS)}, any case, in all subfolders)"
# The default pixel cap (`infer --max-megapixels`, written once in InferConfig): 120 MP admits
# the largest camera photos (102 MP medium format, 108 MP phones) and refuses what a few
# kilobytes can declare to exhaust memory (a decoded image is 3 bytes a pixel, its mask 1
# more). PIL refuses more than 178,956,970 pixels whatever the cap says.
MAX_PIXELS = round(InferConfig.max_megapixels * 1e6)
BYTES_PER_PIXEL = 4  # the most an uncompressed 8-bit RGBA file takes ...
FILE_HEADROOM = 64 << 20  # ... plus metadata, thumbnails, a motion photo's video


# The start of the lines libpng and libjpeg write to stderr: about files that decode anyway, or
# that fail and get an error row that says so.
NATIVE_NOISE = (
    "libpng warning: ",
    "libpng error: ",
    "Corrupt JPEG data",
    "Premature end of JPEG file",
    "Invalid SOS parameters for sequential JPEG",
    "Inconsistent progression sequence",
    "Warning: unknown JFIF revision number",
    "Unknown Adobe color transform code",
)
_FILTER = """
import sys
noise = tuple(arg.encode() for arg in sys.argv[1:])
for line in sys.stdin.buffer:
    if not line.startswith(noise):
        sys.stderr.buffer.write(line)
        sys.stderr.buffer.flush()
"""


@contextmanager
def quiet_decoders() -> Iterator[None]:
    """stderr (file descriptor 2, where C code writes) through a filter that drops the
    `NATIVE_NOISE` lines and passes every other line on.

    The filter is a small process of its own, in a session of its own (Ctrl-C does not stop
    it): what this process prints as it crashes still gets through.
    """
    sys.stderr.flush()
    filter_ = None
    try:
        saved = os.dup(2)
    except OSError:  # no stderr: nothing to filter
        saved = None
    if saved is not None:
        command = [sys.executable, "-I", "-S", "-c", _FILTER, *NATIVE_NOISE]
        try:
            filter_ = subprocess.Popen(
                command, stdin=subprocess.PIPE, stderr=saved, start_new_session=True
            )
        except OSError:  # no interpreter to run it: stderr as it is
            os.close(saved)
    if filter_ is None:
        yield
        return
    os.dup2(filter_.stdin.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last write end closes with filter_.stdin: it ends
        os.close(saved)
        filter_.stdin.close()
        # a child process of this one may still hold the pipe: then the filter is let be
        with suppress(subprocess.TimeoutExpired):
            filter_.wait(timeout=5)


class ImageError(Exception):
    """A file that is not a usable image; the message is the reason, without the path."""


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


def read_image(
    path: str | Path, size: int, *, max_pixels: int = MAX_PIXELS
) -> tuple[np.ndarray, int, int]:
    """Decode `path` and resize the whole image to `size` x `size` (no crop: the mask must cover
    every pixel of the original).

    Grayscale, 16-bit, alpha (dropped) and CMYK files come out as 8-bit RGB; the EXIF
    orientation is applied, as a viewer shows the image. Large JPEGs are decoded at a reduced
    scale (libjpeg's DCT scaling), which keeps memory and time small.

    Returns:
        The (size, size, 3) uint8 RGB image, and the original width and height as shown.

    Raises:
        ImageError: the file is missing, not a regular file, empty, truncated, not an image,
            or too large (more than `max_pixels` pixels, or `max_file_bytes(max_pixels)`).
    """
    f = read_file(path, max_pixels=max_pixels)
    return decode(f.data, f.width, f.height, size, f.orientation), f.width, f.height


def read_encoded(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, int, int]:
    """The bytes of an image file and its width and height as shown, after the header checks.

    Raises:
        ImageError: as `read_image`, for everything but undecodable image data.
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
    if is_jpeg(buffer) and not _jpeg_ends(buffer):
        raise ImageError("truncated JPEG (no end-of-image marker after the image data)")
    if buffer.startswith(PNG_SIGNATURE) and not _png_ends(buffer):
        raise ImageError("truncated PNG (no IEND chunk)")
    return Encoded(np.frombuffer(buffer, np.uint8), width, height, orientation, mode)


def _open_regular(path: str | Path, limit: int) -> int:
    """A descriptor of `path` open for reading, once known to be a regular file of 1 to
    `limit` bytes.

    Opened without blocking, so a FIFO cannot hang the reader; checked again once open, so a
    file swapped in between is still seen for what it is.
    """
    try:
        _check_regular(os.stat(path), limit)  # before opening: a device is never opened
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        kind = "dangling symbolic link" if os.path.islink(path) else "file not found"
        raise ImageError(kind) from None
    except OSError as error:
        raise ImageError(f"cannot read: {_reason(error)}") from None
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


def _jpeg_ends(data: bytearray) -> bool:
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


def _png_ends(data: bytearray) -> bool:
    """Whether the chunks (4-byte length, type, data, CRC) reach IEND inside the file."""
    at, end = len(PNG_SIGNATURE), len(data)
    while at + 12 <= end:
        if data[at + 4 : at + 8] == b"IEND":
            return True
        at += 12 + int.from_bytes(data[at : at + 4], "big")
    return False


def decode(
    data: np.ndarray, width: int, height: int, size: int, orientation: int | None = None
) -> np.ndarray:
    """Encoded bytes (checked by `read_file`) -> (size, size, 3) uint8 RGB, with OpenCV.

    `width` and `height` are as shown; `orientation` is the header's (None: read it again).
    """
    import cv2

    if orientation is None:
        orientation = _orientation_of(data)
    flag = _read_flag(data, width, height, size)
    image, orientation = _decode_stored(data, width, height, orientation, flag)
    # resized in the stored frame, oriented after: the same pixels, a small copy to turn
    image = orient_array(resize_square(image, size), orientation)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_overlay(path: str | Path, side: int, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The image as shown, BGR uint8 (as OpenCV gives it), its longest side at most `side`:
    (max(1, round(height * s)), max(1, round(width * s)), 3) with s = min(1, side / longest).

    Checked as `read_image`; a large JPEG is decoded at a reduced scale.

    Raises:
        ImageError: as `read_image`.
    """
    import cv2

    f = read_file(path, max_pixels=max_pixels)
    scale = min(1.0, side / max(f.width, f.height))
    width, height = max(1, round(f.width * scale)), max(1, round(f.height * scale))
    flag = cv2.IMREAD_COLOR
    if f.is_jpeg:  # the strongest reduction that keeps the longest side >= `side`
        flag = next((flag for k, flag in _reduced() if max(f.width, f.height) // k >= side), flag)
    image, orientation = _decode_stored(f.data, f.width, f.height, f.orientation, flag)
    stored = (width, height) if orientation < 5 else (height, width)
    if (image.shape[1], image.shape[0]) != stored:
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        image = cv2.resize(image, stored, interpolation=interpolation)
    return orient_array(image, orientation)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """The whole image at `size` x `size`: area filter when shrinking, bilinear when growing."""
    import cv2

    interpolation = cv2.INTER_AREA if min(image.shape[:2]) > size else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(image), (size, size), interpolation=interpolation)


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


def orient_array(image: np.ndarray, orientation: int) -> np.ndarray:
    """A decoded (H, W, ...) array as shown under its EXIF `orientation`."""
    transpose, flip_rows, flip_columns = ORIENTATIONS[orientation]
    if transpose:
        image = image.swapaxes(0, 1)
    if flip_rows:
        image = image[::-1]
    if flip_columns:
        image = image[:, ::-1]
    return np.ascontiguousarray(image)


def _decode_stored(
    data: np.ndarray, width: int, height: int, orientation: int, flag: int
) -> tuple[np.ndarray, int]:
    """The image decoded as stored, and the orientation still to apply to it.

    OpenCV is told to ignore the orientation, so every format is oriented here alike, from
    the header that gave the width and height: the two agree by construction, and the
    decoded size is checked against them. TIFF is the exception: its reader (libtiff)
    orients the image itself whatever the flag, so a TIFF already decoded as shown is left so.
    """
    import cv2

    image = cv2.imdecode(data, flag | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise ImageError("corrupt or unsupported image data")
    factor = next((k for k, reduced in _reduced() if reduced == flag), 1)
    shown = (-(-height // factor), -(-width // factor))  # libjpeg rounds a scaled size up
    stored = shown if orientation < 5 else shown[::-1]
    if _is_tiff(data) and image.shape[:2] == shown:
        return image, 1
    if image.shape[:2] != stored:
        got = f"{image.shape[1]}x{image.shape[0]}"
        raise ImageError(f"decoded size {got} differs from the header's {stored[1]}x{stored[0]}")
    return image, orientation


def _is_tiff(data) -> bool:
    return bytes(data[:4]) in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # also BigTIFF


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


def _orientation_of(data: np.ndarray) -> int:
    """The header's orientation, or 1 where PIL cannot read it (OpenCV then says why)."""
    import io

    try:
        return _header(io.BytesIO(data))[2]
    except ImageError:
        return 1


def _reduced() -> tuple[tuple[int, int], ...]:
    """(factor, flag) of OpenCV's reduced JPEG decoding, strongest first."""
    import cv2

    return (
        (8, cv2.IMREAD_REDUCED_COLOR_8),
        (4, cv2.IMREAD_REDUCED_COLOR_4),
        (2, cv2.IMREAD_REDUCED_COLOR_2),
    )


def _read_flag(data: np.ndarray, width: int, height: int, size: int) -> int:
    """IMREAD_COLOR, or for a large JPEG the strongest reduction that keeps >= 2x `size`."""
    import cv2

    if is_jpeg(data):  # only JPEG decodes at a reduced scale for free
        for factor, flag in _reduced():
            if min(width, height) // factor >= 2 * size:
                return flag
    return cv2.IMREAD_COLOR


# --- JPEGs decoded by torchvision (nvJPEG on a GPU) -------------------------------------------

# The pixel modes torchvision's nvJPEG path decodes as OpenCV does; CMYK and the rest go to
# OpenCV.
TORCHVISION_MODES = ("RGB", "L")


def torchvision_decodes() -> bool:
    """True when this torchvision has its JPEG decoder (deprecated since 0.29, not yet gone)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg  # noqa: F401
        from torchvision.io.image import _assert_has_image_ops

        _assert_has_image_ops()
    except (ImportError, RuntimeError, OSError):
        return False
    return True


def orient(image, orientation: int):
    """A decoded (C, H, W) tensor as shown under its EXIF `orientation` (PIL's exif_transpose).

    torchvision does not apply it (as OpenCV is told not to: `orient_array` does it there).
    """
    transpose, flip_rows, flip_columns = ORIENTATIONS[orientation]
    if transpose:
        image = image.transpose(1, 2)
    flips = (1,) * flip_rows + (2,) * flip_columns
    return image.flip(flips) if flips else image


class TorchvisionJpegs:
    """`infer`'s JPEG decoder without DALI: encoded files -> (S, S, 3) uint8 RGB tensors on
    `device`, the whole image resized (no crop), with torchvision's decode_jpeg: nvJPEG in one
    batched call on a CUDA device, libjpeg-turbo on the CPU (the same code otherwise).

    The resize is bilinear with antialiasing (an area-like filter when shrinking), as DALI's:
    pixels differ from OpenCV's by about a grey level on average. On CUDA the images are made
    on a stream of the decoder's own, finished before they are handed over; the model's side
    records its stream on them (`backends.DeviceIO`).
    """

    def __init__(self, size: int, device: str):
        import warnings

        import torch

        self.size, self.device = size, torch.device(device)
        cuda = self.device.type == "cuda"
        index = self.device.index if self.device.index is not None else 0
        self.name = f"nvJPEG, cuda:{index}" if cuda else "libjpeg-turbo, cpu"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        # torchvision 0.29 warns on every call that its decoders move to TorchCodec
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")

    def accepts(self, encoded: Encoded) -> bool:
        return encoded.is_jpeg and encoded.mode in TORCHVISION_MODES

    def __call__(self, files: list[Encoded]) -> list:
        """Decode a batch; raises if one of the files does not decode (the caller retries)."""
        import torch

        if self.stream is None:
            return self._decode(files)
        with torch.cuda.stream(self.stream):
            images = self._decode(files)
        self.stream.synchronize()  # done before the images leave this thread
        return images

    def _decode(self, files: list[Encoded]) -> list:
        import torch
        import torch.nn.functional as F
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [torch.from_numpy(f.data) for f in files]
        decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        images = []
        for image, f in zip(decoded, files, strict=True):
            image = orient(image, f.orientation)
            if tuple(image.shape[1:]) != (f.height, f.width):
                got = f"{image.shape[2]}x{image.shape[1]}"
                raise ImageError(f"decoded size {got} differs from the header's")
            image = image.unsqueeze(0).float()  # (1, 3, H, W)
            image = F.interpolate(
                image, size=(self.size, self.size), mode="bilinear", antialias=True
            )
            image = image.round_().clamp_(0, 255).to(torch.uint8)
            images.append(image[0].permute(1, 2, 0).contiguous())  # (S, S, 3)
        return images
