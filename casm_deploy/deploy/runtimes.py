"""The runtimes a trained mapping runs in for inference: ONNX Runtime, TorchScript, eager.

export -> masker.onnx / masker.ts (or a training checkpoint) -> open_model -> Backend, which
infer and the `casm_deploy.Masker` API call on batches of decoded uint8 images.

On CUDA a batch goes through `submit` without blocking the calling thread: the images are
copied in from pinned memory on a side stream (`DeviceIO`), the model runs, the masks are
turned to uint8 on the device when asked (4x fewer bytes back) and copied out to pinned
memory; `Pending.result()` waits for that copy. infer submits batch N+1 before it takes batch
N's result, so copies, compute and the host's work overlap.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from casm_deploy.config import PRECISIONS
from casm_deploy.errors import UserError

BACKENDS = ("auto", "onnx", "torchscript", "eager")
DEVICES = ("auto", "cpu", "cuda")
SUFFIXES = {".onnx": "onnx", ".ts": "torchscript", ".pt": "eager", ".pth": "eager"}
TENSORRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
# The TensorRT library onnxruntime-gpu's TensorRT provider links (1.2x-1.31: TensorRT 10). It is
# not a dependency of casm-deploy: without it the provider cannot start and is skipped.
TENSORRT_LIBRARY = "libnvinfer.so.10"
DEFAULT_BATCH = 64  # the Masker API's batch size; infer passes its --batch

# One image of a batch: (S, S, 3) uint8 RGB, a numpy array or a torch tensor (from a GPU decoder).
Image = Any


@dataclass(frozen=True)
class ModelInfo:
    """What inference needs to know about a model file, from its metadata."""

    path: str
    backend: str  # onnx, torchscript or eager
    device: str  # cpu or cuda
    provider: str  # what runs it: an ONNX Runtime provider, or torch.jit / torch on a device
    image_size: int
    num_classes: int
    wnids: tuple[str, ...]
    names: tuple[str, ...]
    precision: str
    sha256: str
    # what it was trained on: "synthetic" (`data synth`'s shapes), "images", or "" (not known)
    training_data: str = ""

    def label(self, index: int) -> tuple[str, str]:
        """The class id (WordNet id when known) and human name of a logit index."""
        wnid = self.wnids[index] if index < len(self.wnids) else str(index)
        name = self.names[index] if index < len(self.names) else wnid
        return wnid, name


class Pending:
    """A batch on its way through the model; `result()` waits for its masks and logits."""

    def __init__(self, finish: Callable[[], tuple[np.ndarray, np.ndarray]]):
        self._finish: Callable[[], tuple[np.ndarray, np.ndarray]] | None = finish
        self._result: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def done(cls, masks: np.ndarray, logits: np.ndarray) -> Pending:
        return cls(lambda: (masks, logits))

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Masks (B, S, S), float32 in [0, 1] or uint8 (0-255) when asked, and logits (B, K)."""
        if self._finish is not None:
            self._result, self._finish = self._finish(), None
        assert self._result is not None
        return self._result


class Backend(Protocol):
    """A model that maps (B, S, S, 3) uint8 RGB images to masks (B, S, S) and logits (B, K).

    The uint8 batch crosses to the device as it is (4x fewer bytes than float32); the scaling
    to [0, 1] happens there, and the normalisation inside the model.
    """

    info: ModelInfo
    notices: list[str]  # what was chosen instead of what `auto` would prefer, and why

    def submit(self, images: Sequence[Image], uint8_masks: bool = False) -> Pending: ...

    def __call__(self, images: Sequence[Image]) -> tuple[np.ndarray, np.ndarray]: ...


def resolve_device(device: str) -> str:
    if device not in DEVICES:
        raise UserError(f"--device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: PyTorch finds no CUDA device here; use --device cpu")
    return device


def backend_of(path: Path, backend: str) -> str:
    """The backend for a model file: `backend`, or (auto) the one its suffix names."""
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    suffix = SUFFIXES.get(path.suffix.lower())
    if suffix is None:
        raise UserError(
            f"{path}: unknown model file type; expected .onnx, .ts (from casm-deploy export) "
            "or a .pt checkpoint (from casm-deploy train)"
        )
    if backend != "auto" and backend != suffix:
        raise UserError(f"{path}: a {suffix} model cannot run with --backend {backend}")
    return suffix


