"""What `train` does with the files around it: training images that do not decode (an error
naming the file, or --skip-bad-images), the temporaries that a kill leaves in the run folder,
the folder's lock, and --resume before the first checkpoint."""

import dataclasses
import json
import os
import shutil
import time

import pytest
from typer.testing import CliRunner

from casm_deploy.checkpoint import load_checkpoint
from casm_deploy.cli import app
from casm_deploy.config import TrainConfig, config_to_dict
from casm_deploy.data.imagenet import read_classes
from casm_deploy.data.loader import build_loader
from casm_deploy.errors import UserError
from casm_deploy.training import train

TINY = dict(
    width=8,
    image_size=32,
    pretrain_epochs=1,
    epochs=1,
    batch_size=8,
    pretrain_batch_size=8,
    workers=0,
    epoch_fraction=1.0,
)
TINY_ARGS = [
    "--width", "8", "--image-size", "32", "--pretrain-epochs", "1", "--epochs", "1",
    "--batch-size", "8", "--pretrain-batch-size", "8", "--workers", "0",
    "--epoch-fraction", "1.0",
]  # fmt: skip


@pytest.fixture
def bad_data(tiny_data, tmp_path):
    """A copy of the tiny data set whose fourth training image of the first class is garbage."""
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    wnid = read_classes(root).wnids[0]
    bad = sorted((root / "train" / wnid).iterdir())[3]
    bad.write_bytes(b"this is not a JPEG" * 20)
    return root, bad


# Training images that do not decode ----------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_training_image_is_one_line_naming_it(bad_data, workers):
    root, bad = bad_data
    wnids = read_classes(root).wnids
    loader = build_loader(root, "train", wnids, 32, 8, train=True, workers=workers)
    with pytest.raises(UserError) as caught:
        list(loader)
    assert str(caught.value) == f"{bad}: cannot decode image"  # not the worker's traceback


@pytest.mark.parametrize("workers", [0, 2])
def test_skipped_images_are_replaced_and_listed(bad_data, workers):
    root, bad = bad_data
    wnids = read_classes(root).wnids
    loader = build_loader(root, "train", wnids, 32, 8, train=True, workers=workers, skip_bad=True)
    bad_index = [path for path, _ in loader.samples].index(bad)
    batches = list(loader)
    assert len(batches) == len(loader) == 72 // 8
    assert all(len(indices) == 8 for _, _, indices in batches)  # batches keep their size
    served = [i for _, _, indices in batches for i in indices.tolist()]
    assert bad_index not in served and served.count(bad_index + 1) == 2  # its replacement
    assert loader.bad_files == [f"{bad}: cannot decode image"]


def test_validation_images_are_never_skipped(bad_data, tmp_path):
    root, _ = bad_data
    val_image = sorted((root / "val" / read_classes(root).wnids[0]).iterdir())[0]
    val_image.write_bytes(b"garbage")
    cfg = TrainConfig(data=str(root), out=str(tmp_path), name="v", skip_bad_images=True, **TINY)
    with pytest.raises(UserError) as caught:
        train.run(dataclasses.replace(cfg, workers=2))
    assert str(caught.value) == f"{val_image}: cannot decode image"


def test_the_cli_names_the_bad_file_in_one_line_and_skips_it_when_asked(bad_data, tmp_path):
    root, bad = bad_data
    runner = CliRunner()
    command = ["train", str(root), "--out", str(tmp_path / "runs"), *TINY_ARGS, "--workers", "1"]
    failed = runner.invoke(app, [*command, "--name", "strict"])
    assert failed.exit_code == 2
    assert f"error: {bad}: cannot decode image" in failed.output.splitlines()
    assert "Traceback" not in failed.output and "worker" not in failed.output

    skipped = runner.invoke(app, [*command, "--name", "skip", "--skip-bad-images"])
    assert skipped.exit_code == 0, skipped.output
    assert "skipped 1 bad image" in skipped.output  # each epoch's printed line
    log = tmp_path / "runs" / "skip" / "metrics.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    epochs = [r for r in records if r["phase"] != "baseline"]
    assert [r["phase"] for r in epochs] == ["pretrain", "casm"]
    for record in epochs:
        assert record["train_skipped"] == 1
        assert record["train_skipped_files"] == [f"{bad}: cannot decode image"]


def test_dali_cannot_skip_and_auto_falls_back_to_torch(bad_data):
    from casm_deploy.data.torch_loader import TorchLoader

    root, _ = bad_data
    wnids = read_classes(root).wnids
    args = (root, "train", wnids, 32, 8)
    with pytest.raises(UserError, match="--loader dali cannot skip bad images"):
        build_loader(*args, train=True, loader="dali", skip_bad=True)
    assert isinstance(build_loader(*args, train=True, loader="auto", skip_bad=True), TorchLoader)


