"""Model files at load: what a TorchScript file may do, pinned and recorded digests, and
metadata, graphs and checkpoints checked in full, each mistake one line naming the file."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from casm_deploy.artifact import (
    METADATA_FILE,
    base_metadata,
    check_torchscript_graphs,
    load_torchscript,
    read_metadata,
    sha256_file,
    write_onnx_metadata,
)
from casm_deploy.checkpoint import (
    FORMAT,
    VERSION,
    export_spec,
    load_checkpoint,
    load_masker,
    save_untrained,
)
from casm_deploy.cli import app
from casm_deploy.deploy.export.exporters import export_torchscript
from casm_deploy.deploy.export.precision import DTYPES, HalfMasker
from casm_deploy.deploy.runtime.masker import Masker
from casm_deploy.deploy.runtime.open import open_model
from casm_deploy.errors import UserError

SIZE = 64
runner = CliRunner()
# torch.jit.* are marked deprecated; these tests write TorchScript on purpose
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def models(make_exports, tiny_data, tmp_path_factory):
    """A tiny random mapping at 64 px: its checkpoint, ONNX and TorchScript files, metadata."""
    files = make_exports(tmp_path_factory.mktemp("models"), tiny_data, SIZE)
    return {
        "checkpoint": files["eager"],
        "onnx": files["onnx"],
        "ts": files["torchscript"],
        "meta": read_metadata(files["onnx"]),
        "state": load_checkpoint(files["eager"]),
    }


def _infer(tiny_data, tmp_path, model, *args):
    """`casm-deploy infer` on the tiny data's val images; the result and its output."""
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    command = ["infer", str(tiny_data / "val"), "--model", str(model), "--out", str(out)]
    return runner.invoke(app, [*command, "--device", "cpu", *args])


def _refused_in_one_line(result, name: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and name in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


# --- TorchScript is a program -----------------------------------------------------------------


class FileWriter(nn.Module):
    """A masker-shaped module whose forward creates (and maps) a file of its choice."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        written = torch.from_file(self.target, True, 16)  # shared=True: creates the file
        return images[:, :1], images.mean((2, 3)) + written.sum()


class LoadTimeWriter(nn.Module):
    """The same in `__setstate__`, which torch.jit.load itself runs."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.weight = torch.zeros(1)

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor]:
        return (self.target, self.weight)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor]) -> None:
        self.training = False
        self.target = state[0]
        self.weight = torch.from_file(self.target, True, 16)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images[:, :1], images.mean((2, 3))