def open_model(
    path: str | Path,
    backend: str = "auto",
    device: str = "auto",
    batch: int = DEFAULT_BATCH,
    expect_sha256: str = "",
) -> Backend:
    """Load a model file for inference, for batches of up to `batch` images (TensorRT builds
    its engine for that range; the pinned buffers are that large).

    An ONNX file is data: ONNX Runtime runs only ONNX operators. A TorchScript file is a
    program: loading and calling it runs the code it holds. Its code is inspected first (see
    `export.check_torchscript_code`), a safeguard, not a sandbox: use ONNX for files you did not
    make. A checkpoint is read with `weights_only=True`.

    Before anything in the file is parsed, its SHA-256 is compared with `expect_sha256` (if
    given) and with the digest an export.json beside it records for it (if any). Then its
    metadata, its inputs and outputs and one zero image through the model are checked.

    Raises:
        UserError: the file is missing, changed or not a casm-deploy model, the backend does not
            match it, the device asked for is not usable, or the model does not run.
    """
    from casm_deploy.common.ui import console
    from casm_deploy.deploy.export import sha256_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    kind = backend_of(path, backend)
    resolved = resolve_device(device)
    sha256 = sha256_file(path)
    check_digest(path, sha256, expect_sha256)
    model: Backend
    if kind == "onnx":
        model = OnnxBackend(path, device, resolved, sha256, batch)
    elif kind == "torchscript":
        model = TorchScriptBackend(path, resolved, sha256, batch)
    else:
        model = EagerBackend(path, resolved, sha256, batch)
    if model.info.training_data == "synthetic":
        from casm_deploy.checkpoint import SYNTHETIC_NOTE

        model.notices.append(SYNTHETIC_NOTE)
    for notice in model.notices:
        console.print(f"[yellow]note:[/yellow] {notice}", soft_wrap=True)  # one line in logs
    probe(model, path)  # after the notices: a TensorRT engine is built here, on the first run
    return model


def check_digest(path: Path, sha256: str, expected: str = "") -> None:
    """Refuse a model file whose SHA-256 is not `expected` (if given) or not the one the
    export.json beside it records for it (written by `casm-deploy export`; if it lists it).

    Raises:
        UserError: `expected` is not a SHA-256, or a digest differs.
    """
    if expected:
        if not re.fullmatch(r"[0-9a-fA-F]{64}", expected.strip()):
            raise UserError(f"--expect-sha256 {expected!r}: not a SHA-256 (64 hex digits)")
        expected = expected.strip().lower()
        if expected != sha256:
            raise UserError(
                f"{path}: refused: its SHA-256 is {sha256}, not the expected {expected}"
            )
    try:
        report = json.loads((path.parent / "export.json").read_text())
        recorded = [f.get("sha256") for f in report["files"].values() if f["file"] == path.name]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # no export.json here, or not one that lists files
    if recorded and recorded[0] != sha256:
        raise UserError(
            f"{path}: refused: its SHA-256 is {sha256}, but the export.json beside it records "
            f"{recorded[0]}: the file was changed after export"
        )


def probe(model: Backend, path: Path) -> None:
    """One zero image through the model, so that a wrong model fails here in one line rather
    than after the first batch of images is decoded.

    Raises:
        UserError: the model fails, or its outputs are not masks (1, 1, S, S) and logits (1, K).
    """
    size, classes = model.info.image_size, model.info.num_classes
    want = f"masks (1, 1, {size}, {size}) and logits (1, {classes})"
    try:
        if isinstance(model, _TorchBackend):  # the module's own outputs, before `submit`
            with torch.inference_mode():
                outputs = model.module(torch.zeros(1, 3, size, size, device=model.device))
            shapes = [tuple(t.shape) for t in outputs] if isinstance(outputs, tuple) else []
            if shapes != [(1, 1, size, size), (1, classes)]:
                raise UserError(f"{path}: on one image it returns {shapes or outputs}, not {want}")
        masks, logits = model(np.zeros((1, size, size, 3), np.uint8))
    except UserError:
        raise
    except Exception as error:  # whatever the runtime raises for a graph that does not fit
        raise UserError(
            f"{path}: the model fails on one {size}x{size} image ({first_line(error)})"
        ) from None
    if masks.shape != (1, size, size) or logits.shape != (1, classes):
        raise UserError(
            f"{path}: on one image it returns masks {masks.shape} and logits {logits.shape}, "
            f"not {want}"
        )


