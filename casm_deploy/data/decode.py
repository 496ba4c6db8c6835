"""Decoding image files into pixels: infer's (S, S, 3) RGB input, or the loaders' whole image.

infer: scan -> read_image (parallel threads; OpenCV releases the GIL) -> batch -> backend.
With a GPU, the JPEGs of a batch can instead be decoded there (`TorchvisionJpegs`: nvJPEG
through torchvision; or DALI, `casm_deploy.data.dali.JpegDecoder`), and stay there for the model.
The training loaders decode with `decode_image`. Every file is read and checked first by
`imagefiles.read_file`, and decoded by OpenCV in `_decode_stored`, alike for all of them.

libpng and libjpeg print their warnings ("libpng warning: iCCP: known incorrect sRGB
profile", "Corrupt JPEG data: ...") to stderr themselves, beneath Python and OpenCV's log
level: `quiet_decoders` keeps them off the console while infer runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from casm_deploy.data.imagefiles import (
    MAX_PIXELS,
    ORIENTATIONS,
    Encoded,
    ImageError,
    UnreadableFile,
    is_jpeg,
    orientation_of,
    read_file,
)
from casm_deploy.errors import UserError

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


def decode_image(path: str | Path) -> np.ndarray:
    """Decode a whole image file into RGB uint8 (H, W, 3) at its full size, as shown (the EXIF
    orientation applied): the loaders' decoder (`torch_loader.ImageDataset`; `dali.DALILoader`
    names a file DALI cannot decode with it). Read and checked as infer's files are
    (`read_file`, at most `MAX_PIXELS` pixels), and decoded alike.

    Raises:
        UserError: the file cannot be read or decoded (the message names it).
    """
    import cv2

    try:
        f = read_file(path)
        flag = cv2.IMREAD_COLOR
        image, orientation = _decode_stored(f.data, f.width, f.height, f.orientation, flag)
    except UnreadableFile as error:  # e.g. a file removed or unreadable since it was listed
        raise UserError(f"{path}: cannot read image ({error.reason})") from None
    except OSError as error:  # a read that fails half way
        raise UserError(f"{path}: cannot read image ({error.strerror or error})") from None
    except ImageError:  # the reason is infer's; the loaders' message has always been this
        raise UserError(f"{path}: cannot decode image") from None
    return cv2.cvtColor(orient_array(image, orientation), cv2.COLOR_BGR2RGB)


def decode(
    data: np.ndarray, width: int, height: int, size: int, orientation: int | None = None
) -> np.ndarray:
    """Encoded bytes (checked by `read_file`) -> (size, size, 3) uint8 RGB, with OpenCV.

    `width` and `height` are as shown; `orientation` is the header's (None: read it again).
    """
    import cv2

    if orientation is None:
        orientation = orientation_of(data)
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
    records its stream on them (`device_io.DeviceIO`).
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
