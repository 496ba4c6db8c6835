"""Ordinary mistakes (an output path of the wrong kind, a number out of range) are one-line
errors with exit status 2, found before any work is done and before anything is written."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from casm_deploy.cli import app
from casm_deploy.common.paths import check_file, check_folder
from casm_deploy.config import MAX_VISUALIZE_IMAGES, VisualizeConfig
from casm_deploy.deploy.export import job as export
from casm_deploy.errors import UserError
from casm_deploy.evaluation import benchmark as evaluate
from casm_deploy.evaluation import methods, visualize
from casm_deploy.training import amp, train

runner = CliRunner()


class WorkStarted(Exception):
    """Raised by the first step of a command's work: the mistake was not caught before it."""


@pytest.fixture
def no_work(monkeypatch):
    """Make the first step of each command's work fail loudly."""

    def started(*args, **kwargs):
        raise WorkStarted

    monkeypatch.setattr(export, "load_checkpoint", started)
    monkeypatch.setattr(visualize, "load_maskers", started)
    monkeypatch.setattr(train, "lock_run_dir", started)
    monkeypatch.setattr(evaluate, "read_classes", started)


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def assert_usage_error(result, *named: str) -> None:
    """Exit 2, and one line that names each of `named`."""
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for text in named:
        assert text in lines[0], (text, lines[0])


