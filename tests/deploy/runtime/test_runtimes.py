"""runtimes, the API and decoding: device and provider choice, the uint8 masks, staging buffers,
the GPU decoders' CPU twins. ONNX Runtime's GPU providers are faked where a GPU would be needed.
"""

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pictures import scene
from PIL import Image, ImageOps

from casm_deploy.data.decode import TorchvisionJpegs, decode, orient
from casm_deploy.data.imagefiles import Encoded, Entry, ImageError, read_file
from casm_deploy.deploy.infer.outputs import Writer
from casm_deploy.deploy.infer.pipeline import JpegStage
from casm_deploy.deploy.runtime import onnxruntime_backend
from casm_deploy.deploy.runtime.device_io import Pending, Staging, masks_to_uint8
from casm_deploy.deploy.runtime.masker import Masker, float_masks
from casm_deploy.deploy.runtime.onnxruntime_backend import (
    CPU,
    CUDA,
    TENSORRT,
    onnx_providers,
    trt_cache_dir,
)
from casm_deploy.deploy.runtime.open import backend_of, device_type, open_model
from casm_deploy.errors import UserError

SIZE = 32
SHA = "ab" * 32


@pytest.fixture(scope="module")
def onnx_model(make_exports, tiny_data, tmp_path_factory):
    """A tiny random mapping as an ONNX file (and its checkpoint, for torch)."""
    files = make_exports(tmp_path_factory.mktemp("models"), tiny_data, SIZE, formats=("onnx",))
    return files["onnx"], files["eager"]


