"""The wrong file for a command, said in one line: an export where a checkpoint is wanted, a
torchvision state dict or pickled model where a casm-deploy model is wanted, a classifier whose
decoder was never trained; the demo model's note; export's progress bars."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from casm_deploy import artifact
from casm_deploy.artifact import base_metadata, sha256_file
from casm_deploy.checkpoint import (
    SYNTHETIC_NOTE,
    export_spec,
    load_checkpoint,
    load_masker,
    save_untrained,
    training_data_kind,
)
from casm_deploy.cli import app
from casm_deploy.config import TrainConfig
from casm_deploy.deploy.export import job as export
from casm_deploy.deploy.export import parity, precision
from casm_deploy.deploy.export.exporters import export_onnx, export_torchscript
from casm_deploy.deploy.runtime.masker import Masker
from casm_deploy.errors import UserError

SIZE = 32
runner = CliRunner()
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def files(tiny_data, tmp_path_factory):
    """A checkpoint of the tiny synthetic data (its config names the data), its ONNX and
    TorchScript exports, a torchvision ResNet-18 state dict and the whole pickled module."""
    import torchvision

    folder = tmp_path_factory.mktemp("wrong")
    checkpoint = folder / "runs" / "tiny" / "checkpoint.pt"
    wnids = (tiny_data / "classes.txt").read_text().split()[::2]
    names = (tiny_data / "classes.txt").read_text().split()[1::2]
    save_untrained(checkpoint, wnids, names, width=8, image_size=SIZE)
    state = torch.load(checkpoint, weights_only=True)
    state["config"] = {"data": str(tiny_data)}
    torch.save(state, checkpoint)
    masker, _ = load_masker(checkpoint)
    meta = {
        **base_metadata(export_spec(state, checkpoint), state["config"], sha256_file(checkpoint)),
        "precision": "fp32",
    }
    example = torch.rand(2, 3, SIZE, SIZE)
    export_onnx(masker, example, folder / "masker.onnx", 18, meta)
    export_torchscript(masker, example, folder / "masker.ts", meta)
    resnet = torchvision.models.resnet18(weights=None)
    torch.save(resnet.state_dict(), folder / "resnet18.pth")
    torch.save(resnet, folder / "resnet18-model.pt")
    return {
        "checkpoint": checkpoint,
        "onnx": folder / "masker.onnx",
        "ts": folder / "masker.ts",
        "weights": folder / "resnet18.pth",
        "pickled": folder / "resnet18-model.pt",
        "meta": meta,
    }


@pytest.fixture(scope="module")
def classifier(tiny_data, tmp_path_factory):
    """A real `train --classifier-only` run on the tiny synthetic data: its checkpoint."""
    from casm_deploy.training.train import run

    out = tmp_path_factory.mktemp("classifier")
    common = dict(data=str(tiny_data), out=str(out), width=8, image_size=SIZE, workers=0)
    common |= dict(batch_size=8, pretrain_batch_size=8, epoch_fraction=1.0)
    return run(TrainConfig(name="c", classifier_only=True, pretrain_epochs=1, **common)) / (
        "checkpoint.pt"
    )


def _one_line_error(result, path: Path) -> str:
    """The one `error:` line of a refused command (exit 2), which names the file."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "Warning" not in result.output and "weights_only" not in result.output
    errors = [line for line in result.output.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.output
    assert str(path) in errors[0]
    return errors[0]


def _infer(tiny_data, tmp_path, model, *args):
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    command = ["infer", str(tiny_data / "val"), "--model", str(model), "--out", str(out)]
    return runner.invoke(app, [*command, "--device", "cpu", *args])


# --- an export where a training checkpoint is wanted -------------------------------------------


@pytest.mark.parametrize("kind, label", [("ts", "TorchScript"), ("onnx", "ONNX")])
def test_export_of_an_exported_model_says_it_takes_a_checkpoint(files, tmp_path, kind, label):
    path = files[kind]
    result = runner.invoke(app, ["export", str(path), "--out", str(tmp_path / "x")])
    line = _one_line_error(result, path)
    assert f"this is an exported model ({label})" in line
    assert "export takes a training checkpoint, runs/<name>/checkpoint.pt" in line


def test_train_weights_of_an_exported_model_says_what_it_takes(files, tiny_data, tmp_path):
    path = files["ts"]
    args = ["train", str(tiny_data), "--weights", str(path), "--out", str(tmp_path / "runs")]
    line = _one_line_error(runner.invoke(app, args), path)
    assert "this is an exported model (TorchScript)" in line
    assert "--weights takes a torchvision state dict or a casm-deploy checkpoint" in line


def test_visualize_and_eval_classifiers_of_an_exported_model_say_what_it_is(
    files, tiny_data, tmp_path
):
    """eval scores exported files (tests/evaluation/test_eval_exported.py), but a classifier
    that judges masked images, and visualize's models, must be checkpoints."""
    for kind, label in (("ts", "TorchScript"), ("onnx", "ONNX")):
        path = files[kind]
        commands = {
            "eval": [str(files["checkpoint"]), "--classifiers", str(path), "--workers", "0"],
            "visualize": [str(path), "--out", str(tmp_path / "v")],
        }
        for command, options in commands.items():
            result = runner.invoke(app, [command, *options[:1], str(tiny_data), *options[1:]])
            line = _one_line_error(result, path)
            assert f"this is an exported model ({label})" in line
            assert "a training checkpoint, runs/<name>/checkpoint.pt" in line


def test_an_exported_model_is_told_apart_without_torch_warnings(files, recwarn):
    for kind in ("ts", "onnx"):
        with pytest.raises(UserError, match="this is an exported model"):
            load_checkpoint(files[kind])
    assert not [w for w in recwarn if "torch" in str(w.message).lower()]


# --- torchvision files ------------------------------------------------------------------------


def test_infer_of_torchvision_weights_says_train_takes_them(files, tiny_data, tmp_path):
    path = files["weights"]
    line = _one_line_error(_infer(tiny_data, tmp_path, path), path)
    assert "torchvision classifier's weights" in line and "train --weights" in line
    assert "an export (masker.onnx, masker.ts) or a casm-deploy training checkpoint" in line
    with pytest.raises(UserError, match="torchvision classifier's weights"):
        Masker.load(path, device="cpu")
    exported = runner.invoke(app, ["export", str(path), "--out", str(tmp_path / "x")])
    assert "export takes a training checkpoint" in _one_line_error(exported, path)


def test_export_of_a_pickled_torchvision_model_says_what_to_pass(files, tmp_path):
    path = files["pickled"]
    result = runner.invoke(app, ["export", str(path), "--out", str(tmp_path / "x")])
    line = _one_line_error(result, path)
    assert "a whole pickled model (torchvision.models.resnet.ResNet" in line
    assert "model.state_dict()" in line and "train --weights" in line
    assert "export takes a training checkpoint" in line
    assert "add_safe_globals" not in line and "safe_globals" not in line


def test_an_export_under_a_checkpoint_suffix_is_named_for_infer(files, tiny_data, tmp_path):
    renamed = tmp_path / "masker.pt"
    shutil.copyfile(files["ts"], renamed)
    line = _one_line_error(_infer(tiny_data, tmp_path, renamed), renamed)
    assert "exported model (TorchScript)" in line and "name it .ts" in line


# --- a classifier whose decoder was never trained ----------------------------------------------


def test_infer_and_export_refuse_a_classifier_only_checkpoint(classifier, tiny_data, tmp_path):
    line = _one_line_error(_infer(tiny_data, tmp_path, classifier), classifier)
    assert "its mask decoder was never trained (a --classifier-only run)" in line
    assert f"--weights {classifier} --pretrain-epochs 0" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))
    with pytest.raises(UserError, match="never trained"):
        Masker.load(classifier, device="cpu")
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(classifier), "--out", str(out)])
    assert "never trained" in _one_line_error(result, classifier)
    assert not any(out.glob("masker.*")) and not (out / "export.json").exists()


