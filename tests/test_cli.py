import json
import subprocess
import sys

import torch
from typer.testing import CliRunner

from casm_deploy.cli import app

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "train" in result.output and "data" in result.output
    train_help = runner.invoke(app, ["train", "--help"])
    assert "--reproduce" in train_help.output and "--resume" in train_help.output


def test_help_does_not_import_torch():
    code = "import sys; from casm_deploy.cli import app; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False"


def test_synth_command_is_idempotent_and_checks_options(tmp_path):
    out = tmp_path / "s"
    args = [
        "data",
        "synth",
        str(out),
        "--num-classes",
        "2",
        "--train-per-class",
        "2",
        "--val-per-class",
        "1",
        "--min-side",
        "32",
        "--max-side",
        "40",
        "--workers",
        "1",
    ]
    assert runner.invoke(app, args).exit_code == 0
    assert json.loads((out / "synth.json").read_text())["counts"] == {"train": 4, "val": 2}
    assert runner.invoke(app, args).exit_code == 0  # the same set again: nothing to do
    changed = runner.invoke(app, [*args, "--seed", "3"])
    assert changed.exit_code == 2 and "--overwrite" in changed.output
    bad = runner.invoke(app, ["data", "synth", str(tmp_path / "t"), "--copies", "3"])
    assert bad.exit_code == 2 and "copies" in bad.output
    clutter = runner.invoke(app, [*args[:3], "--right", "clutter"])
    assert clutter.exit_code == 2 and "--right clutter needs --copies 2" in clutter.output
    two = [*args[:2], str(tmp_path / "two"), *args[3:], "--copies", "2", "--right", "clutter"]
    assert runner.invoke(app, two).exit_code == 0
    assert json.loads((tmp_path / "two" / "synth.json").read_text())["config"]["right"] == "clutter"


