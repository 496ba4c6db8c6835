"""`export --masks-only`: the mapping without the classifier (one output, `masks`), its parity,
the refusal of a shared-encoder checkpoint, and infer and `casm_deploy.Masker` on such files.

The mapping is a tiny random unshared one (width 8, 32 px); the export is made once.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import casm_deploy
from casm_deploy.artifact import is_masks_only, read_metadata
from casm_deploy.checkpoint import load_masker, save_untrained
from casm_deploy.cli import app
from casm_deploy.data.imagenet import read_classes
from casm_deploy.deploy.export.exporters import export_masker
from casm_deploy.deploy.infer import outputs
from casm_deploy.deploy.infer.outfolder import parse
from casm_deploy.errors import UserError

SIZE = 32
runner = CliRunner()
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")
ROW_KEYS = {"path", "status", "box", "width", "height", "mask_mean"}  # and no label field


def _checkpoint(path: Path, data: Path, shared: bool) -> Path:
    info = read_classes(data)
    save_untrained(
        path, info.wnids, info.names, width=8, image_size=SIZE, shared_encoder=shared, seed=1
    )
    state = torch.load(path, weights_only=True)
    state["config"] = {"data": str(data)}  # where export finds its parity images
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def exported(tiny_data, tmp_path_factory):
    """An unshared checkpoint and its `export --masks-only --onnx --triton` folder."""
    root = tmp_path_factory.mktemp("masks_only")
    checkpoint = _checkpoint(root / "runs" / "own" / "checkpoint.pt", tiny_data, shared=False)
    out = root / "export"
    args = ["export", str(checkpoint), "--out", str(out), "--masks-only", "--onnx", "--triton"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return {"checkpoint": checkpoint, "out": out, "output": result.output}


def test_export_writes_masks_alone_and_checks_them_against_the_eager_mapping(exported):
    out = exported["out"]
    report = json.loads((out / "export.json").read_text())
    results = {r["format"]: r for r in report["parity"]["results"]}
    assert {f: r["status"] for f, r in results.items()} == {
        "torchscript": "passed",
        "onnx": "passed",
    }
    for r in results.values():  # no logits: no logit figures, no argmax criterion
        assert "argmax_agree" not in r["worst"] and r["worst"]["max_abs_mask"] <= 1e-4
    assert "masks only" in exported["output"]
    for name in ("masker.onnx", "masker.ts"):
        meta = read_metadata(out / name)
        assert meta["masks_only"] == "true" and is_masks_only(out / name, meta)
        assert list(json.loads(meta["outputs"])) == ["masks"]
        assert (meta["mapping_arch"], meta["mapping_width"]) == ("resnet18", "8")

    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "masker.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["masks"]
    mapping = load_masker(exported["checkpoint"])[0].masks_only().eval()
    images = np.random.default_rng(0).random((3, 3, SIZE, SIZE), dtype=np.float32)
    (masks,) = session.run(None, {"images": images})
    with torch.no_grad():
        eager = mapping(torch.from_numpy(images)).numpy()
    assert masks.shape == (3, 1, SIZE, SIZE) and np.abs(masks - eager).max() <= 1e-4

    config = (out / "triton" / "casm_masker" / "config.pbtxt").read_text()
    assert 'name: "masks"' in config and "logits" not in config


def test_a_shared_encoder_checkpoint_is_refused_before_anything_is_written(tiny_data, tmp_path):
    checkpoint = _checkpoint(tmp_path / "shared.pt", tiny_data, shared=True)
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", str(checkpoint), "--out", str(out), "--masks-only"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert str(checkpoint) in errors[0] and "--masks-only" in errors[0]
    assert "shares the classifier's encoder" in errors[0]
    assert not out.exists()
    with pytest.raises(UserError, match="--masks-only"):
        export_masker(checkpoint, tmp_path / "files", masks_only=True)
    assert not (tmp_path / "files").exists()


def test_infer_rows_carry_no_label_fields_and_resume(exported, tiny_data, tmp_path, monkeypatch):
    labels = []
    real_overlay = outputs.overlay

    def spy(*args, label=""):
        labels.append(label)
        return real_overlay(*args, label=label)

    monkeypatch.setattr(outputs, "overlay", spy)
    out, coco = tmp_path / "out", tmp_path / "coco.json"
    model = str(exported["out"] / "masker.onnx")
    args = ["infer", str(tiny_data / "val"), "--model", model, "--out", str(out), "--device", "cpu"]
    result = runner.invoke(app, [*args, "--overlay", "--coco", str(coco)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "boxes.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(set(row) == ROW_KEYS for row in rows)
    assert labels == [""] * 12  # the overlays name no class
    assert json.loads((out / "summary.json").read_text())["masks_only"] is True
    assert json.loads((out / "infer.json").read_text())["masks_only"] is True
    detections = json.loads(coco.read_text())
    assert detections["categories"] == [outputs.SALIENT]
    assert "masks-only" in detections["info"]["description"]
    assert detections["annotations"] and all(
        a["category_id"] == 1 and "score" not in a for a in detections["annotations"]
    )
    # rows without labels are whole records: a rerun has nothing to do
    again = runner.invoke(app, [*args, "--overlay"])
    assert again.exit_code == 0 and "0 image files to do, 12 already" in again.output
    assert "damaged" not in again.output


def test_an_out_of_a_full_model_refuses_a_masks_only_one(exported, tiny_data, tmp_path):
    out = tmp_path / "out"
    base = ["infer", str(tiny_data / "val"), "--out", str(out), "--device", "cpu"]
    full = exported["checkpoint"]  # run eagerly: the whole SaliencyModel, labels and all
    assert runner.invoke(app, [*base, "--model", str(full)]).exit_code == 0
    assert "label" in (out / "boxes.jsonl").read_text()
    masks_only = exported["out"] / "masker.onnx"
    result = runner.invoke(app, [*base, "--model", str(masks_only)])
    assert result.exit_code == 2 and "model_sha256, masks_only" in result.output


def test_masker_gives_masks_and_boxes_and_none_for_labels(exported):
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((40, 56), (32, 32))]
    results = {}
    for name in ("masker.onnx", "masker.ts"):
        masker = casm_deploy.Masker.load(exported["out"] / name, device="cpu")
        assert masker.masks_only and masker.info.masks_only
        result = masker.predict(pictures)
        assert len(result) == 2 and [m.shape for m in result.masks] == [(40, 56), (32, 32)]
        for field in (result.labels, result.names, result.indices, result.scores):
            assert field == [None, None]
        results[name] = result
    onnx, scripted = results.values()
    assert all(np.abs(a - b).max() <= 1e-4 for a, b in zip(onnx.masks, scripted.masks, strict=True))


def test_a_record_row_has_every_label_field_or_none():
    ok = {"path": "a.jpg", "status": "ok", "box": None, "width": 4, "height": 4, "mask_mean": 0.5}
    assert parse(json.dumps(ok).encode()) == ok
    assert parse(json.dumps({**ok, "class_index": 1, "score": 0.5}).encode()) is not None
    assert parse(json.dumps({**ok, "class_index": 1}).encode()) is None  # half a label
    with pytest.raises(UserError, match="masks_only 'yes' is not true or false"):
        is_masks_only("m.onnx", {"masks_only": "yes"})


def test_int8_quantises_the_mappings_encoder_and_keeps_its_decoder(tiny_data, tmp_path):
    """A mapping whose mask is the image's blurred brightness (a blob, as a trained mapping's,
    which int8 keeps; a random decoder's speckle it does not), exported int8 masks-only."""
    import onnx

    checkpoint = _checkpoint(tmp_path / "planted.pt", tiny_data, shared=False)
    state = torch.load(checkpoint, weights_only=True)
    encoder, decoder = state["mapping_encoder"], state["decoder"]
    luminance = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    encoder["conv1.weight"][:] = luminance / 49  # every stem channel: a 7x7 mean of brightness
    encoder["bn1.bias"][:] = 3.0
    decoder["final.weight"][:] = 0
    decoder["final.weight"][0, :8] = 1 / (8 * 9)  # the head reads the stem channels only
    decoder["final.bias"][:] = -3.0
    torch.save(state, checkpoint)
    out = tmp_path / "int8"
    args = ["export", str(checkpoint), "--out", str(out), "--masks-only", "--precision", "int8"]
    result = runner.invoke(app, [*args, "--no-torchscript", "--calibration-images", "8"])
    assert result.exit_code == 0, result.output
    graph = onnx.load(str(out / "masker.onnx")).graph
    assert [o.name for o in graph.output] == ["masks"]
    dequantised = {
        o for node in graph.node if node.op_type == "DequantizeLinear" for o in node.output
    }
    # the decoder's convolutions read float32 weights, the encoder's dequantised int8 ones
    kinds = {
        (_scope(node)[1] == "decoder", node.input[1] in dequantised)
        for node in graph.node
        if node.op_type == "Conv"
    }
    assert kinds == {(True, False), (False, True)}