def test_a_run_stopped_in_pretraining_is_refused_by_infer(files, tiny_data, tmp_path):
    state = torch.load(files["checkpoint"], weights_only=True)
    for phase, epoch in (("pretrain", 1), ("casm", 0)):
        path = tmp_path / f"{phase}.pt"
        torch.save({**state, "phase": phase, "epoch": epoch}, path)
        line = _one_line_error(_infer(tiny_data, tmp_path, path), path)
        assert "not trained yet" in line and "train --resume" in line
    done = tmp_path / "done.pt"
    torch.save({**state, "phase": "casm", "epoch": 1}, done)  # one CASM epoch: a mapping
    assert _infer(tiny_data, tmp_path, done).exit_code == 0


def test_eval_still_takes_a_classifier_for_its_classifiers_and_gradcam(
    classifier, files, tiny_data, tmp_path
):
    judged = runner.invoke(
        app,
        ["eval", str(files["checkpoint"]), str(tiny_data), "--classifiers", str(classifier)]
        + ["--workers", "0"],
    )
    assert judged.exit_code == 0, judged.output
    gradcam = runner.invoke(
        app, ["eval", str(classifier), str(tiny_data), "--baseline", "gradcam", "--workers", "0"]
    )
    assert gradcam.exit_code == 0, gradcam.output
    assert "gradcam" in gradcam.output


# --- the demo model: trained on synthetic shapes -----------------------------------------------


def test_train_records_the_kind_of_data(classifier):
    checkpoint = load_checkpoint(classifier)
    assert checkpoint["model"]["data_kind"] == "synthetic"
    assert training_data_kind(checkpoint, classifier) == "synthetic"