def test_dali_names_the_file_it_cannot_decode(bad_data):
    pytest.importorskip("nvidia.dali")
    root, bad = bad_data
    wnids = read_classes(root).wnids
    loader = build_loader(root, "train", wnids, 32, 8, train=True, loader="dali")
    with pytest.raises(UserError) as caught:
        list(loader)
    assert str(caught.value) == f"{bad}: cannot decode image"


# The run folder: temporaries, lock, --resume -------------------------------------------------

# Names as files.atomic_file makes them (checkpoint.save_atomic, train._trim_log), as earlier
# versions made them (tempfile.mkstemp, metrics.tmp), and some that are not ours.
TEMPORARIES = [".checkpoint.pt.partial", ".pool-12.pt.partial", ".metrics.jsonl.partial"]
TEMPORARIES += [".checkpoint.pt.k2j4_x9a.tmp", ".pool-12.pt.abcd1234.tmp", "metrics.tmp"]
NOT_OURS = ["notes.tmp", ".config.json.q1w2e3r4.tmp", ".notes.txt.partial"]


def temporaries(run_dir):
    return sorted(p.name for p in run_dir.iterdir() if p.name.endswith((".tmp", ".partial")))


def plant(run_dir, names):
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        (run_dir / name).write_bytes(b"\0" * 1000)


def test_stale_temporaries_are_removed_at_start_and_at_resume(tiny_data, tmp_path):
    cfg = TrainConfig(data=str(tiny_data), out=str(tmp_path), name="t", **TINY)
    run_dir = tmp_path / "t"
    plant(run_dir, TEMPORARIES + NOT_OURS)
    train.run(cfg)
    assert temporaries(run_dir) == sorted(NOT_OURS)

    plant(run_dir, TEMPORARIES)
    train.run(TrainConfig(data=str(tiny_data), out=str(tmp_path), name="t", resume=True))
    assert temporaries(run_dir) == sorted(NOT_OURS)


def test_a_run_in_a_locked_folder_is_refused(tiny_data, tmp_path):
    lock = train.lock_run_dir(tmp_path / "busy")  # as a run going on there holds it
    assert lock is not None
    try:
        plant(tmp_path / "busy", TEMPORARIES)
        cfg = TrainConfig(data=str(tiny_data), out=str(tmp_path), name="busy", resume=True)
        with pytest.raises(UserError, match="another training run is using this folder"):
            train.run(cfg)
        assert all((tmp_path / "busy" / name).exists() for name in TEMPORARIES)  # its writes
    finally:
        lock.close()
    assert train.lock_run_dir(tmp_path / "busy") is not None  # free again once closed


def test_without_a_lock_only_old_temporaries_are_removed(tmp_path):
    plant(tmp_path, TEMPORARIES)
    old = tmp_path / TEMPORARIES[0]
    an_hour_and_more = time.time() - train.STALE_SECONDS - 60
    os.utime(old, (an_hour_and_more, an_hour_and_more))
    train.remove_temporaries(tmp_path, locked=False)
    assert not old.exists() and all((tmp_path / name).exists() for name in TEMPORARIES[1:])


def test_resume_before_the_first_checkpoint_starts_the_run(tiny_data, tmp_path, capsys):
    # Killed before its first checkpoint: the folder has its config.json and nothing else.
    cfg = TrainConfig(data=str(tiny_data), out=str(tmp_path), name="early", **TINY)
    run_dir = tmp_path / "early"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    flags_now = TrainConfig(data=str(tiny_data), out=str(tmp_path), name="early", resume=True)
    train.run(flags_now)
    printed = " ".join(capsys.readouterr().out.split())  # as rich wrapped it
    assert f"{run_dir}: no checkpoint to resume yet; starting the run afresh" in printed
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    assert checkpoint["phase"] == "done"
    assert checkpoint["config"]["width"] == 8  # the settings it started with, not the defaults

    # Nothing at all there yet: --resume starts the run with the flags given.
    train.run(dataclasses.replace(cfg, name="never", resume=True))
    assert load_checkpoint(tmp_path / "never" / "checkpoint.pt")["phase"] == "done"


def test_a_run_refused_at_the_start_leaves_no_folder(tmp_path):
    cfg = TrainConfig(data=str(tmp_path / "nowhere"), out=str(tmp_path / "runs"), name="x")
    with pytest.raises(UserError, match="no such data folder"):
        train.run(cfg)
    assert not (tmp_path / "runs" / "x").exists()