class ImageReader(nn.Module):
    """An operator of another namespace (torchvision's image::read_file), reading a file."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        data = torch.ops.image.read_file(self.target)
        return images[:, :1], images.mean((2, 3)) + data.sum()


def _scripted(module: nn.Module, path: Path, meta: dict[str, str]) -> Path:
    scripted = torch.jit.script(module)
    torch.jit.save(scripted, str(path), _extra_files={METADATA_FILE: json.dumps(meta)})
    return path


@pytest.mark.parametrize("kind", [FileWriter, LoadTimeWriter])
def test_torchscript_that_writes_files_is_refused_before_it_runs(kind, models, tiny_data, tmp_path):
    target = tmp_path / "planted"
    evil = _scripted(kind(str(target)), tmp_path / "evil.ts", models["meta"])
    assert read_metadata(evil)["format"] == "casm-deploy/masker"  # it looks like an export
    with pytest.raises(UserError, match=r"evil.ts: refused: .*aten::from_file"):
        Masker.load(evil, device="cpu")
    line = _refused_in_one_line(_infer(tiny_data, tmp_path, evil), "evil.ts")
    assert "aten::from_file" in line and "program" in line
    assert not target.exists()
    assert not (tmp_path / "out" / "boxes.jsonl").exists()


def test_infer_help_says_torchscript_is_a_program():
    help_text = " ".join(runner.invoke(app, ["infer", "--help"]).output.split())
    assert "TorchScript file is a program" in help_text.replace("│ ", "")
    assert "--expect-sha256" in help_text


def test_operators_of_other_namespaces_are_refused(models, tmp_path):
    target = tmp_path / "secret.bin"
    target.write_bytes(b"x")
    reader = _scripted(ImageReader(str(target)), tmp_path / "reader.ts", models["meta"])
    with pytest.raises(UserError, match=r"reader.ts: refused: .*image:: operators"):
        open_model(reader, device="cpu")


def test_the_loaded_graphs_are_checked_too(tmp_path):
    # What the code check would refuse before the load, the graph check refuses after it (on
    # every method: a name it missed in the text would still be a node).
    for kind, operator in ((FileWriter, "aten::from_file"), (ImageReader, "image::read_file")):
        module = torch.jit.script(kind(str(tmp_path / "x")))
        with pytest.raises(UserError, match=f"m.ts: refused: .*{operator}"):
            check_torchscript_graphs(module, Path("m.ts"))
    setstate = torch.jit.script(LoadTimeWriter(str(tmp_path / "x")))
    with pytest.raises(UserError, match="aten::from_file"):
        check_torchscript_graphs(setstate, Path("m.ts"))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_our_own_exports_pass_the_inspection(arch, precision, tiny_data, tmp_path):
    from casm_deploy.data.imagenet import read_classes

    info = read_classes(tiny_data)
    path = Path(
        save_untrained(
            tmp_path / "c.pt", info.wnids, info.names, arch=arch, width=8, image_size=SIZE
        )
    )
    masker, _ = load_masker(path)
    model = masker if precision == "fp32" else HalfMasker(masker, DTYPES[precision])
    meta = {
        **base_metadata(
            export_spec(state := load_checkpoint(path), path), state["config"], sha256_file(path)
        ),
        "precision": precision,
    }
    export_torchscript(model.eval(), torch.rand(2, 3, SIZE, SIZE), tmp_path / "m.ts", meta)
    load_torchscript(tmp_path / "m.ts", torch.device("cpu"))  # no refusal
    masks, logits = open_model(tmp_path / "m.ts", device="cpu")(
        torch.zeros(2, SIZE, SIZE, 3, dtype=torch.uint8).numpy()
    )
    assert masks.shape == (2, SIZE, SIZE) and logits.shape == (2, 3)


# --- digests ----------------------------------------------------------------------------------


def test_expect_sha256_pins_the_file_before_it_is_read(models, tiny_data, tmp_path):
    path = models["onnx"]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert open_model(path, device="cpu", expect_sha256=digest.upper()).info.sha256 == digest
    other = "0" * 64
    with pytest.raises(UserError, match=f"masker.onnx: refused: .*{digest}.*{other}"):
        Masker.load(path, device="cpu", expect_sha256=other)
    with pytest.raises(UserError, match="not a SHA-256"):
        open_model(path, device="cpu", expect_sha256="abc")
    # compared before anything is parsed: a file that is no model fails on its digest
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx")
    with pytest.raises(UserError, match="junk.onnx: refused: its SHA-256"):
        open_model(junk, device="cpu", expect_sha256=other)
    line = _refused_in_one_line(
        _infer(tiny_data, tmp_path, path, "--expect-sha256", other), "masker.onnx"
    )
    assert digest in line and other in line


def test_a_file_changed_after_export_is_refused(models, tiny_data, tmp_path):
    """Exported files are accepted beside their export.json, and refused once changed."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    checkpoint.parent.mkdir()
    state = dict(models["state"], config={"data": str(data)})
    torch.save(state, checkpoint)
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(checkpoint), "--out", str(out), "--onnx"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "export.json").read_text())
    for name in ("masker.onnx", "masker.ts"):
        entry = next(f for f in report["files"].values() if f["file"] == name)
        assert entry["sha256"] == sha256_file(out / name)
        open_model(out / name, device="cpu")  # what export writes, infer accepts
        _relabel(out / name)  # still a valid model, but not the one exported
        with pytest.raises(UserError, match=f"{name}: refused: .*changed after export"):
            open_model(out / name, device="cpu")
    _refused_in_one_line(_infer(tiny_data, tmp_path, out / "masker.onnx"), "masker.onnx")
    shutil.copy(out / "masker.ts", tmp_path / "elsewhere.ts")  # no export.json beside it
    open_model(tmp_path / "elsewhere.ts", device="cpu")


def _relabel(path: Path) -> None:
    """Rewrite a model file's metadata with other class names."""
    meta = {**read_metadata(path), "names": json.dumps(["x", "y", "z"])}
    if path.suffix == ".onnx":
        write_onnx_metadata(path, meta)
        return
    module = torch.jit.load(str(path))
    torch.jit.save(module, str(path), _extra_files={METADATA_FILE: json.dumps(meta)})


# --- metadata, graphs and checkpoints, checked at load ----------------------------------------


def _onnx_with(models, tmp_path, name: str, **changes) -> Path:
    """A copy of the ONNX export whose metadata has `changes` (None: the key removed)."""
    meta = {**models["meta"], **changes}
    meta = {k: v for k, v in meta.items() if v is not None}
    path = tmp_path / name
    shutil.copy(models["onnx"], path)
    write_onnx_metadata(path, meta)
    return path