def test_train_errors_are_one_line_not_tracebacks(tmp_path):
    missing = runner.invoke(app, ["train", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "nowhere" in missing.output
    assert "Traceback" not in missing.output
    preset = runner.invoke(app, ["train", str(tmp_path), "--reproduce", "X"])
    assert preset.exit_code == 2 and "--reproduce must be one of" in preset.output
    resize = runner.invoke(app, ["train", str(tmp_path), "--resize", "squash"])
    assert (
        resize.exit_code == 2
        and "--resize must be center-crop, stretch or random-resized-crop" in resize.output
    )


def test_train_smoke_on_a_tiny_data_set(tiny_data, tmp_path):
    args = [
        "train",
        str(tiny_data),
        "--out",
        str(tmp_path),
        "--name",
        "smoke",
        "--width",
        "8",
        "--image-size",
        "32",
        "--pretrain-epochs",
        "1",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--reproduce",
        "FL",
        "--score",
        "classification",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "centre box" in result.output  # the summary table
    checkpoint = torch.load(tmp_path / "smoke" / "checkpoint.pt", weights_only=True)
    assert checkpoint["config"]["reproduce"] == "FL"
    assert checkpoint["config"]["score"] == "classification"
    assert (tmp_path / "smoke" / checkpoint["pool_file"]).exists()  # FL keeps a pool


def test_eval_and_visualize_commands(tiny_data, tmp_path, make_checkpoint):
    model = make_checkpoint(tmp_path / "run" / "checkpoint.pt", tiny_data)
    scores = tmp_path / "scores.json"
    args = [
        "eval",
        model,
        str(tiny_data),
        "--baseline",
        "center,full",
        "--baseline",
        "gradcam",
        "--workers",
        "0",
        "--json",
        str(scores),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "gradcam" in result.output and scores.exists()
    assert (tmp_path / "scores.gradcam.json").exists()
    shown = runner.invoke(app, ["visualize", model, str(tiny_data), "--out", str(tmp_path / "v")])
    assert shown.exit_code == 0, shown.output
    assert (tmp_path / "v" / "grid.png").exists() and (tmp_path / "v" / "index.html").exists()


def test_eval_usage_errors(tiny_data, tmp_path):
    missing = runner.invoke(app, ["eval", str(tmp_path / "none.pt"), str(tiny_data)])
    assert missing.exit_code == 2 and "none.pt" in missing.output
    two_folders = runner.invoke(app, ["eval", str(tiny_data), str(tmp_path)])
    assert two_folders.exit_code == 2 and "one data folder" in two_folders.output


def test_eval_copies_needs_two_copies_data(tiny_data, tmp_path, make_checkpoint):
    model = make_checkpoint(tmp_path / "run" / "checkpoint.pt", tiny_data)
    result = runner.invoke(app, ["eval", model, str(tiny_data), "--copies", "--workers", "0"])
    assert result.exit_code == 2 and "exactly two boxes" in result.output
    assert "Traceback" not in result.output


def test_train_recipe_takes_the_options_given_beside_it(monkeypatch, tmp_path):
    import casm_deploy.training.train

    seen = []
    monkeypatch.setattr(casm_deploy.training.train, "run", seen.append)
    args = ["train", str(tmp_path), "--recipe", "imagenet", "--weights", "r50.pth"]
    result = runner.invoke(app, [*args, "--epochs", "3", "--fill", "black", "--lambda-r", "4"])
    assert result.exit_code == 0, result.output
    cfg = seen[0]
    assert (cfg.recipe, cfg.arch, cfg.image_size, cfg.batch_size) == (
        "imagenet",
        "resnet50",
        224,
        128,
    )
    assert (cfg.epochs, cfg.fill, cfg.area_weight) == (3, "black", 4.0)  # given: kept
    assert cfg.resize == "random-resized-crop" and cfg.weights == "r50.pth"
    default = runner.invoke(app, ["train", str(tmp_path), "--batch-size", "8"])
    assert default.exit_code == 0 and seen[1].batch_size == 8 and seen[1].recipe == "default"
    assert (seen[1].fill, seen[1].resize, seen[1].workers) == ("black", "center-crop", None)
    missing = runner.invoke(app, ["train", str(tmp_path), "--recipe", "imagenet"])
    assert missing.exit_code == 2 and "--weights" in missing.output


def test_the_options_are_the_config_fields_and_their_defaults(monkeypatch, tmp_path):
    """Each command's options come from its config: given only the required arguments, the
    command builds the config of the defaults; given an option, the field it names."""
    import dataclasses

    import casm_deploy.data.synth
    import casm_deploy.data.tinyimagenet
    import casm_deploy.deploy.export.job
    import casm_deploy.deploy.infer.job
    import casm_deploy.evaluation.benchmark
    import casm_deploy.evaluation.visualize
    from casm_deploy.config import (
        EvalConfig,
        ExportConfig,
        InferConfig,
        SynthConfig,
        TinyImagenetConfig,
        VisualizeConfig,
    )

    seen = []

    def job(cfg, *args, **kwargs):
        seen.append(cfg)
        return {"parity": {"passed": True}, "error": 0}

    for module, name in (
        (casm_deploy.data.synth, "generate"),
        (casm_deploy.data.tinyimagenet, "convert"),
        (casm_deploy.evaluation.benchmark, "run"),
        (casm_deploy.deploy.export.job, "run"),
        (casm_deploy.deploy.infer.job, "run"),
    ):
        monkeypatch.setattr(module, name, job)
    monkeypatch.setattr(casm_deploy.evaluation.visualize, "run", lambda cfg: job(cfg) and {})
    cases = [
        (["data", "synth"], SynthConfig()),
        (["data", "tiny-imagenet", "t.zip"], TinyImagenetConfig(src="t.zip")),
        (["eval", "m.pt"], EvalConfig(models=("m.pt",))),
        (["visualize", "m.pt"], VisualizeConfig(models=("m.pt",))),
        (["export", "c.pt"], ExportConfig(checkpoint="c.pt")),
        (["infer", str(tmp_path)], InferConfig(dir=str(tmp_path))),
    ]
    for args, expected in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
        assert seen.pop() == expected, args
    given = ["eval", "m.pt", str(tmp_path), "--batch", "8", "--baseline", "center, full"]
    assert (
        runner.invoke(app, [*given, "--baseline", "gradcam", "--classifiers", "a,b"]).exit_code == 0
    )
    assert seen.pop() == dataclasses.replace(
        EvalConfig(models=("m.pt",), data=str(tmp_path)),
        batch_size=8,
        baselines=("center", "full", "gradcam"),
        classifiers=("a", "b"),
    )
    assert (
        runner.invoke(app, ["export", "c.pt", "--parity-data", "d", "--no-torchscript"]).exit_code
        == 0
    )
    assert (seen[-1].data, seen[-1].torchscript) == ("d", False)
