"""`eval` on exported files: an ONNX or TorchScript export scores as its checkpoint does, a
masks-only one has no OM (and says why), and Grad-CAM refuses an exported first model.

The model is a tiny random mapping with an encoder of its own (width 8, 32 px), exported once
in full and masks-only.
"""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from casm_deploy.checkpoint import save_untrained
from casm_deploy.cli import app
from casm_deploy.data.imagenet import read_classes
from casm_deploy.evaluation.methods import display_name

runner = CliRunner()
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")
SCORES = ("LE", "F1", "MaxBoxAccV2", "PxAP", "mask_mean")


@pytest.fixture(scope="module")
def exported(tiny_data, tmp_path_factory):
    """runs/own/checkpoint.pt, export/full/masker.{onnx,ts}, export/masks/masker.onnx."""
    root = tmp_path_factory.mktemp("eval_exported")
    info = read_classes(tiny_data)
    checkpoint = root / "runs" / "own" / "checkpoint.pt"
    save_untrained(
        checkpoint, info.wnids, info.names, width=8, image_size=32,
        mapping=("resnet18", 8), seed=3,
    )  # fmt: skip
    state = torch.load(checkpoint, weights_only=True)
    state["config"] = {"data": str(tiny_data)}  # where export finds its parity images
    # the mask: the image's blurred brightness, a smooth blob (a random decoder's near-constant
    # masks would put every threshold metric on a knife edge)
    encoder, decoder = state["mapping_encoder"], state["decoder"]
    encoder["conv1.weight"][:] = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1) / 49
    encoder["bn1.bias"][:] = 3.0
    decoder["final.weight"][:] = 0
    decoder["final.weight"][0, :8] = 1 / (8 * 9)  # the head reads the stem channels only
    decoder["final.bias"][:] = -3.0
    torch.save(state, checkpoint)
    for name, extra in (("full", []), ("masks", ["--masks-only", "--no-torchscript"])):
        args = ["export", str(checkpoint), "--out", str(root / "export" / name), "--onnx"]
        result = runner.invoke(app, [*args, *extra])
        assert result.exit_code == 0, result.output
    return root


def _eval(data: Path, out: Path, *models: Path, extra: tuple[str, ...] = ()) -> dict:
    """The first model's scores, with every other method's under "others" (by name)."""
    args = ["eval", *map(str, models), str(data), "--json", str(out), *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    others = {
        p.name[len(out.stem) + 1 : -len(".json")]: json.loads(p.read_text())
        for p in out.parent.glob(f"{out.stem}.*.json")
        if not p.name.endswith(".config.json")
    }
    return {**json.loads(out.read_text()), "others": others}


def test_exported_files_score_as_their_checkpoint(exported, tiny_data, tmp_path):
    full, masks = exported / "export" / "full", exported / "export" / "masks"
    models = (full / "masker.onnx", full / "masker.ts", masks / "masker.onnx")
    result = _eval(
        tiny_data, tmp_path / "e.json", exported / "runs" / "own" / "checkpoint.pt", *models
    )
    checkpoint, others = result, result["others"]
    assert set(others) == {"full.onnx", "full.ts", "masks.onnx"}
    for name, scores in others.items():
        for key in SCORES:
            assert scores[key] == pytest.approx(checkpoint[key], abs=2e-3), (name, key)
    assert checkpoint["OM"] is not None
    assert others["full.onnx"]["OM"] == pytest.approx(checkpoint["OM"])
    assert others["full.ts"]["OM"] == pytest.approx(checkpoint["OM"])
    # a masks-only file predicts no class: no OM, not the checkpoint's lent to it
    assert others["masks.onnx"]["OM"] is None
    assert "masks-only" in others["masks.onnx"]["OM_note"]


def test_a_masks_only_file_first_leaves_the_baselines_without_om(exported, tiny_data, tmp_path):
    masks = exported / "export" / "masks" / "masker.onnx"
    result = _eval(tiny_data, tmp_path / "e.json", masks, extra=("--baseline", "center"))
    assert result["OM"] is None and result["LE"] is not None
    assert result["others"]["center"]["OM"] is None


def test_gradcam_needs_a_checkpoint_first(exported, tiny_data):
    masks = exported / "export" / "masks" / "masker.onnx"
    result = runner.invoke(app, ["eval", str(masks), str(tiny_data), "--baseline", "gradcam"])
    assert result.exit_code == 2
    assert "--baseline gradcam" in result.output and "checkpoint first" in result.output


def test_display_names_tell_the_files_apart():
    assert display_name("runs/l100/checkpoint.pt") == "l100"
    assert display_name("export/l100/masker.onnx") == "l100.onnx"
    assert display_name("export/l100/masker.ts") == "l100.ts"
    assert display_name("mine.onnx") == "mine"