def test_training_data_kind_of_older_checkpoints(files, tiny_data, tmp_path):
    state = load_checkpoint(files["checkpoint"])  # no data_kind: made by save_untrained
    assert "data_kind" not in state["model"]
    assert training_data_kind(state) == "synthetic"  # its config's data has a synth.json
    photos = tmp_path / "photos"
    photos.mkdir()
    real = {"wnids": ["n01440764", "n01443537"], "names": ["tench", "goldfish"]}
    assert training_data_kind({"model": real, "config": {"data": str(photos)}}) == "images"
    assert training_data_kind({"model": real, "config": {}}) == ""
    # the data folder is gone: the synth class ids still tell
    gone = {"model": state["model"], "config": {"data": str(tmp_path / "gone")}}
    assert training_data_kind(gone) == "synthetic"
    assert files["meta"]["training_data"] == "synthetic"


def _notes(output: str) -> list[str]:
    return [line for line in output.splitlines() if "synthetic shapes" in line]


@pytest.mark.parametrize("kind", ["checkpoint", "onnx", "ts"])
def test_infer_notes_once_that_a_synthetic_model_means_nothing_on_photos(
    files, tiny_data, tmp_path, kind
):
    result = _infer(tiny_data, tmp_path, files[kind])
    assert result.exit_code == 0, result.output
    [note] = _notes(result.output)
    assert note.startswith("note: this model was trained on casm-deploy's synthetic shapes")
    assert "README 'Using real ImageNet'" in note


def test_the_api_notes_it_and_says_it_in_info(files, capsys):
    masker = Masker.load(files["onnx"], device="cpu")
    assert masker.info.training_data == "synthetic"
    assert SYNTHETIC_NOTE in masker.backend.notices
    assert len(_notes(capsys.readouterr().out)) == 1


def test_an_older_export_of_synth_classes_is_noted_too(files, tiny_data, tmp_path):
    meta = {k: v for k, v in files["meta"].items() if k != "training_data"}
    path = tmp_path / "old" / "masker.onnx"
    path.parent.mkdir()
    shutil.copyfile(files["onnx"], path)
    artifact.write_onnx_metadata(path, meta)
    result = _infer(tiny_data, tmp_path, path)
    assert result.exit_code == 0, result.output
    assert len(_notes(result.output)) == 1


def test_no_note_for_a_model_of_real_photos(tiny_data, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    path = tmp_path / "real.pt"
    save_untrained(path, ["n01440764", "n01443537"], ["tench", "goldfish"], width=8)
    state = torch.load(path, weights_only=True)
    state["config"] = {"data": str(photos)}
    torch.save(state, path)
    masker = Masker.load(path, device="cpu")
    assert masker.info.training_data == "images"
    assert not _notes(capsys.readouterr().out)
    assert base_metadata(export_spec(state, path), {}, "0" * 64)["training_data"] == "images"


# --- export's progress ------------------------------------------------------------------------


def test_int8_calibration_and_parity_report_progress(files, tmp_path):
    batches = [np.random.default_rng(i).random((4, 3, SIZE, SIZE), np.float32) for i in range(3)]
    calls = []
    int8 = tmp_path / "int8.onnx"
    precision.quantize_int8(files["onnx"], int8, batches, files["meta"], lambda: calls.append(1))
    assert len(calls) == len(batches)

    masker, _ = load_masker(files["checkpoint"])
    images = np.concatenate(batches)
    written = {"onnx": {"path": int8, "precision": "int8"}}
    seen = []
    source = {"real": len(images), "data": "x", "val": len(images), "train": 0, "random": 0}
    parity.check_parity(masker, written, images, source, torch.device("cpu"), seen.append)
    assert sum(seen) == len(images) * (1 + len(parity.BATCH_SIZES))


def test_export_int8_shows_calibration_and_parity_bars(files, monkeypatch, tmp_path):
    shown = []
    real = export.progress

    def recording(**kwargs):
        bars = real(**kwargs)
        add = bars.add_task

        def add_task(description, **fields):
            shown.append((description, fields["total"]))
            return add(description, **fields)

        bars.add_task = add_task
        return bars

    monkeypatch.setattr(export, "progress", recording)
    out = tmp_path / "int8"
    args = ["export", str(files["checkpoint"]), "--precision", "int8", "--no-torchscript"]
    result = runner.invoke(app, [*args, "--out", str(out), "--calibration-images", "16"])
    report = json.loads((out / "export.json").read_text())
    assert result.exit_code in (0, 3), result.output  # a random decoder may fail int8's bars
    images = report["parity"]["images"]
    total = images["real"] + images["random"]
    assert shown == [("int8 calibration", 1), ("parity with eager fp32", total * 4)]