def commands(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """Each command with an output path of the wrong kind: (arguments, the option named)."""
    model, data = str(tmp / "model.pt"), str(tmp / "data")
    a_file, a_folder = str(tmp / "a_file"), str(tmp / "a_folder")
    return {
        "export out is a file": (["export", model, "--out", a_file], "--out"),
        "export out under a file": (["export", model, "--out", f"{a_file}/x"], "--out"),
        "visualize out is a file": (["visualize", model, data, "--out", a_file], "--out"),
        "train out is a file": (["train", data, "--out", a_file], "--out"),
        "train run folder is a file": (
            ["train", data, "--out", a_folder, "--name", "x"],
            "run folder",
        ),
        "eval json is a folder": (["eval", model, data, "--json", a_folder], "--json"),
        "eval json under a file": (["eval", model, data, "--json", f"{a_file}/s.json"], "--json"),
    }


@pytest.mark.parametrize("case", list(commands(Path("."))))
def test_an_output_path_of_the_wrong_kind_is_refused_before_any_work(case, tmp_path, no_work):
    (tmp_path / "data").mkdir()
    (tmp_path / "a_file").write_text("mine\n")
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_folder" / "x").write_text("a file where the run folder would go\n")
    before = listing(tmp_path)
    args, option = commands(tmp_path)[case]
    result = runner.invoke(app, args)
    assert_usage_error(result, option)
    assert listing(tmp_path) == before
    assert (tmp_path / "a_file").read_text() == "mine\n"


@pytest.mark.parametrize(
    "args, named",
    [
        (["eval", "m.pt", "DATA", "--batch", "0"], "--batch must be at least 1, not 0"),
        (["eval", "m.pt", "DATA", "--batch", "-4"], "--batch must be at least 1, not -4"),
        (["eval", "m.pt", "DATA", "--limit", "-1"], "--limit must be at least 0, not -1"),
        (["eval", "m.pt", "DATA", "--workers", "-1"], "--workers must be at least 0"),
        (["visualize", "m.pt", "DATA", "--num-images", "5000"], "--num-images must be 1-64"),
        (["visualize", "m.pt", "DATA", "--num-images", "0"], "--num-images must be 1-64"),
        (["train", "DATA", "--lr-decay-every", "0"], "--lr-decay-every must be at least 1"),
        (["train", "DATA", "--smf", "0"], "--smf must be at least 1"),
        (["train", "DATA", "--epochs", "-1"], "--epochs must be at least 0"),
        (["train", "DATA", "--lr", "-0.1"], "--lr must be at least 0"),
        (["train", "DATA", "--momentum", "1"], "--momentum must be in [0, 1)"),
        (["train", "DATA", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["export", "m.pt", "--max-batch", "0"], "--max-batch must be at least 1"),
    ],
)
def test_a_number_out_of_range_is_refused_before_any_work(args, named, tmp_path, no_work):
    (tmp_path / "data").mkdir()
    args = [str(tmp_path / "data") if a == "DATA" else a for a in args]
    result = runner.invoke(app, args)
    assert_usage_error(result, named)
    assert listing(tmp_path) == ["data"]


def test_visualize_images_are_bounded_by_a_documented_maximum():
    assert MAX_VISUALIZE_IMAGES == 64  # the README and the --num-images help say 64
    VisualizeConfig(num_images=MAX_VISUALIZE_IMAGES)
    with pytest.raises(ValueError, match="--num-images must be 1-64, not 65"):
        VisualizeConfig(num_images=MAX_VISUALIZE_IMAGES + 1)


def test_check_folder(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    check_folder(tmp_path, "--out")  # exists
    check_folder(tmp_path / "new" / "deeper", "--out")  # can be made
    for folder, reason in (
        (a_file, "exists and is not a folder"),
        (a_file / "out", f"{a_file} is not a folder"),
        (dangling, "a dangling symbolic link"),
        (dangling / "out", f"{dangling} is not a folder"),
    ):
        with pytest.raises(UserError, match=re.escape(f"--out {folder}: {reason}")):
            check_folder(folder, "--out")
    assert listing(tmp_path) == ["a_file", "dangling"]  # nothing made


def test_check_file(tmp_path):
    (tmp_path / "old.json").write_text("")
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "old.json")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    check_file(tmp_path / "new.json", "--json")
    check_file(tmp_path / "old.json", "--json")  # replaced
    check_file(tmp_path / "new" / "s.json", "--json")  # its folder can be made
    for path, reason in (
        (tmp_path, "a folder"),
        (link, "a symbolic link"),
        (fifo, "not a regular file"),
        (tmp_path / "old.json" / "s.json", "is not a folder"),
    ):
        with pytest.raises(UserError, match=re.escape(f"--json {path}: ") + ".*" + reason):
            check_file(path, "--json")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_folder_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(UserError, match="is not writable"):
            check_folder(locked / "out", "--out")
        with pytest.raises(UserError, match="is not writable"):
            check_file(locked / "s.json", "--json")
    finally:
        locked.chmod(0o700)


def test_too_few_images_for_a_batch_names_the_option(tiny_data, tmp_path):
    """tiny_data has 72 training images: the error says so and which option to change."""
    out = tmp_path / "runs"
    base = ["train", str(tiny_data), "--out", str(out), "--width", "8", "--image-size", "32"]
    pretrain = runner.invoke(app, [*base, "--pretrain-batch-size", "100"])
    assert_usage_error(pretrain, "72 training images", "batch of 100", "--pretrain-batch-size")
    casm = runner.invoke(
        app, [*base, "--pretrain-epochs", "0", "--epoch-fraction", "0.5", "--batch-size", "64"]
    )
    assert_usage_error(
        casm, "72 training images, 36 of them per epoch", "pass a smaller --batch-size"
    )
    assert not out.exists() or listing(out) == []  # no run folder left behind


def test_bf16_warning_only_on_a_cpu_without_bf16_arithmetic(tmp_path):
    x86 = {"fpu", "sse2", "avx2", "avx512f"}
    assert "bfloat16" in amp.bf16_cpu_warning("bf16", "cpu", x86)
    assert amp.bf16_cpu_warning("bf16", "cpu", x86 | {"avx512_bf16"}) == ""
    assert amp.bf16_cpu_warning("bf16", "cpu", x86 | {"amx_bf16"}) == ""
    assert amp.bf16_cpu_warning("bf16", "cpu", {"fp", "asimd", "bf16"}) == ""  # Arm
    assert amp.bf16_cpu_warning("bf16", "cpu", None) == ""  # unknown: no guess
    assert amp.bf16_cpu_warning("bf16", "cuda", x86) == ""
    assert amp.bf16_cpu_warning("off", "cpu", x86) == ""
    assert len(amp.bf16_cpu_warning("bf16", "cpu", x86).splitlines()) == 1

    x86_info = tmp_path / "x86"
    x86_info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512_bf16\nprocessor\t: 1\n")
    arm_info = tmp_path / "arm"
    arm_info.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert amp.cpu_flags(x86_info) == {"fpu", "sse2", "avx512_bf16"}
    assert amp.cpu_flags(arm_info) == {"fp", "asimd", "bf16"}
    assert amp.cpu_flags(tmp_path / "missing") is None


def test_eval_warns_when_the_model_and_the_data_have_different_classes(
    tiny_data, tmp_path, make_checkpoint, make_small_synth
):
    """A 3-class model on data of other classes: one warning line before the scores, and OM
    only where it is defined (null in the JSON and '-' in the table when it is nowhere)."""
    model = make_checkpoint(tmp_path / "m.pt", tiny_data)  # disk, triangle, square
    for name, classes in (("mixed", ("square", "star")), ("other", ("star", "cross"))):
        make_small_synth(tmp_path / name, classes)

    base = ["eval", model, "--workers", "0", "--json"]
    mixed = runner.invoke(app, [*base, str(tmp_path / "mixed.json"), str(tmp_path / "mixed")])
    assert mixed.exit_code == 0, mixed.output
    warning = (
        "warning: m: 1 of the data's 2 classes are not the model's (OM leaves their images out); "
        "2 of its 3 classes are not in the data"
    )
    assert warning in mixed.output.splitlines()
    assert mixed.output.index(warning) < mixed.output.index("mixed (val")  # before the table
    assert json.loads((tmp_path / "mixed.json").read_text())["OM"] is not None  # of the squares

    other = runner.invoke(app, [*base, str(tmp_path / "other.json"), str(tmp_path / "other")])
    assert other.exit_code == 0, other.output
    assert "warning: m: 2 of the data's 2 classes are not the model's" in other.output
    scores = json.loads((tmp_path / "other.json").read_text())
    assert scores["OM"] is None
    rows = [line.split("│")[1:-1] for line in other.output.splitlines() if "│" in line]
    cells = next(row for row in rows if row[0].strip() == "m")
    assert [c.strip() for c in cells[1:3]] == [f"{scores['LE']:.3f}", "-"]  # LE, OM

    same = runner.invoke(app, ["eval", model, str(tiny_data), "--workers", "0"])
    assert same.exit_code == 0 and "warning" not in same.output
    assert methods.class_mismatch("m", ["a", "b"], ["b", "a"]) == ""