def _info(path: Path, meta: dict[str, Any], **fields: Any) -> ModelInfo:
    """ModelInfo from an export's metadata (strings; lists are JSON), checked key by key.

    Raises:
        UserError: a key is missing or not of its kind (the message names it).
    """
    size = positive_field(path, meta, "image_size")
    classes = positive_field(path, meta, "num_classes")
    precision = meta.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise UserError(
            f"{path}: metadata precision {precision!r} is not one of {', '.join(PRECISIONS)}"
        )
    wnids = label_field(path, meta, "wnids", classes)
    names = label_field(path, meta, "names", classes)
    return ModelInfo(
        path=str(path),
        image_size=size,
        num_classes=classes,
        wnids=wnids,
        names=names,
        precision=precision,
        training_data=export_training_data(meta, wnids, names),
        **fields,
    )


def export_training_data(meta: dict[str, Any], wnids: Sequence[str], names: Sequence[str]) -> str:
    """The kind of data an export was trained on, from its `training_data` metadata
    ("synthetic", "images"); for exports made before it was recorded, "synthetic" when the
    classes are `data synth`'s, else "" (not known)."""
    from casm_deploy.checkpoint import SYNTHETIC, synthetic_labels

    recorded = meta.get("training_data")
    if recorded in (SYNTHETIC, "images"):
        return recorded
    return SYNTHETIC if synthetic_labels(list(wnids), list(names)) else ""


def positive_field(path: Path, meta: dict[str, Any], key: str) -> int:
    """A positive integer of the metadata (a string in ONNX metadata, or a JSON number)."""
    if key not in meta:
        raise UserError(f"{path}: its metadata has no {key!r} (not a complete casm-deploy export)")
    value = meta[key]
    if isinstance(value, bool) or not re.fullmatch(r"[0-9]+", str(value)) or int(value) < 1:
        raise UserError(f"{path}: metadata {key} {value!r} is not a positive integer")
    return int(value)


def label_field(path: Path, meta: dict[str, Any], key: str, classes: int) -> tuple[str, ...]:
    """The class ids or names of the metadata: a JSON list of strings, one per class (or none)."""
    value = meta.get(key, "[]")
    try:
        labels = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        labels = None
    if not isinstance(labels, list) or not all(isinstance(v, str) for v in labels):
        raise UserError(f"{path}: metadata {key} is not a JSON list of strings")
    if len(labels) not in (0, classes):
        raise UserError(f"{path}: metadata {key} lists {len(labels)} classes, not {classes}")
    return tuple(labels)


# --- host <-> device --------------------------------------------------------------------------


def masks_to_uint8(masks: torch.Tensor) -> torch.Tensor:
    """Float masks in [0, 1] -> uint8 levels, rounded as the PNG writer rounds on the host
    (`np.rint(mask * 255)`: a float32 product, then half to even)."""
    return masks.float().mul(255).round_().clamp_(0, 255).to(torch.uint8)


def stack_host(images: Sequence[Image]) -> np.ndarray:
    """A host batch (B, S, S, 3) from images given as arrays or tensors."""
    if isinstance(images, np.ndarray):
        return images
    return np.stack([np.asarray(i.cpu() if isinstance(i, torch.Tensor) else i) for i in images])


class Staging:
    """Host buffers for uint8 batches, used in turn: while the device copies batch N from one,
    batch N+1 is stacked into the other. A buffer is refilled only after the copy that last
    read it has finished (its event). Pinned where there is CUDA: only pinned memory is copied
    to the device without blocking the host."""

    def __init__(self, shape: tuple[int, ...], pin: bool, slots: int = 2):
        self.shape, self.pin = shape, pin
        self.buffers = [self._buffer(shape[0]) for _ in range(slots)]
        self.copies: list[Any] = [None] * slots  # the event of the copy that last read each
        self.turn = 0

    def _buffer(self, batch: int) -> torch.Tensor:
        return torch.empty((batch, *self.shape[1:]), dtype=torch.uint8, pin_memory=self.pin)

    def fill(self, images: Sequence[Image]) -> tuple[torch.Tensor, int]:
        """The next buffer, holding `images` in its first rows, and its slot number."""
        slot, self.turn = self.turn, (self.turn + 1) % len(self.buffers)
        if self.copies[slot] is not None:
            self.copies[slot].synchronize()
            self.copies[slot] = None
        if len(images) > len(self.buffers[slot]):  # a larger batch than planned (the API)
            self.buffers[slot] = self._buffer(len(images))
        host = self.buffers[slot][: len(images)]
        np.stack([np.asarray(i) for i in images], out=host.numpy())
        return host, slot

    def copied(self, slot: int, event: Any) -> None:
        """`event` marks the end of the copy that reads the buffer of `slot`."""
        self.copies[slot] = event


