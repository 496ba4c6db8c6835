import copy
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from casm_deploy.artifact import read_metadata
from casm_deploy.checkpoint import load_masker
from casm_deploy.cli import EXIT_PARITY_FAILED, app
from casm_deploy.config import ExportConfig
from casm_deploy.deploy.export import parity
from casm_deploy.deploy.export.job import run
from casm_deploy.deploy.export.parity import resolve_data
from casm_deploy.errors import UserError

runner = CliRunner()


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.fixture
def checkpoint(make_checkpoint, tiny_data, tmp_path):
    """A tiny random checkpoint whose config names its data, as `train` writes it."""
    path = make_checkpoint(tmp_path / "runs" / "tiny" / "checkpoint.pt", tiny_data)
    state = torch.load(path, weights_only=True)
    state["config"] = {"data": str(tiny_data), "arch": "resnet18"}
    torch.save(state, path)
    return Path(path)


@pytest.fixture
def planted(make_checkpoint, tmp_path):
    """A checkpoint whose mask is the image's blurred brightness, and images of white squares.

    A random decoder's masks are speckle: their largest component jumps under any rounding, so
    no quantised model keeps its boxes. A trained mapping's masks are blobs, like these.
    """
    import cv2

    data, rng = tmp_path / "squares", np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 22)):
        for wnid in ("n01", "n02", "n03"):
            (data / split / wnid).mkdir(parents=True)
            for i in range(count):
                image = np.zeros((32, 32, 3), np.uint8)
                side = 4 * rng.integers(2, 5)
                x0, y0 = 4 * rng.integers(0, (32 - side) // 4 + 1, size=2)
                image[y0 : y0 + side, x0 : x0 + side] = 255
                cv2.imwrite(str(data / split / wnid / f"{i}.png"), image)
    path = make_checkpoint(tmp_path / "planted.pt", data)
    state = torch.load(path, weights_only=True)
    encoder, decoder = state["encoder"], state["decoder"]
    luminance = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    encoder["conv1.weight"][:] = luminance / 49  # every stem channel: a 7x7 mean of brightness
    encoder["bn1.bias"][:] = 3.0  # positive, through the ReLU
    decoder["final.weight"][:] = 0
    decoder["final.weight"][0, :8] = 1 / (8 * 9)  # the head reads the stem channels only
    decoder["final.bias"][:] = -3.0
    state["config"] = {"data": str(data)}
    torch.save(state, path)
    return Path(path)


def _export(checkpoint, out, *args):
    result = runner.invoke(app, ["export", str(checkpoint), "--out", str(out), *args])
    report = json.loads((out / "export.json").read_text()) if (out / "export.json").exists() else {}
    return result, report


def test_fp32_torchscript_onnx_pt2_and_triton_pass_parity(checkpoint, tmp_path):
    out = tmp_path / "fp32"
    result, report = _export(checkpoint, out, "--onnx", "--pt2", "--triton", "--max-batch", "32")
    assert result.exit_code == 0, result.output
    assert report["parity"]["passed"] and report["parity"]["images"]["real"] == 64
    statuses = {r["format"]: r["status"] for r in report["parity"]["results"]}
    assert statuses == {"torchscript": "passed", "onnx": "passed", "pt2": "passed"}
    error = report["parity"]["fp32_error"]  # eager fp32 against its float64 copy
    assert 0 < error["max_abs_mask"] < 1e-4 and error["max_abs_logits"] < 1e-4
    bar = parity.mask_bar(parity.THRESHOLDS["fp32"], error["max_abs_mask"])
    assert error["max_abs_mask_bar"] == bar and error["rule"].startswith("max(0.0001, 10 x ")
    for r in report["parity"]["results"]:
        assert set(r["batches"]) == {"1", "3", "64"}
        assert r["worst"]["max_abs_mask"] <= 1e-4 and r["worst"]["argmax_agree"] == 1
        assert r["max_abs_mask_bar"] == bar

    # Every artefact carries the same metadata, with the checkpoint's hash.
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    for name in ("masker.ts", "masker.onnx", "masker.pt2"):
        meta = read_metadata(out / name)
        assert meta["checkpoint_sha256"] == digest and meta["precision"] == "fp32"
        assert meta["arch"] == "resnet18" and meta["image_size"] == "32"
        assert json.loads(meta["normalization"])["mean"] == [0.485, 0.456, 0.406]
        assert json.loads(meta["training_config"])["arch"] == "resnet18"

    # The ONNX file runs in a bare session at any batch, as the eager model does.
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "masker.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["masks", "logits"]
    masker, _ = load_masker(checkpoint)
    for batch in (1, 3, 257):
        images = np.random.default_rng(batch).random((batch, 3, 32, 32), dtype=np.float32)
        masks, logits = session.run(None, {"images": images})
        assert masks.shape == (batch, 1, 32, 32) and logits.shape == (batch, 3)
        with torch.no_grad():
            eager_masks, _ = masker(torch.from_numpy(images))
        assert np.abs(masks - eager_masks.numpy()).max() <= 1e-4

    config = (out / "triton" / "casm_masker" / "config.pbtxt").read_text()
    assert "max_batch_size: 32" in config and "dynamic_batching" in config
    assert "dims: [ 3, 32, 32 ]" in config and "dims: [ 3 ]" in config
    model = out / "triton" / "casm_masker" / "1" / "model.onnx"
    assert model.read_bytes() == (out / "masker.onnx").read_bytes()


def test_an_unshared_mapping_exports_with_its_own_encoder(tiny_data, tmp_path):
    from casm_deploy.checkpoint import load_masker, save_untrained
    from casm_deploy.data.imagenet import read_classes

    info = read_classes(tiny_data)
    path = tmp_path / "runs" / "unshared" / "checkpoint.pt"
    save_untrained(path, info.wnids, info.names, width=8, image_size=32, shared_encoder=False)
    masker, _ = load_masker(path)
    assert masker.mapping_encoder is not None
    result, report = _export(path, tmp_path / "out", "--onnx", "--data", str(tiny_data))
    assert result.exit_code == 0, result.output
    statuses = {r["format"]: r["status"] for r in report["parity"]["results"]}
    assert statuses == {"torchscript": "passed", "onnx": "passed"}


def test_int8_is_quantised_calibrated_and_passes_its_parity(planted, tmp_path):
    import onnx

    out = tmp_path / "int8"
    result, report = _export(planted, out, "--precision", "int8")
    assert result.exit_code == 0, result.output
    checked = {r["format"]: r for r in report["parity"]["results"]}
    assert checked["onnx"]["status"] == "passed", checked["onnx"]["failures"]
    assert checked["onnx"]["thresholds"]["mean_abs_mask"] == 0.03
    assert checked["torchscript"]["precision"] == "fp32"  # int8 is an ONNX Runtime format
    ops = {node.op_type for node in onnx.load(str(out / "masker.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    meta = read_metadata(out / "masker.onnx")
    assert meta["precision"] == "int8" and "calibrated on 24 training images" in meta["exporter"]


def test_fp16_onnx_passes_or_says_why(checkpoint, tmp_path):
    out = tmp_path / "fp16"
    result, report = _export(checkpoint, out, "--precision", "fp16", "--onnx", "--no-torchscript")
    [r] = report["parity"]["results"]
    assert r["status"] == "passed" or r["status"].startswith("skipped: ")
    assert result.exit_code == (0 if r["status"] == "passed" else EXIT_PARITY_FAILED)
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "masker.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float)"  # float32 in and out
    assert session.get_outputs()[0].type == "tensor(float)"


def test_bf16_onnx_is_valid_and_reported_honestly_where_it_cannot_run(checkpoint, tmp_path):
    import onnx

    out = tmp_path / "bf16"
    result, report = _export(checkpoint, out, "--precision", "bf16", "--onnx", "--no-torchscript")
    model = onnx.load(str(out / "masker.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 22  # Conv takes bfloat16 from opset 22
    [r] = report["parity"]["results"]
    if r["status"].startswith("skipped: "):  # ONNX Runtime's CPU provider has no bf16 Conv
        assert "cannot run" in r["status"]
        assert report["parity"]["verdict"] == "not checked"
        assert result.exit_code == EXIT_PARITY_FAILED and "parity not checked" in result.output


def test_a_failed_parity_check_exits_with_its_own_status(checkpoint, tmp_path, monkeypatch):
    fixed = {"fp32_error_multiple": None}  # not raised by float32's own error
    impossible = dataclasses.replace(parity.THRESHOLDS["fp32"], max_abs_mask=-1.0, **fixed)
    monkeypatch.setitem(parity.THRESHOLDS, "fp32", impossible)
    out = tmp_path / "fail"
    result, report = _export(checkpoint, out)
    assert result.exit_code == EXIT_PARITY_FAILED
    assert "parity failed" in result.output and "Traceback" not in result.output
    assert report["parity"]["results"][0]["status"] == "failed"
    assert (out / "masker.ts").is_file()  # written, and reported as failing


def test_a_wrong_export_still_fails_fp32_parity(checkpoint, tmp_path, monkeypatch):
    """fp32's bar follows float32's own error (issue 31), and still catches a wrong file: one
    weight of the ONNX file 1 % off, a TorchScript file without the input normalisation."""
    import onnx
    from onnx import numpy_helper

    from casm_deploy.deploy.export import job

    export_onnx, export_torchscript = job.export_onnx, job.export_torchscript

    def one_weight_off(model, example, path, *args):
        export_onnx(model, example, path, *args)
        graph = onnx.load(str(path))
        (tensor,) = [t for t in graph.graph.initializer if t.name == "decoder.final.weight"]
        weights = numpy_helper.to_array(tensor).copy()
        weights.flat[np.abs(weights).argmax()] *= 1.01
        tensor.CopyFrom(numpy_helper.from_array(weights, tensor.name))
        onnx.save(graph, str(path))

    def unnormalised(model, example, path, meta):
        model = copy.deepcopy(model)
        model.mean.zero_(), model.std.fill_(1)
        export_torchscript(model, example, path, meta)

    monkeypatch.setattr(job, "export_onnx", one_weight_off)
    monkeypatch.setattr(job, "export_torchscript", unnormalised)
    result, report = _export(checkpoint, tmp_path / "wrong", "--onnx")
    assert result.exit_code == EXIT_PARITY_FAILED, result.output
    checked = report["parity"]
    error = checked["fp32_error"]["max_abs_mask"]  # eager fp32's own, from float64
    assert 0 < error < 1e-4 and "fp32 bar: max |Δmask|" in result.output
    for r in checked["results"]:
        assert r["status"] == "failed" and r["max_abs_mask_bar"] >= 1e-4
        assert r["worst"]["max_abs_mask"] > 10 * r["max_abs_mask_bar"], r["worst"]
        assert any(failure.startswith("batch 1, 3, 64: max |Δmask|") for failure in r["failures"])


def test_bad_checkpoints_give_one_line_errors(checkpoint, tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "casm-deploy/checkpoint", "version": 1, "x": Payload()}, evil)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[:5000])
    foreign = tmp_path / "notes.txt"
    foreign.write_text("not a checkpoint")
    # (torchfile.load_file reports a text file as "refused" too: torch reads it as a pickle.)
    for path, says in [(evil, "refused"), (truncated, "truncated"), (foreign, "")]:
        result = runner.invoke(app, ["export", str(path), "--out", str(tmp_path / "x")])
        assert result.exit_code == 2, result.output
        assert path.name in result.output and says in result.output
        assert "Traceback" not in result.output
    cuda = runner.invoke(app, ["export", str(checkpoint), "--device", "gpu"])
    assert cuda.exit_code == 2 and "--device" in cuda.output


def test_data_is_found_beside_the_run_or_must_be_given(checkpoint, tiny_data, tmp_path):
    # `train` stores the data path as typed; the run lives in <cwd>/runs/<name>/.
    stored = {"config": {"data": tiny_data.name}}
    run_checkpoint = tiny_data.parent / "runs" / "x" / "checkpoint.pt"
    assert resolve_data("", stored, run_checkpoint) == tiny_data.parent / tiny_data.name
    with pytest.raises(UserError, match="--data"):
        resolve_data("", {"config": {"data": "elsewhere/synth"}}, checkpoint)
    with pytest.raises(UserError, match="does not name its data"):
        resolve_data("", {}, checkpoint)


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="precision"):
        ExportConfig(precision="int4")
    with pytest.raises(ValueError, match="opset"):
        ExportConfig(opset=17)
    with pytest.raises(ValueError, match="64"):
        ExportConfig(parity_images=10)


@pytest.mark.gpu
def test_cuda_onnxruntime_and_torchscript_fp16(checkpoint, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without the CUDA provider")
    out = tmp_path / "cuda"
    cfg = ExportConfig(
        checkpoint=str(checkpoint), out=str(out), onnx=True, precision="fp16", device="cuda"
    )
    report = run(cfg)
    backends = {r["format"]: r for r in report["parity"]["results"]}
    assert backends["torchscript"]["backend"] == "torch.jit cuda"
    assert backends["torchscript"]["status"] == "passed"
    assert backends["onnx"]["backend"] == "onnxruntime CUDA"
    assert report["parity"]["passed"]


@pytest.mark.gpu
def test_cuda_fp32_onnx_on_the_cuda_provider(checkpoint, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without the CUDA provider")
    cfg = ExportConfig(checkpoint=str(checkpoint), out=str(tmp_path), onnx=True, device="cuda")
    report = run(cfg)
    onnx_result = next(r for r in report["parity"]["results"] if r["format"] == "onnx")
    assert onnx_result["backend"] == "onnxruntime CUDA" and onnx_result["status"] == "passed"
