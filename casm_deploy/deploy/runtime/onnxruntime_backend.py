"""ONNX Runtime as the runtime of an ONNX export: TensorRT, then CUDA, then the CPU.

open.open_model -> OnnxBackend: the providers chosen (onnx_providers), the first that starts,
the graph's inputs and outputs checked against its metadata -> `submit`, on CUDA with IO binding
on torch tensors (device_io) -> masks and logits (a masks-only model: masks alone) for infer and
the Masker API. open.open_exact -> `OnnxBackend.exact` (the CPU, or CUDA without TF32) ->
`predict` on float images: export's parity check.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from casm_deploy.artifact import INPUT, OUTPUTS, first_line, output_names, read_metadata
from casm_deploy.common.files import make_folders
from casm_deploy.deploy.runtime.device_io import (
    DeviceIO,
    Image,
    Outputs,
    Pending,
    masks_to_uint8,
    stack_host,
)
from casm_deploy.deploy.runtime.info import info_from_metadata
from casm_deploy.errors import UserError

TENSORRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
# The TensorRT library onnxruntime-gpu's TensorRT provider links (1.2x-1.31: TensorRT 10). It is
# not a dependency of casm-deploy: without it the provider cannot start and is skipped.
TENSORRT_LIBRARY = "libnvinfer.so.10"
MASKS, LOGITS = OUTPUTS


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
                return f"{INPUT}:{n}x3x{size}x{size}"

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


def check_onnx_io(
    session: Any, path: Path, size: int, classes: int, masks_only: bool = False
) -> None:
    """The graph's inputs and outputs against its metadata: float images (B, 3, S, S) in,
    float masks (B, 1, S, S) and logits (B, K) out (masks alone for a masks-only model), the
    batch B a dynamic dimension.

    Raises:
        UserError: a tensor is missing or of another type or shape (the message names it).
    """
    dims = {MASKS: (1, size, size), LOGITS: (classes,)}
    outputs = {name: dims[name] for name in output_names(masks_only)}
    expected = {
        "input": (session.get_inputs(), {INPUT: (3, size, size)}),
        "output": (session.get_outputs(), outputs),
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


def session_options(ort: Any) -> Any:
    """ONNX Runtime's session options for every session opened here."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: fallbacks are reported as notices
    # Idle ORT threads sleep instead of spinning: infer's decoding and writing threads
    # share the cores with the model, and spinning threads would take their time.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxBackend:
    """ONNX Runtime: TensorRT, then CUDA, then CPU, the first that starts. On CUDA the batch
    goes in and the outputs come out through IO binding on torch tensors.

    `--device auto` takes the best provider that starts, with a notice when that is not the
    first one; an explicit `--device cuda` that ends on the CPU is an error.
    """

    def __init__(self, path: Path, requested: str, device: str, sha256: str, batch: int):
        import onnxruntime as ort

        meta = read_metadata(path)
        info = info_from_metadata(
            path, meta, backend="onnx", device=device, provider="", sha256=sha256
        )
        precision, size = info.precision, info.image_size
        available = list(ort.get_available_providers())
        self.notices: list[str] = []
        self.max_batch = batch
        if device == "cuda":
            device = self._gpu_providers(path, requested, precision, available)
        index = torch.cuda.current_device() if device == "cuda" else 0
        chain = onnx_providers(available, device, precision, batch, size, sha256, index)
        if chain[0][0] == TENSORRT:
            self._engine_cache(chain[0][1])
        if device == "cuda":
            preload_cuda(ort)
        self.session, used = self._start(ort, path, chain)
        check_onnx_io(self.session, path, size, info.num_classes, info.masks_only)
        self.outputs = list(output_names(info.masks_only))
        if used == TENSORRT:
            self.notices.append(
                f"TensorRT builds its engine for batches 1-{batch} on the first run of this "
                f"model (minutes), then reuses it from {chain[0][1]['trt_engine_cache_path']}"
            )
        if device == "cuda" and used == CPU:
            device = self._fell_back(path, requested)
        self.device = torch.device(device, index) if device == "cuda" else torch.device("cpu")
        self.io = DeviceIO(self.device, batch, size) if device == "cuda" else None
        self.info = dataclasses.replace(info, device=device, provider=used)

    @classmethod
    def exact(cls, path: Path, device: torch.device, sha256: str) -> OnnxBackend:
        """The file on `device` exactly, as export's parity check runs it: ONNX Runtime's CPU
        provider, or on CUDA its CUDA provider with TF32 off (an fp32 graph is checked as true
        float32) and the CPU for what it cannot run; never TensorRT, none of `__init__`'s
        fallbacks or notices. A session that does not start raises ONNX Runtime's own error, as
        it is (parity reports it). `predict` runs it on float images; `submit` on the host.
        """
        import onnxruntime as ort

        meta = read_metadata(path)
        info = info_from_metadata(
            path, meta, backend="onnx", device=device.type, provider="", sha256=sha256
        )
        providers: list[Any] = [CPU]
        if device.type == "cuda":
            providers.insert(0, (CUDA, {"use_tf32": 0}))
        backend = cls.__new__(cls)  # the attributes __init__ sets, for this session
        backend.session = ort.InferenceSession(str(path), session_options(ort), providers=providers)
        check_onnx_io(backend.session, path, info.image_size, info.num_classes, info.masks_only)
        backend.outputs = list(output_names(info.masks_only))
        backend.notices, backend.max_batch = [], 0  # no TensorRT engine, no batch range
        backend.device, backend.io = device, None
        backend.info = dataclasses.replace(info, provider=backend.session.get_providers()[0])
        return backend

    def _gpu_providers(
        self, path: Path, requested: str, precision: str, available: list[str]
    ) -> str:
        """The device left for a model on `cuda`: "cpu" where this ONNX Runtime has no GPU
        provider (an error for an explicit --device cuda). TensorRT is taken out of
        `available` where its libraries are missing; each choice is noted."""
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
            return "cpu"
        if TENSORRT in available and precision == "int8":
            self.notices.append(
                f"{path.name} is int8, made for ONNX Runtime's CPU provider: not handed to TensorRT"
            )
        elif TENSORRT in available and not tensorrt_loadable():
            self.notices.append(
                f"TensorRT provider skipped: {TENSORRT_LIBRARY} (TensorRT 10) is not "
                "installed or not on the library path"
            )
            available.remove(TENSORRT)
        return "cuda"

    def _engine_cache(self, options: dict[str, Any]) -> None:
        """Make TensorRT's engine cache folder; without one, run with the caches off."""
        cache = options["trt_engine_cache_path"]
        try:
            make_folders(Path(cache))
        except OSError as error:
            self.notices.append(f"no TensorRT engine cache ({cache}: {error.strerror})")
            for key in ("trt_engine_cache_enable", "trt_timing_cache_enable"):
                options[key] = False

    def _fell_back(self, path: Path, requested: str) -> str:
        """The CUDA provider did not start: an error for --device cuda, else the CPU, noted."""
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
        return "cpu"

    def _start(self, ort: Any, path: Path, chain: list[tuple[str, dict[str, Any]]]):
        """The session of the first provider in `chain` that starts, and that provider."""
        options = session_options(ort)
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
                self.notices.append(f"{short(chain[0][0])} did not start: {first_line(error, 200)}")
                chain = chain[1:]
        used = session.get_providers()[0]
        if used not in (chain[0][0], CPU):  # skipped without an error (ORT logged why)
            self.notices.append(f"{short(chain[0][0])} did not start: running on {short(used)}")
        return session, used

    def __call__(self, images: Sequence[Image]) -> Outputs:
        return self.submit(images).result()

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Float images (B, 3, S, S) in [0, 1], as they are -> the graph's masks (B, 1, S, S)
        and logits (B, K), None for a masks-only model."""
        masks, *logits = self.session.run(self.outputs, {INPUT: images})
        return masks, logits[0] if logits else None

    def submit(self, images: Sequence[Image], uint8_masks: bool = False) -> Pending:
        if self.io is None:
            inputs = stack_host(images).transpose(0, 3, 1, 2)
            inputs = np.ascontiguousarray(inputs, dtype=np.float32)
            inputs /= 255
            masks, logits = self.predict(inputs)
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
            if self.info.masks_only:
                return Pending.done(masks, None)
            return Pending.done(masks, np.concatenate([lg for _, lg in parts]))
        return self._bound(images, uint8_masks)

    def _bound(self, images: Sequence[Image], uint8_masks: bool) -> Pending:
        """The batch copied in and converted now; run with IO binding in `result()`, so the
        next batch's copy can go in while this one runs."""
        batch, size = len(images), self.info.image_size
        staged = self.io.to_device(images)
        inputs = staged.permute(0, 3, 1, 2).float().div_(255).contiguous()  # (B,3,S,S)
        masks = torch.empty((batch, 1, size, size), device=self.device)
        logits = None  # a masks-only model has none
        bound = [(INPUT, inputs, "input"), (MASKS, masks, "output")]
        if not self.info.masks_only:
            logits = torch.empty((batch, self.info.num_classes), device=self.device)
            bound.append((LOGITS, logits, "output"))
        # ORT runs on its own stream: it may start once torch's stream has written `inputs`
        # (and has finished with whatever memory the outputs reuse)
        ready = torch.cuda.Event()
        ready.record()

        def finish() -> Outputs:
            binding = self.session.io_binding()
            for name, tensor, kind in bound:
                bind = binding.bind_input if kind == "input" else binding.bind_output
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