class DeviceIO:
    """Batches into and out of a CUDA device without blocking the calling thread."""

    def __init__(self, device: torch.device, batch: int, size: int):
        self.device = device
        self.staging = Staging((batch, size, size, 3), pin=True)
        self.copy_stream = torch.cuda.Stream(device)

    def to_device(self, images: Sequence[Image]) -> torch.Tensor:
        """The (B, S, S, 3) uint8 batch on the device, ready for the current stream's kernels.

        Host images are stacked into a pinned buffer and copied on the side stream; the
        current stream waits for that copy (an event), the host does not. Images decoded on the
        device are stacked there.
        """
        compute = torch.cuda.current_stream(self.device)
        if any(isinstance(i, torch.Tensor) and i.is_cuda for i in images):
            tensors = []
            for image in images:
                tensor = torch.as_tensor(image)
                if tensor.is_cuda:  # made on a decoder's stream: keep it until compute ran
                    tensor.record_stream(compute)
                tensors.append(tensor.to(self.device))
            return torch.stack(tensors)
        host, slot = self.staging.fill(images)
        with torch.cuda.stream(self.copy_stream):
            batch = host.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.copy_stream)
        self.staging.copied(slot, copied)
        compute.wait_event(copied)
        batch.record_stream(compute)  # allocated on the side stream, used on this one
        return batch

    def to_host(self, masks: torch.Tensor, logits: torch.Tensor, uint8_masks: bool) -> Pending:
        """(B, S, S) masks and (B, K) logits on the device -> a Pending of numpy arrays, copied
        into pinned memory on the current stream (torch caches pinned blocks between batches)."""
        masks = masks_to_uint8(masks) if uint8_masks else masks.float()
        host_masks = torch.empty(masks.shape, dtype=masks.dtype, pin_memory=True)
        host_logits = torch.empty(logits.shape, dtype=torch.float32, pin_memory=True)
        host_masks.copy_(masks, non_blocking=True)
        host_logits.copy_(logits.float(), non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def finish() -> tuple[np.ndarray, np.ndarray]:
            done.synchronize()
            return host_masks.numpy(), host_logits.numpy()

        return Pending(finish)


# --- ONNX Runtime -----------------------------------------------------------------------------


def trt_cache_dir(sha256: str) -> Path:
    """Where TensorRT engines of a model are kept: the user's cache, one folder per model."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "casm-deploy" / "trt" / sha256


def onnx_providers(
    available: Sequence[str],
    device: str,
    precision: str,
    batch: int,
    size: int,
    sha256: str,
    device_id: int = 0,
) -> list[tuple[str, dict[str, Any]]]:
    """ONNX Runtime's providers for a model, fastest first, CPU last: the session takes the
    first that starts, and nodes one cannot run go to the next.

    TensorRT builds one engine for batches 1 to `batch` (a partial last batch does not rebuild
    it), in the model's own precision (fp16 / bf16 enabled for such a model), cached per model
    in the user's cache folder. An int8 model is not given to TensorRT: its QDQ graph (uint8
    activations) is made for ONNX Runtime's CPU provider.
    """
    providers: list[tuple[str, dict[str, Any]]] = []
    if device == "cuda":
        if TENSORRT in available and precision != "int8":

            def shape(n: int) -> str:
                return f"images:{n}x3x{size}x{size}"

            cache = str(trt_cache_dir(sha256))
            options = {
                "device_id": device_id,
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": cache,
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": cache,
                "trt_profile_min_shapes": shape(1),
                "trt_profile_opt_shapes": shape(batch),
                "trt_profile_max_shapes": shape(batch),
                "trt_fp16_enable": precision == "fp16",
                "trt_bf16_enable": precision == "bf16",
            }
            providers.append((TENSORRT, options))
        if CUDA in available:
            providers.append((CUDA, {"device_id": device_id}))
    return [*providers, (CPU, {})]


def tensorrt_loadable() -> bool:
    """Whether the TensorRT libraries the provider needs load here (it fails loudly if not)."""
    if not sys.platform.startswith("linux"):
        return True  # other builds: let the session try
    try:
        ctypes.CDLL(TENSORRT_LIBRARY)
    except OSError:
        return False
    return True


def preload_cuda(ort: Any) -> None:
    """Load the CUDA and cuDNN libraries this onnxruntime-gpu was built for from the nvidia
    wheels, before a CUDA session starts. Usually torch has loaded them already (the same CUDA
    major here); this helps where it has not. Best effort: a session start reports the rest."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        with contextlib.suppress(Exception):  # what is missing shows when the provider starts
            preload()