def _images(n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


# --- device and backend -----------------------------------------------------------------------


def test_device_type(monkeypatch):
    for name in ("gpu", "cuda:1"):  # the common rule takes cuda:N; infer and the API do not
        with pytest.raises(UserError, match=f"--device '{name}': choose one of auto, cpu, cuda"):
            device_type(name)
    assert device_type("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_type("auto") == "cpu"
    with pytest.raises(UserError, match="--device cuda: CUDA is not available"):
        device_type("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_type("auto") == "cuda" and device_type("cuda") == "cuda"


def test_backend_of():
    assert backend_of(Path("m.ONNX"), "auto") == "onnx"
    assert backend_of(Path("m.ts"), "torchscript") == "torchscript"
    assert backend_of(Path("run/checkpoint.pth"), "auto") == "eager"
    with pytest.raises(UserError, match="--backend 'tensorrt'"):
        backend_of(Path("m.onnx"), "tensorrt")
    with pytest.raises(UserError, match="unknown model file type"):
        backend_of(Path("m.engine"), "auto")
    with pytest.raises(UserError, match="a onnx model cannot run with --backend eager"):
        backend_of(Path("m.onnx"), "eager")


def test_open_model_refuses_a_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such model file"):
        open_model(tmp_path / "none.onnx")


# --- ONNX Runtime's providers -----------------------------------------------------------------


def test_provider_list_for_cuda(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    everything = [TENSORRT, CUDA, CPU]
    chain = onnx_providers(everything, "cuda", "fp32", 256, 224, SHA, device_id=1)
    assert [name for name, _ in chain] == [TENSORRT, CUDA, CPU]
    trt = chain[0][1]
    assert trt["trt_profile_min_shapes"] == "images:1x3x224x224"
    assert trt["trt_profile_opt_shapes"] == "images:256x3x224x224"
    assert trt["trt_profile_max_shapes"] == "images:256x3x224x224"
    assert trt["trt_engine_cache_enable"] is True
    assert trt["trt_engine_cache_path"] == str(tmp_path / "cache" / "casm-deploy" / "trt" / SHA)
    assert trt["trt_fp16_enable"] is False and trt["trt_bf16_enable"] is False
    assert trt["device_id"] == 1 and chain[1] == (CUDA, {"device_id": 1})
    fp16 = dict(onnx_providers(everything, "cuda", "fp16", 8, 64, SHA))[TENSORRT]
    assert fp16["trt_fp16_enable"] is True and fp16["trt_profile_max_shapes"] == "images:8x3x64x64"
    assert dict(onnx_providers(everything, "cuda", "bf16", 8, 64, SHA))[TENSORRT]["trt_bf16_enable"]
    # int8 (QDQ, uint8 activations) is for the CPU provider: never handed to TensorRT
    assert [n for n, _ in onnx_providers(everything, "cuda", "int8", 8, 64, SHA)] == [CUDA, CPU]
    assert [n for n, _ in onnx_providers([CUDA, CPU], "cuda", "fp32", 8, 64, SHA)] == [CUDA, CPU]
    assert onnx_providers(everything, "cpu", "fp32", 8, 64, SHA) == [(CPU, {})]
    assert onnx_providers([CPU], "cuda", "fp32", 8, 64, SHA) == [(CPU, {})]


def test_trt_cache_is_in_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert trt_cache_dir(SHA) == tmp_path / ".cache" / "casm-deploy" / "trt" / SHA
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # not absolute: ignored (XDG)
    assert trt_cache_dir(SHA) == tmp_path / ".cache" / "casm-deploy" / "trt" / SHA


class FakeGpuOrt:
    """onnxruntime as on a GPU machine whose GPU providers do not start: TensorRT raises (its
    libraries are missing), CUDA is skipped silently (ORT logs it) and the CPU runs it."""

    def __init__(self, monkeypatch, available=(TENSORRT, CUDA, CPU)):
        import onnxruntime as ort
        from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession as real

        self.chains: list[list[str]] = []

        def session(path, options, providers, **kwargs):
            names = [p[0] if isinstance(p, tuple) else p for p in providers]
            self.chains.append(names)
            assert kwargs.get("enable_fallback") == 0  # no retry without our options
            if names[0] == TENSORRT:
                raise RuntimeError("Please install TensorRT libraries\nmore detail")
            return real(path, options, providers=[CPU])

        monkeypatch.setattr(ort, "get_available_providers", lambda: list(available))
        monkeypatch.setattr(ort, "InferenceSession", session)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        self.preloaded = 0

        def preload(_ort):
            self.preloaded += 1

        monkeypatch.setattr(onnxruntime_backend, "preload_cuda", preload)


def test_auto_falls_back_to_the_best_provider_that_starts(onnx_model, monkeypatch, tmp_path):
    path, _ = onnx_model
    reference = open_model(path, device="cpu")(_images())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fake = FakeGpuOrt(monkeypatch)
    monkeypatch.setattr(onnxruntime_backend, "tensorrt_loadable", lambda: True)
    model = open_model(path, device="auto", batch=4)
    assert fake.chains == [[TENSORRT, CUDA, CPU], [CUDA, CPU]]
    assert fake.preloaded == 1  # the CUDA libraries are loaded before a CUDA session
    assert model.info.device == "cpu" and model.info.provider == CPU
    notes = " | ".join(model.notices)
    assert "Tensorrt did not start: Please install TensorRT libraries" in notes
    assert "CUDA provider did not start" in notes and "runs on the CPU" in notes
    assert "--device cuda" not in notes  # the user did not pass it
    masks, logits = model(_images())
    np.testing.assert_array_equal(masks, reference[0])
    np.testing.assert_array_equal(logits, reference[1])


def test_tensorrt_without_its_libraries_is_skipped(onnx_model, monkeypatch):
    fake = FakeGpuOrt(monkeypatch)
    monkeypatch.setattr(onnxruntime_backend, "tensorrt_loadable", lambda: False)
    model = open_model(onnx_model[0], device="auto")
    assert fake.chains == [[CUDA, CPU]]
    assert any(onnxruntime_backend.TENSORRT_LIBRARY in note for note in model.notices)


def test_explicit_cuda_never_falls_back(onnx_model, monkeypatch):
    path, _ = onnx_model
    FakeGpuOrt(monkeypatch)
    with pytest.raises(UserError, match="--device cuda: ONNX Runtime fell back to the CPU"):
        open_model(path, device="cuda")
    FakeGpuOrt(monkeypatch, available=(CPU,))
    with pytest.raises(UserError, match="--device cuda: this ONNX Runtime has no CUDA provider"):
        open_model(path, device="cuda")
    model = open_model(path, device="auto")  # the same ORT under auto: the CPU, with a notice
    assert model.info.device == "cpu"
    assert "no CUDA provider" in model.notices[0] and "--device" not in model.notices[0]


# --- the masks --------------------------------------------------------------------------------


def test_uint8_masks_round_as_the_png_writer_did():
    levels = np.arange(256, dtype=np.float32)
    halves = (levels[:-1] + 0.5) / 255  # every tie in [0, 1], and the floats either side
    edges = np.concatenate(
        [
            levels / 255,
            halves,
            np.nextafter(halves, np.float32(0)),
            np.nextafter(halves, np.float32(1)),
            [0.0, 1.0, 1e-9, 1 - 1e-7],
        ]
    ).astype(np.float32)
    rng = np.random.default_rng(0)
    masks = np.concatenate([edges, rng.random(100_000, dtype=np.float32)])[None]
    host = np.rint(masks * 255).astype(np.uint8)  # what Writer.write did with float masks
    np.testing.assert_array_equal(masks_to_uint8(torch.from_numpy(masks)).numpy(), host)
    np.testing.assert_array_equal(float_masks(host), host.astype(np.float32) / 255)
    assert float_masks(masks) is masks


def test_writer_takes_uint8_masks(tmp_path):
    rng = np.random.default_rng(1)
    mask = cv2.GaussianBlur(rng.random((SIZE, SIZE), dtype=np.float32), (7, 7), 2)
    levels = masks_to_uint8(torch.from_numpy(mask)).numpy()
    row = {"width": 50, "height": 40, "box": None}
    written = {}
    for mask_size in ("model", "original"):
        for name, m in (("float", mask), ("uint8", levels)):
            out = tmp_path / f"{mask_size}-{name}"
            out.mkdir()
            entry = Entry("a/b.jpg", Path("a/b.jpg"))
            Writer(out, mask_size=mask_size).write(entry, m, row)
            written[mask_size, name] = cv2.imread(str(out / "masks" / "a/b.jpg.png"), -1)
    np.testing.assert_array_equal(written["model", "float"], written["model", "uint8"])
    assert written["original", "uint8"].shape == (40, 50)
    difference = written["original", "uint8"].astype(int) - written["original", "float"]
    assert np.abs(difference).max() <= 1  # resized as levels rather than as floats
    npy = tmp_path / "npy"
    npy.mkdir()
    Writer(npy, "npy", "model").write(Entry("c.png", Path("c.png")), levels, row)
    saved = np.load(npy / "masks" / "c.png.npy")
    assert saved.dtype == np.float32 and np.abs(saved - mask).max() <= 0.5 / 255 + 1e-7


@pytest.mark.parametrize("kind", ["onnx", "eager"])
def test_uint8_masks_from_the_backends(onnx_model, kind):
    path = onnx_model[0] if kind == "onnx" else onnx_model[1]
    masker = Masker.load(path, device="cpu")
    images = _images(6)
    masks, logits = masker.run(images)
    levels, logits8 = masker.submit(list(images), uint8_masks=True).result()
    assert levels.dtype == np.uint8 and masks.dtype == np.float32
    np.testing.assert_array_equal(levels, np.rint(masks * 255).astype(np.uint8))
    np.testing.assert_array_equal(logits8, logits)
    sizes = [(40, 30)] * len(images)
    rows = masker.describe(levels, logits, sizes)
    assert rows == masker.describe(levels.astype(np.float32) / 255, logits, sizes)
    for row, exact in zip(rows, masker.describe(masks, logits, sizes), strict=True):
        assert abs(row["mask_mean"] - exact["mask_mean"]) <= 0.5 / 255 + 1e-6
        assert row["class_index"] == exact["class_index"]


def test_pending_finishes_once():
    calls = []

    def finish():
        calls.append(1)
        return np.zeros(1), np.ones(1)

    pending = Pending(finish)
    assert pending.result()[1][0] == 1 and pending.result()[1][0] == 1
    assert calls == [1]


# --- host buffers -----------------------------------------------------------------------------


class Event:
    def __init__(self):
        self.waited = 0

    def synchronize(self):
        self.waited += 1


def test_staging_uses_its_buffers_in_turn():
    staging = Staging((4, SIZE, SIZE, 3), pin=torch.cuda.is_available())
    assert all(b.is_pinned() == torch.cuda.is_available() for b in staging.buffers)
    first, second, third = _images(4, 1), _images(3, 2), _images(4, 3)
    host, slot = staging.fill(list(first))
    np.testing.assert_array_equal(host.numpy(), first)
    copy0 = Event()
    staging.copied(slot, copy0)
    host1, slot1 = staging.fill(list(second))  # a partial batch: the other buffer's first rows
    assert slot1 != slot and host1.shape == (3, SIZE, SIZE, 3)
    np.testing.assert_array_equal(host1.numpy(), second)
    np.testing.assert_array_equal(host.numpy(), first)  # batch 0 untouched while it copies
    assert copy0.waited == 0
    host2, slot2 = staging.fill(list(third))  # buffer 0 again: only after its copy finished
    assert slot2 == slot and copy0.waited == 1
    np.testing.assert_array_equal(host2.numpy(), third)
    bigger = _images(6, 4)  # more than planned (the API's batch_size): the buffer grows
    host3, _ = staging.fill(bigger)
    np.testing.assert_array_equal(host3.numpy(), bigger)


# --- images and the GPU decoders' CPU path ----------------------------------------------------


def _jpeg(image: np.ndarray, orientation: int = 1, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    picture = Image.fromarray(image).convert(mode)
    exif = picture.getexif()
    if orientation != 1:
        exif[0x0112] = orientation
    picture.save(buffer, "JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def test_read_file_reports_orientation_and_mode(tmp_path):
    path = tmp_path / "rotated.jpg"
    path.write_bytes(_jpeg(scene(20, 40), orientation=6))
    encoded = read_file(path)
    assert (encoded.width, encoded.height, encoded.orientation) == (20, 40, 6)
    assert encoded.mode == "RGB" and encoded.is_jpeg
    (tmp_path / "cmyk.jpg").write_bytes(_jpeg(scene(20, 20), mode="CMYK"))
    assert read_file(tmp_path / "cmyk.jpg").mode == "CMYK"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pil(orientation):
    image = scene(5, 7)
    stored = Image.fromarray(image)
    exif = stored.getexif()
    exif[0x0112] = orientation
    shown = np.asarray(ImageOps.exif_transpose(_reload(stored, exif)))
    got = orient(torch.from_numpy(image).permute(2, 0, 1), orientation).permute(1, 2, 0)
    np.testing.assert_array_equal(got.numpy(), shown)


def _reload(picture: Image.Image, exif) -> Image.Image:
    buffer = io.BytesIO()
    picture.save(buffer, "PNG", exif=exif)  # lossless, so the pixels compare exactly
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_torchvision_decoder_on_cpu_matches_opencv():
    """The nvJPEG path's code, run on the CPU: close to OpenCV's decoding and resizing."""
    decoder = TorchvisionJpegs(SIZE, "cpu")
    files = []
    for k, (h, w, orientation) in enumerate([(48, 64, 1), (40, 40, 1), (30, 90, 6), (20, 24, 3)]):
        data = np.frombuffer(_jpeg(scene(h, w, k), orientation), np.uint8).copy()
        width, height = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
        files.append(Encoded(data, width, height, orientation, "RGB"))
    grey = np.frombuffer(_jpeg(scene(36, 36, 9), mode="L"), np.uint8).copy()
    files.append(Encoded(grey, 36, 36, 1, "L"))
    assert all(decoder.accepts(f) for f in files)
    assert not decoder.accepts(Encoded(grey, 36, 36, 1, "CMYK"))
    images = decoder(files)
    for image, f in zip(images, files, strict=True):
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == torch.uint8
        reference = decode(f.data, f.width, f.height, SIZE)
        difference = np.abs(image.numpy().astype(int) - reference)
        assert difference.mean() < 3, (f.orientation, difference.mean())


class Picky:
    """A JPEG decoder that fails on whole batches, and on files whose first byte after the
    marker is 0 (as if nvJPEG could not read them)."""

    def __init__(self):
        self.calls = []

    def accepts(self, encoded):
        return encoded.is_jpeg

    def __call__(self, files):
        self.calls.append(len(files))
        if len(files) > 1:
            raise RuntimeError("batch failed")
        if files[0].data[2] == 0:
            raise RuntimeError("cannot")
        return [np.full((SIZE, SIZE, 3), 7, np.uint8)]


def test_jpeg_stage_retries_each_file_alone_then_opencv():
    from concurrent.futures import Future

    good = np.frombuffer(_jpeg(scene(24, 24)), np.uint8).copy()
    odd = good.copy()
    odd[2] = 0  # no JPEG marker after SOI: the decoder and OpenCV both refuse it

    def prepared(data):
        future = Future()
        future.set_result(("jpeg", Encoded(data, 24, 24, 1, "RGB"), 24, 24))
        return future

    decoder = Picky()
    stage = JpegStage(decoder, SIZE)
    results = stage.submit([prepared(good), prepared(odd), prepared(good)])
    first, third = results[0].result(), results[2].result()
    error = results[1].exception()
    stage.close()
    assert decoder.calls == [3, 1, 1, 1]  # the batch, then each file alone
    assert int(first[0][0, 0, 0]) == 7 and int(third[0][0, 0, 0]) == 7
    assert isinstance(error, ImageError) and "corrupt" in str(error)  # OpenCV's reason


# --- on a GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_pipeline_matches_the_cpu(onnx_model):
    """Pinned staging, side-stream copies, uint8 masks on the device: the CPU's results."""
    _, checkpoint = onnx_model
    cpu = Masker.load(checkpoint, device="cpu")
    cuda = Masker.load(checkpoint, device="cuda", batch_size=4)
    batches = [_images(4, 1), _images(3, 2), _images(4, 3)]
    pendings = [cuda.submit(list(b), uint8_masks=True) for b in batches]  # all in flight
    for batch, pending in zip(batches, pendings, strict=True):
        levels, logits = pending.result()
        masks, reference = cpu.run(batch)
        assert levels.dtype == np.uint8
        assert np.abs(levels.astype(int) - np.rint(masks * 255)).max() <= 1
        np.testing.assert_allclose(logits, reference, atol=1e-3)
    on_device = [torch.from_numpy(i).cuda() for i in batches[0]]  # as a GPU decoder leaves them
    np.testing.assert_allclose(
        cuda.submit(on_device).result()[1], cpu.run(batches[0])[1], atol=1e-3
    )
