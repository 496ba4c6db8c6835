"""Image files as `infer` meets them: a streamed recursive scan, and a decoder that turns any
file into the model's (S, S, 3) RGB input or a one-line reason why it cannot.

infer: scan -> read_image (parallel threads; OpenCV releases the GIL) -> batch -> backend.
With a GPU, the JPEGs of a batch can instead be decoded there (`TorchvisionJpegs`: nvJPEG
through torchvision; or DALI, `casm_deploy.dali.JpegDecoder`), and stay there for the model.
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
    encoded = read_file(path)
    return encoded.data, encoded.width, encoded.height


def read_file(path: str | Path) -> Encoded:
    """An image file's bytes and header facts, after the checks of `read_encoded`.

    Raises:
        ImageError: as `read_encoded`.
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
    width, height, orientation, mode = _header(data)
    if width * height > MAX_PIXELS:
        raise ImageError(f"too large: {width}x{height} pixels (limit {MAX_PIXELS})")
    return Encoded(data, width, height, orientation, mode)


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


def _header(data: np.ndarray) -> tuple[int, int, int, str]:
    """Width and height as shown, EXIF orientation and pixel mode, from the header (PIL reads
    only the header), after checks that catch what OpenCV would decode silently: a JPEG or PNG
    cut short."""
    import io

    from PIL import Image, UnidentifiedImageError

    raw = data.tobytes()
    try:
        with Image.open(io.BytesIO(raw)) as image:
            width, height = image.size
            kind, mode = image.format, image.mode
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
    if orientation not in range(1, 9):
        orientation = 1  # a broken tag: OpenCV shows the image as stored too
    if orientation in (5, 6, 7, 8):  # transposed by the EXIF orientation OpenCV applies
        width, height = height, width
    return width, height, orientation, mode


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

    OpenCV applies the orientation when it decodes; torchvision does not on the GPU.
    """
    if orientation in (5, 6, 7, 8):
        image = image.transpose(1, 2)
    flips = {2: (2,), 3: (1, 2), 4: (1,), 6: (2,), 7: (1, 2), 8: (1,)}.get(orientation, ())
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
            image = orient(image, f.orientation).unsqueeze(0).float()  # (1, 3, H, W)
            image = F.interpolate(
                image, size=(self.size, self.size), mode="bilinear", antialias=True
            )
            image = image.round_().clamp_(0, 255).to(torch.uint8)
            images.append(image[0].permute(1, 2, 0).contiguous())  # (S, S, 3)
        return images