def check_onnx_io(session: Any, path: Path, size: int, classes: int) -> None:
    """The graph's inputs and outputs against its metadata: float images (B, 3, S, S) in,
    float masks (B, 1, S, S) and logits (B, K) out, the batch B a dynamic dimension.

    Raises:
        UserError: a tensor is missing or of another type or shape (the message names it).
    """
    expected = {
        "input": (session.get_inputs(), {"images": (3, size, size)}),
        "output": (session.get_outputs(), {"masks": (1, size, size), "logits": (classes,)}),
    }
    for kind, (args, shapes) in expected.items():
        found = {arg.name: arg for arg in args}
        for name, dims in shapes.items():
            arg = found.get(name)
            if arg is None:
                have = ", ".join(found) or "none"
                raise UserError(f"{path}: the graph has no {kind} {name!r} (it has {have})")
            shape = list(arg.shape)  # ints, or names / None for dynamic dimensions
            batch_dynamic = bool(shape) and not isinstance(shape[0], int)
            if arg.type != "tensor(float)" or not batch_dynamic or tuple(shape[1:]) != dims:
                want = ", ".join(map(str, ("B", *dims)))
                raise UserError(
                    f"{path}: its {kind} {name!r} is {arg.type} {shape}, but its metadata "
                    f"(image_size {size}, num_classes {classes}) needs float32 ({want}), "
                    "B dynamic"
                )


def short(provider: str) -> str:
    return provider.removesuffix("ExecutionProvider")


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