def test_int8_of_a_mobilenet_mapping_keeps_its_decoder_and_survives_a_stuck_gate(
    tiny_data, tmp_path
):
    """MobileNetV3's HardSwish, which ONNX Runtime's pre-processing rewrites, dropping the
    exporter's module scopes: the decoder is still found (by the names the scopes gave in the
    exported graph). Its squeeze-excitation gates are planted at 0.5 +- 1e-6, too narrow for
    the percentile histogram: the calibration falls back to min / max and says so."""
    import onnx
    import onnxruntime as ort

    from casm_deploy.deploy.export.precision import decoder_nodes, quantize_int8

    info = read_classes(tiny_data)
    checkpoint = save_untrained(
        tmp_path / "mnv3.pt", info.wnids, info.names, width=8, image_size=SIZE,
        mapping=("mobilenet_v3_small", 16), seed=1,
    )  # fmt: skip
    state = torch.load(checkpoint, weights_only=True)
    state["config"] = {"data": str(tiny_data)}
    for name, tensor in state["mapping_encoder"].items():
        if ".fc2." in name:  # the gate is hardsigmoid(fc2(...)) = 0.5 + fc2(...) / 6
            tensor.copy_(torch.randn_like(tensor) * 1e-6 if name.endswith("weight") else 0)
    torch.save(state, checkpoint)
    args = ["export", str(checkpoint), "--out", str(tmp_path / "fp32"), "--masks-only"]
    result = runner.invoke(app, [*args, "--onnx", "--no-torchscript"])
    assert result.exit_code == 0, result.output
    fp32 = tmp_path / "fp32" / "masker.onnx"
    decoder = set(decoder_nodes(onnx.load(str(fp32))))
    batches = [np.random.default_rng(0).random((4, 3, SIZE, SIZE), dtype=np.float32)]
    metadata = read_metadata(fp32)
    quantize_int8(fp32, tmp_path / "int8.onnx", batches, metadata)
    assert metadata["calibration"].startswith("minmax (the percentile histogram failed")
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    dequantised = {
        o for node in graph.node if node.op_type == "DequantizeLinear" for o in node.output
    }
    kinds = {
        (node.name in decoder, node.input[1] in dequantised)
        for node in graph.node
        if node.op_type == "Conv"
    }
    assert kinds == {(True, False), (False, True)}
    session = ort.InferenceSession(str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"])
    (masks,) = session.run(None, {"images": batches[0]})
    assert masks.shape == (4, 1, SIZE, SIZE) and np.isfinite(masks).all()


def _scope(node) -> list[str]:
    """The module path the ONNX exporter recorded for a node: ['', 'decoder', ...]."""
    import ast

    return ast.literal_eval(next(p.value for p in node.metadata_props if p.key.endswith("scopes")))


@pytest.mark.gpu
def test_masks_only_files_on_cuda_give_the_cpu_masks(exported, tiny_data):
    """The CUDA paths: pinned copies back without logits (TorchScript), IO binding of one
    output (ONNX Runtime's CUDA provider, where installed)."""
    import onnxruntime as ort

    images = [str(p) for p in sorted((tiny_data / "val").rglob("*.JPEG"))]
    names = ["masker.ts"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        names.append("masker.onnx")
    for name in names:
        cpu = casm_deploy.Masker.load(exported["out"] / name, device="cpu").predict(images)
        cuda = casm_deploy.Masker.load(exported["out"] / name, device="cuda")
        assert cuda.info.device == "cuda" and cuda.masks_only
        pending = cuda.submit([np.zeros((SIZE, SIZE, 3), np.uint8)] * 2, uint8_masks=True)
        masks, logits = pending.result()
        assert masks.dtype == np.uint8 and masks.shape == (2, SIZE, SIZE) and logits is None
        result = cuda.predict(images)
        assert result.labels == [None] * len(images)
        assert all(
            np.abs(a - b).max() <= 1e-3 for a, b in zip(result.masks, cpu.masks, strict=True)
        )
