"""The runtimes a trained mapping runs in for inference: ONNX Runtime, TorchScript, eager.

export -> masker.onnx / masker.ts (or a training checkpoint) -> open_model -> Backend, which
infer and the `casm_deploy.Masker` API call on batches of decoded uint8 images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from casm_deploy.errors import UserError

BACKENDS = ("auto", "onnx", "torchscript", "eager")
DEVICES = ("auto", "cpu", "cuda")
SUFFIXES = {".onnx": "onnx", ".ts": "torchscript", ".pt": "eager", ".pth": "eager"}
# ONNX Runtime's providers, fastest first; the first one that initialises runs the graph.
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


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

    def label(self, index: int) -> tuple[str, str]:
        """The class id (WordNet id when known) and human name of a logit index."""
        wnid = self.wnids[index] if index < len(self.wnids) else str(index)
        name = self.names[index] if index < len(self.names) else wnid
        return wnid, name


class Backend(Protocol):
    """A model that maps (B, S, S, 3) uint8 RGB images to masks (B, S, S) and logits (B, K).

    The uint8 batch crosses to the device as it is (4x fewer bytes than float32); the scaling
    to [0, 1] happens there, and the normalisation inside the model.
    """

    info: ModelInfo

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


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


def open_model(path: str | Path, backend: str = "auto", device: str = "auto") -> Backend:
    """Load a model file for inference.

    Raises:
        UserError: the file is missing or not a casm-deploy model, the backend does not match
            it, or the device asked for is not usable.
    """
    from casm_deploy.export import sha256_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    kind = backend_of(path, backend)
    device = resolve_device(device)
    sha256 = sha256_file(path)
    if kind == "onnx":
        return OnnxBackend(path, device, sha256)
    if kind == "torchscript":
        return TorchScriptBackend(path, device, sha256)
    return EagerBackend(path, device, sha256)


def _info(path: Path, meta: dict[str, str], **fields: Any) -> ModelInfo:
    """ModelInfo from an export's metadata (strings; lists are JSON)."""
    return ModelInfo(
        path=str(path),
        image_size=int(meta["image_size"]),
        num_classes=int(meta["num_classes"]),
        wnids=tuple(json.loads(meta.get("wnids", "[]"))),
        names=tuple(json.loads(meta.get("names", "[]"))),
        precision=meta.get("precision", "fp32"),
        **fields,
    )


class OnnxBackend:
    """ONNX Runtime: TensorRT, then CUDA, then CPU as available. On CUDA the batch goes in and
    the outputs come out through IO binding on torch tensors, so no extra host copies."""

    def __init__(self, path: Path, device: str, sha256: str):
        import onnxruntime as ort

        from casm_deploy.export import read_metadata

        meta = read_metadata(path)
        available = ort.get_available_providers()
        providers: list[Any] = ["CPUExecutionProvider"]
        if device == "cuda":
            gpu = [p for p in GPU_PROVIDERS if p in available]
            if not gpu:
                raise UserError(
                    "--device cuda: this ONNX Runtime has no CUDA provider "
                    f"(it has {', '.join(available)}); install onnxruntime-gpu"
                )
            cache = str(path.with_suffix(".trt-cache"))
            options = {
                "TensorrtExecutionProvider": {
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": cache,
                }
            }
            providers = [(p, options.get(p, {})) for p in gpu] + providers
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: fallbacks are reported below, not logged
        # Idle ORT threads sleep instead of spinning: infer's decoding and writing threads
        # share the cores with the model, and spinning threads would take their time.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as error:
            raise UserError(f"{path}: ONNX Runtime cannot load it ({error})") from None
        used = self.session.get_providers()[0]
        if device == "cuda" and used == "CPUExecutionProvider":
            raise UserError(
                f"--device cuda: ONNX Runtime fell back to the CPU for {path} (the CUDA "
                "provider did not initialise: check CUDA and cuDNN); use --device cpu"
            )
        self.device = torch.device(device)
        self.info = _info(path, meta, backend="onnx", device=device, provider=used, sha256=sha256)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.device.type == "cpu":
            inputs = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
            inputs /= 255
            masks, logits = self.session.run(["masks", "logits"], {"images": inputs})
            return masks[:, 0], logits
        return self._bound(images)

    def _bound(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One run with the input and outputs bound to CUDA tensors (IO binding)."""
        batch, size = len(images), self.info.image_size
        inputs = torch.from_numpy(images).to(self.device, non_blocking=True)
        inputs = inputs.permute(0, 3, 1, 2).float().div_(255).contiguous()  # (B,3,S,S)
        masks = torch.empty((batch, 1, size, size), device=self.device)
        logits = torch.empty((batch, self.info.num_classes), device=self.device)
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
        torch.cuda.current_stream().synchronize()  # ORT runs on its own stream
        self.session.run_with_iobinding(binding)
        return masks[:, 0].cpu().numpy(), logits.cpu().numpy()


class _TorchBackend:
    """A torch module taking (B, 3, S, S) float in [0, 1], returning (masks, logits)."""

    module: Any
    device: torch.device
    info: ModelInfo

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inputs = torch.from_numpy(images).to(self.device, non_blocking=True)
        inputs = inputs.permute(0, 3, 1, 2).float().div_(255)  # NHWC -> channels-last NCHW view
        masks, logits = self.module(inputs)
        return masks[:, 0].float().cpu().numpy(), logits.float().cpu().numpy()


class TorchScriptBackend(_TorchBackend):
    def __init__(self, path: Path, device: str, sha256: str):
        from casm_deploy.export import load_torchscript, read_metadata

        meta = read_metadata(path)
        self.device = torch.device(device)
        try:
            self.module = load_torchscript(path, self.device)
        except Exception as error:
            raise UserError(f"{path}: TorchScript cannot load it ({error})") from None
        self.info = _info(
            path,
            meta,
            backend="torchscript",
            device=device,
            provider=f"torch.jit {device}",
            sha256=sha256,
        )


class EagerBackend(_TorchBackend):
    def __init__(self, path: Path, device: str, sha256: str):
        from casm_deploy.checkpoint import load_masker

        masker, spec = load_masker(path)
        self.device = torch.device(device)
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
        )