class OnnxBackend:
    """ONNX Runtime: TensorRT, then CUDA, then CPU, the first that starts. On CUDA the batch
    goes in and the outputs come out through IO binding on torch tensors.

    `--device auto` takes the best provider that starts, with a notice when that is not the
    first one; an explicit `--device cuda` that ends on the CPU is an error.
    """

    def __init__(self, path: Path, requested: str, device: str, sha256: str, batch: int):
        import onnxruntime as ort

        from casm_deploy.deploy.export import read_metadata

        meta = read_metadata(path)
        info = _info(path, meta, backend="onnx", device=device, provider="", sha256=sha256)
        precision, size = info.precision, info.image_size
        available = list(ort.get_available_providers())
        self.notices: list[str] = []
        self.max_batch = batch
        if device == "cuda":
            if not any(p in available for p in (TENSORRT, CUDA)):
                if requested == "cuda":
                    raise UserError(
                        "--device cuda: this ONNX Runtime has no CUDA provider "
                        f"(it has {', '.join(available)}); install onnxruntime-gpu"
                    )
                self.notices.append(
                    f"ONNX Runtime here has no CUDA provider (it has {', '.join(available)}): "
                    f"{path.name} runs on the CPU"
                )
                device = "cpu"
            elif TENSORRT in available and precision == "int8":
                self.notices.append(
                    f"{path.name} is int8, made for ONNX Runtime's CPU provider: "
                    "not handed to TensorRT"
                )
            elif TENSORRT in available and not tensorrt_loadable():
                self.notices.append(
                    f"TensorRT provider skipped: {TENSORRT_LIBRARY} (TensorRT 10) is not "
                    "installed or not on the library path"
                )
                available.remove(TENSORRT)
        index = torch.cuda.current_device() if device == "cuda" else 0
        chain = onnx_providers(available, device, precision, batch, size, sha256, index)
        if chain[0][0] == TENSORRT:
            cache = chain[0][1]["trt_engine_cache_path"]
            try:
                Path(cache).mkdir(parents=True, exist_ok=True)
            except OSError as error:
                self.notices.append(f"no TensorRT engine cache ({cache}: {error.strerror})")
                for key in ("trt_engine_cache_enable", "trt_timing_cache_enable"):
                    chain[0][1][key] = False
        if device == "cuda":
            preload_cuda(ort)
        self.session, used = self._start(ort, path, chain)
        check_onnx_io(self.session, path, size, info.num_classes)
        if used == TENSORRT:
            self.notices.append(
                f"TensorRT builds its engine for batches 1-{batch} on the first run of this "
                f"model (minutes), then reuses it from {chain[0][1]['trt_engine_cache_path']}"
            )
        if device == "cuda" and used == CPU:
            if requested == "cuda":
                raise UserError(
                    f"--device cuda: ONNX Runtime fell back to the CPU for {path} (the CUDA "
                    "provider did not start: check the NVIDIA driver, CUDA and cuDNN); use "
                    "--device cpu"
                )
            self.notices.append(
                "ONNX Runtime's CUDA provider did not start (its message above says why): "
                f"{path.name} runs on the CPU"
            )
            device = "cpu"
        self.device = torch.device(device, index) if device == "cuda" else torch.device("cpu")
        self.io = DeviceIO(self.device, batch, size) if device == "cuda" else None
        self.info = dataclasses.replace(info, device=device, provider=used)

    def _start(self, ort: Any, path: Path, chain: list[tuple[str, dict[str, Any]]]):
        """The session of the first provider in `chain` that starts, and that provider."""
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: fallbacks are reported as notices
        # Idle ORT threads sleep instead of spinning: infer's decoding and writing threads
        # share the cores with the model, and spinning threads would take their time.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        while True:
            try:
                # no fallback of ORT's own: it would retry without our provider options
                session = ort.InferenceSession(
                    str(path), options, providers=chain, enable_fallback=0
                )
                break
            except Exception as error:  # ORT raises its own types (Fail, RuntimeError, ...)
                if len(chain) == 1:
                    raise UserError(f"{path}: ONNX Runtime cannot load it ({error})") from None
                self.notices.append(f"{short(chain[0][0])} did not start: {first_line(error)}")
                chain = chain[1:]
        used = session.get_providers()[0]
        if used not in (chain[0][0], CPU):  # skipped without an error (ORT logged why)
            self.notices.append(f"{short(chain[0][0])} did not start: running on {short(used)}")
        return session, used

    def __call__(self, images: Sequence[Image]) -> tuple[np.ndarray, np.ndarray]:
        return self.submit(images).result()

    def submit(self, images: Sequence[Image], uint8_masks: bool = False) -> Pending:
        if self.io is None:
            inputs = stack_host(images).transpose(0, 3, 1, 2)
            inputs = np.ascontiguousarray(inputs, dtype=np.float32)
            inputs /= 255
            masks, logits = self.session.run(["masks", "logits"], {"images": inputs})
            masks = masks[:, 0]
            if uint8_masks:
                masks = masks_to_uint8(torch.from_numpy(masks)).numpy()
            return Pending.done(masks, logits)
        if self.info.provider == TENSORRT and len(images) > self.max_batch:
            # beyond the engine's batch range: run in parts rather than rebuild it
            parts = [
                self.submit(images[i : i + self.max_batch], uint8_masks).result()
                for i in range(0, len(images), self.max_batch)
            ]
            masks = np.concatenate([m for m, _ in parts])
            return Pending.done(masks, np.concatenate([lg for _, lg in parts]))
        return self._bound(images, uint8_masks)

    def _bound(self, images: Sequence[Image], uint8_masks: bool) -> Pending:
        """The batch copied in and converted now; run with IO binding in `result()`, so the
        next batch's copy can go in while this one runs."""
        batch, size = len(images), self.info.image_size
        staged = self.io.to_device(images)
        inputs = staged.permute(0, 3, 1, 2).float().div_(255).contiguous()  # (B,3,S,S)
        masks = torch.empty((batch, 1, size, size), device=self.device)
        logits = torch.empty((batch, self.info.num_classes), device=self.device)
        # ORT runs on its own stream: it may start once torch's stream has written `inputs`
        # (and has finished with whatever memory the outputs reuse)
        ready = torch.cuda.Event()
        ready.record()

        def finish() -> tuple[np.ndarray, np.ndarray]:
            binding = self.session.io_binding()
            for name, tensor, bind in (
                ("images", inputs, binding.bind_input),
                ("masks", masks, binding.bind_output),
                ("logits", logits, binding.bind_output),
            ):
                bind(
                    name,
                    "cuda",
                    self.device.index or 0,
                    np.float32,
                    tuple(tensor.shape),
                    tensor.data_ptr(),
                )
            ready.synchronize()
            self.session.run_with_iobinding(binding)  # returns when ORT's stream is done
            return self.io.to_host(masks[:, 0], logits, uint8_masks).result()

        return Pending(finish)