@pytest.mark.parametrize(
    "changes,says",
    [
        ({"image_size": None}, "has no 'image_size'"),
        ({"num_classes": None}, "has no 'num_classes'"),
        ({"image_size": "big"}, "image_size 'big' is not a positive integer"),
        ({"num_classes": "0"}, "num_classes '0' is not a positive integer"),
        ({"wnids": '["n1"]'}, "wnids lists 1 classes, not 3"),
        ({"names": "{not json"}, "names is not a JSON list of strings"),
        ({"precision": "fp8"}, "precision 'fp8'"),
        ({"image_size": "32"}, r"input 'images' is tensor\(float\) \['batch', 3, 64, 64\]"),
        ({"num_classes": "5", "wnids": "[]", "names": "[]"}, r"output 'logits' .*classes 5"),
    ],
)
def test_onnx_metadata_and_graph_are_checked(models, tmp_path, changes, says):
    path = _onnx_with(models, tmp_path, "bad.onnx", **changes)
    with pytest.raises(UserError, match=f"bad.onnx: .*{says}"):
        open_model(path, device="cpu")


def test_torchscript_metadata_is_checked(models, tiny_data, tmp_path):
    module = torch.jit.load(str(models["ts"]))
    meta = {k: v for k, v in models["meta"].items() if k != "num_classes"}
    path = tmp_path / "bad.ts"
    torch.jit.save(module, str(path), _extra_files={METADATA_FILE: json.dumps(meta)})
    line = _refused_in_one_line(_infer(tiny_data, tmp_path, path), "bad.ts")
    assert "has no 'num_classes'" in line


class WrongShapes(nn.Module):
    """A module of the right form whose logits have 5 classes (its metadata says 3)."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images[:, :1], images.mean((2, 3)).repeat(1, 2)[:, :5]


def test_a_model_that_does_not_fit_its_metadata_fails_at_load(models, tiny_data, tmp_path):
    path = _scripted(WrongShapes(), tmp_path / "shapes.ts", models["meta"])
    line = _refused_in_one_line(_infer(tiny_data, tmp_path, path), "shapes.ts")
    assert "(1, 5)" in line and "logits (1, 3)" in line
    assert not (tmp_path / "out" / "boxes.jsonl").exists()
    # a graph fixed at 64 px, described as 32 px: ONNX Runtime's refusal, in one line
    small = _onnx_with(models, tmp_path, "small.onnx", image_size="32")
    line = _refused_in_one_line(_infer(tiny_data, tmp_path, small), "small.onnx")
    assert "image_size 32" in line


def _checkpoint_with(models, tmp_path, change) -> Path:
    state = {k: dict(v) if isinstance(v, dict) else v for k, v in models["state"].items()}
    change(state)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    return path


def _drop(mapping: dict, key: str) -> None:
    del mapping[key]


@pytest.mark.parametrize(
    "change,says",
    [
        (lambda s: _drop(s, "decoder"), "'decoder' weights are missing or empty"),
        (lambda s: _drop(s, "model"), "has no 'model' description"),
        (lambda s: _drop(s["model"], "arch"), "model description has no 'arch'"),
        (lambda s: s["model"].update(image_size="64"), "model image_size '64' is not an integer"),
        (lambda s: s["model"].update(arch="vgg11"), "model arch 'vgg11' is not one of"),
        (lambda s: s["model"].update(wnids=["a"]), "model wnids lists 1 classes, not 3"),
        (lambda s: s.update(encoder={}), "'encoder' weights are missing or empty"),
        (lambda s: _drop(s["encoder"], "conv1.weight"), "lack key 'conv1.weight'"),
        (lambda s: s["decoder"].update(extra=torch.zeros(1)), "unexpected key 'extra'"),
        (
            lambda s: s["decoder"].update({"final.bias": torch.zeros(2)}),
            "'decoder' weights do not fit the model \\(size mismatch for final.bias",
        ),
        (lambda s: s["model"].update(num_classes=5, wnids=[], names=[]), "size mismatch for fc"),
    ],
)
def test_checkpoints_are_checked_key_by_key(models, tmp_path, change, says):
    path = _checkpoint_with(models, tmp_path, change)
    with pytest.raises(UserError, match=f"bad.pt: .*{says}"):
        open_model(path, device="cpu")


def test_a_bad_checkpoint_is_one_line_in_infer_and_export(models, tiny_data, tmp_path):
    path = _checkpoint_with(models, tmp_path, lambda s: _drop(s["encoder"], "fc.bias"))
    assert "lack key 'fc.bias'" in _refused_in_one_line(_infer(tiny_data, tmp_path, path), "bad.pt")
    exported = runner.invoke(app, ["export", str(path), "--out", str(tmp_path / "x")])
    assert "lack key 'fc.bias'" in _refused_in_one_line(exported, "bad.pt")
    plain = tmp_path / "plain.pt"
    torch.save({"format": FORMAT, "version": VERSION}, plain)
    with pytest.raises(UserError, match="plain.pt: the checkpoint has no 'model'"):
        load_masker(plain)
