"""Each torchvision backbone through the whole flow at a tiny size: `train` (from random weights,
and from a local state dict in torchvision's format), `export` (full and `--masks-only`),
`infer` and `eval`."""

import json

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from casm_deploy.cli import app
from casm_deploy.models.backbones import FAMILIES

runner = CliRunner()


def invoke(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


TINY = ("--image-size", "32", "--workers", "0", "--batch-size", "8", "--pretrain-batch-size", "8")
TINY += ("--pool-size", "2", "--epoch-fraction", "0.25", "--no-channels-last")


def test_torchvision_weights_of_each_family_start_a_run(tiny_data, tmp_path):
    """`--weights FILE` with a torchvision state dict (1000 classes: the head is left out);
    a learning rate of 0 keeps the weights as loaded."""
    for arch in FAMILIES:
        path = tmp_path / f"{arch}.pth"
        reference = torchvision.models.get_model(arch)
        torch.save(reference.state_dict(), path)
        out = invoke(
            "train", tiny_data, "--out", tmp_path / "runs", "--name", arch, "--arch", arch,
            "--width", "64", "--weights", path, "--classifier-only", "--pretrain-epochs", "1",
            "--pretrain-lr", "0", *TINY,
        )  # fmt: skip
        assert "done" in out
        encoder = torch.load(tmp_path / "runs" / arch / "checkpoint.pt", weights_only=True)
        name = next(k for k in reference.state_dict() if k.endswith("weight"))
        assert torch.equal(encoder["encoder"][name], reference.state_dict()[name]), arch
        path.unlink()


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(FAMILIES))
def test_a_backbone_trains_exports_infers_and_is_scored(arch, tiny_data, tmp_path):
    """A classifier of `arch` with a mapping of its own of the same family: every step works."""
    runs, export = tmp_path / "runs", tmp_path / "export"
    invoke(
        "train", tiny_data, "--out", runs, "--name", "r", "--arch", arch, "--width", "16",
        "--mapping-arch", arch, "--mapping-width", "8", "--pretrain-epochs", "1", "--epochs", "1",
        *TINY,
    )  # fmt: skip
    checkpoint = runs / "r" / "checkpoint.pt"
    invoke("export", checkpoint, "--onnx", "--out", export / "full")
    invoke(
        "export", checkpoint, "--onnx", "--no-torchscript", "--masks-only", "--out",
        export / "masks",
    )  # fmt: skip
    out = tmp_path / "out"
    invoke("infer", tiny_data / "val", "--model", export / "masks" / "masker.onnx", "--out", out)
    rows = [json.loads(line) for line in (out / "boxes.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all("box" in row for row in rows)
    scores = tmp_path / "eval.json"
    invoke("eval", checkpoint, export / "masks" / "masker.onnx", tiny_data, "--json", scores)
    result = json.loads(scores.read_text())
    assert 0 <= result["LE"] <= 1
    masks_only = json.loads((tmp_path / "eval.masks.onnx.json").read_text())
    assert 0 <= masks_only["LE"] <= 1 and masks_only["OM"] is None