# --- TorchScript and eager --------------------------------------------------------------------


class _TorchBackend:
    """A torch module taking (B, 3, S, S) float in [0, 1], returning (masks, logits)."""

    module: Any
    device: torch.device
    info: ModelInfo
    io: DeviceIO | None

    def _setup(self, device: str, batch: int, size: int) -> None:
        self.device = torch.device(device)
        self.io = DeviceIO(self.device, batch, size) if self.device.type == "cuda" else None
        self.notices: list[str] = []

    def __call__(self, images: Sequence[Image]) -> tuple[np.ndarray, np.ndarray]:
        return self.submit(images).result()

    @torch.inference_mode()
    def submit(self, images: Sequence[Image], uint8_masks: bool = False) -> Pending:
        if self.io is None:
            inputs = torch.from_numpy(stack_host(images))
            inputs = inputs.permute(0, 3, 1, 2).float().div_(255)  # channels-last NCHW view
            masks, logits = self.module(inputs)
            masks = masks[:, 0]
            masks = masks_to_uint8(masks) if uint8_masks else masks.float()
            return Pending.done(masks.numpy(), logits.float().numpy())
        inputs = self.io.to_device(images).permute(0, 3, 1, 2).float().div_(255)
        masks, logits = self.module(inputs)  # queued: the host goes on
        return self.io.to_host(masks[:, 0], logits, uint8_masks)


class TorchScriptBackend(_TorchBackend):
    def __init__(self, path: Path, device: str, sha256: str, batch: int = DEFAULT_BATCH):
        from casm_deploy.deploy.export import load_torchscript, read_metadata

        meta = read_metadata(path)
        self.info = _info(
            path,
            meta,
            backend="torchscript",
            device=device,
            provider=f"torch.jit {device}",
            sha256=sha256,
        )
        self._setup(device, batch, self.info.image_size)
        try:
            self.module = load_torchscript(path, self.device)
        except UserError:
            raise
        except Exception as error:
            raise UserError(f"{path}: TorchScript cannot load it ({first_line(error)})") from None


# What infer and `Masker.load` take, ending the message for a file of another kind.
WANTED = (
    "infer and Masker.load take an export (masker.onnx, masker.ts) or a casm-deploy training "
    "checkpoint, runs/<name>/checkpoint.pt"
)
EXPORT_SUFFIXES = {"TorchScript": ".ts", "ONNX": ".onnx"}


class EagerBackend(_TorchBackend):
    """A training checkpoint, run by PyTorch. One whose mask decoder was never trained (a
    classifier) is refused: its masks would be noise."""

    def __init__(self, path: Path, device: str, sha256: str, batch: int = DEFAULT_BATCH):
        from casm_deploy.checkpoint import (
            check_decoder_trained,
            identify,
            load_checkpoint,
            masker_from_checkpoint,
            training_data_kind,
        )

        kind = identify(path)
        if kind in EXPORT_SUFFIXES:  # infer chose the runtime by the suffix, .pt or .pth
            raise UserError(
                f"{path}: this is an exported model ({kind}) under a {path.suffix} name; infer "
                f"picks the runtime by the suffix: name it {EXPORT_SUFFIXES[kind]}"
            )
        checkpoint = load_checkpoint(path, WANTED)
        check_decoder_trained(checkpoint, path)
        masker = masker_from_checkpoint(checkpoint, path)
        spec = checkpoint["model"]
        self._setup(device, batch, int(spec["image_size"]))
        self.module = masker.to(self.device).to(memory_format=torch.channels_last)
        self.info = ModelInfo(
            path=str(path),
            backend="eager",
            device=device,
            provider=f"torch {device}",
            image_size=int(spec["image_size"]),
            num_classes=int(spec["num_classes"]),
            wnids=tuple(spec.get("wnids", ())),
            names=tuple(spec.get("names", ())),
            precision="fp32",
            sha256=sha256,
            training_data=training_data_kind(checkpoint, path),
        )
