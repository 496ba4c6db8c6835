"""The grad-cam package's CAMs as eval baselines (evaluation/cams.py): the package's Grad-CAM
agrees with the project's own, every --arch finds the module of each stage's map, and each CAM
runs through `eval --baseline` into its JSON with its cost per image."""

import json

import pytest
import torch
from typer.testing import CliRunner

from casm_deploy.cli import app
from casm_deploy.evaluation.cams import CAMS, cam_method, stage_layer
from casm_deploy.evaluation.gradcam import gradcam
from casm_deploy.models.backbones import ARCHS
from casm_deploy.models.encoder import build_encoder
from casm_deploy.models.mapping import build_masker

runner = CliRunner()
NAMES = ("gradcam++", "xgradcam", "layercam", "eigencam", "hirescam", "scorecam")


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Each map scaled to [0, 1] by its own minimum and maximum (a constant map: zeros)."""
    low, high = maps.amin((2, 3), keepdim=True), maps.amax((2, 3), keepdim=True)
    return torch.where(high > low, (maps - low) / (high - low).clamp_min(1e-12), 0 * maps)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_the_packages_gradcam_agrees_with_ours(arch, stage=3):
    """Both weigh the stage's channels by the mean gradient of the top-1 logit and keep the
    ReLU of the sum, resized bilinearly (half-pixel centres, edges repeated) to the image. Ours
    then divides by the maximum; the package min-max normalises before and after resizing
    (with 1e-7 added to each range): min-max normalised again, the two are the same map."""
    torch.manual_seed(0)
    masker = build_masker(arch, 3, width=8).eval()
    images = torch.rand(4, 3, 32, 32)
    ours, our_logits = gradcam(masker, images, stage)
    theirs, their_logits = cam_method("pgc-gradcam", masker, stage)(images)
    assert theirs.shape == (4, 1, 32, 32) and theirs.min() >= 0 and theirs.max() <= 1
    assert torch.equal(our_logits.argmax(1), their_logits.argmax(1))  # the same class
    assert (min_max(ours) - min_max(theirs)).abs().max() < 1e-5  # 2e-6 at most measured
    assert all(p.grad is None for p in masker.parameters())  # the package's backward undone


def outputs_of(module: torch.nn.Module, run) -> list:
    """What `module` outputs while `run()` runs."""
    seen = []
    hook = module.register_forward_hook(lambda module, args, output: seen.append(output))
    try:
        run()
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_finds_the_module_of_each_stage(arch):
    """The module a CAM hooks gives exactly the feature map eval's Grad-CAM reads."""
    encoder = build_encoder(arch, 3, width=8).eval()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        maps = encoder.feature_maps(images)
        for stage in (1, 2, 3, 4):
            seen = outputs_of(stage_layer(encoder, stage), lambda: encoder(images))
            assert len(seen) == 1 and seen[0].shape == maps[stage].shape
            assert seen[0].shape[-1] == 64 // 2 ** (stage + 1)  # strides 4, 8, 16, 32
            assert torch.equal(seen[0], maps[stage])
    with pytest.raises(ValueError, match="1-4"):
        stage_layer(encoder, 0)


def test_each_cam_is_scored_by_eval_with_its_cost(tiny_data, tmp_path, make_checkpoint):
    model = make_checkpoint(tmp_path / "casm" / "checkpoint.pt", tiny_data)
    out = tmp_path / "scores.json"
    args = ["eval", model, str(tiny_data), "--baseline", ",".join(NAMES)]
    args += ["--gradcam-stage", "3", "--limit", "6", "--workers", "0", "--json", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "ms /" in result.output  # the cost is a column of the table
    records = {"casm": json.loads(out.read_text())}
    records |= {n: json.loads((tmp_path / f"scores.{n}.json").read_text()) for n in NAMES}
    for name, record in records.items():
        assert name in result.output
        assert 0 <= record["LE"] <= 1 and 0 <= record["MaxBoxAccV2"] <= 1, name
        assert list(record)[-2:] == ["n_images", "ms_per_image"] and record["n_images"] == 6
        assert record["ms_per_image"] > 0, name  # its value: benchmarks/, never a timed test


def test_an_unknown_cam_is_one_line(tiny_data, tmp_path, make_checkpoint):
    model = make_checkpoint(tmp_path / "m" / "checkpoint.pt", tiny_data)
    result = runner.invoke(app, ["eval", model, str(tiny_data), "--baseline", "gradcampp"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "unknown --baseline gradcampp" in lines[0]
    assert all(name in lines[0] for name in CAMS)


@pytest.fixture(scope="module")
def exported(tiny_data, tmp_path_factory, make_exports):
    """A random-weight model exported to TorchScript: its file."""
    folder = tmp_path_factory.mktemp("exported")
    return make_exports(folder, tiny_data, formats=("torchscript",))["torchscript"]


@pytest.mark.parametrize("name", ["gradcam++", "eigencam"])
def test_a_cam_needs_a_checkpoint_first(name, tiny_data, exported):
    result = runner.invoke(app, ["eval", str(exported), str(tiny_data), "--baseline", name])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and f"--baseline {name}" in lines[0] and "checkpoint first" in lines[0]
    assert f"not the exported {exported}" in lines[0]
