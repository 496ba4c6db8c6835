"""The run's state is saved whole and restored whole: the checkpoint's keys stay the schema's,
and a run stopped after an epoch and resumed (from its own checkpoint, or from one that lacks
the optional keys older versions did not write) ends exactly where an uninterrupted run ends."""

import json

import pytest
import torch

from casm_deploy.config import TrainConfig
from casm_deploy.training import train

TINY = dict(
    width=8,
    image_size=32,
    pretrain_epochs=1,
    epochs=2,
    batch_size=8,
    pretrain_batch_size=8,
    workers=0,
    epoch_fraction=1.0,
    reproduce="L100",
    smf=3,  # several snapshots, drawn with hp = 0.5
)
KEYS = [
    "format", "version", "package_version", "model", "config", "phase", "epoch", "step",
    "encoder", "decoder", "mapping_encoder", "optimizers", "pool_file", "rng", "metrics",
]  # fmt: skip
MODEL_KEYS = [
    "arch", "width", "num_classes", "upsample", "image_size", "wnids", "names",
    "shared_encoder", "data_kind",
]  # fmt: skip


class Stop(Exception):
    pass


def logged(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("seconds", None)
    return records


@pytest.fixture(scope="module")
def whole(tiny_data, tmp_path_factory):
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("whole")
    return train.run(TrainConfig(data=str(tiny_data), out=str(out), name="whole", **TINY))


def stopped_run(tiny_data, out, monkeypatch):
    """A run stopped at the end of its second epoch (pre-training and CASM 1 saved)."""
    evaluate, calls = train.evaluate, []

    def stop_at_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Stop
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", stop_at_the_third)
    with pytest.raises(Stop):
        train.run(TrainConfig(data=str(tiny_data), out=str(out), name="cut", **TINY))
    monkeypatch.setattr(train, "evaluate", evaluate)
    return out / "cut"


def assert_same_end(a, b):
    end, expected = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (a, b))
    assert end["phase"] == expected["phase"] == "done" and end["step"] == expected["step"]
    for part in ("encoder", "decoder"):
        for key, value in expected[part].items():
            assert torch.equal(end[part][key], value), (part, key)
    assert logged(a) == logged(b)


def test_the_checkpoint_holds_the_schema_keys_in_order(whole):
    checkpoint = torch.load(whole / "checkpoint.pt", weights_only=True)
    assert list(checkpoint) == KEYS
    assert list(checkpoint["model"]) == MODEL_KEYS
    assert list(checkpoint["optimizers"]) == ["pretrain", "pretrain_schedule", "casm"]
    assert list(checkpoint["optimizers"]["casm"]) == ["classifier", "decoder", "scaler"]
    assert list(checkpoint["rng"]) == ["torch", "python"]
    assert checkpoint["mapping_encoder"] is None and checkpoint["metrics"]["phase"] == "casm"
    assert checkpoint["pool_file"] == f"pool-{checkpoint['step']}.pt"
    pool = torch.load(whole / checkpoint["pool_file"], weights_only=True)
    assert list(pool) == ["snapshots"] and len(pool["snapshots"]) > 1


def test_a_stopped_run_resumes_to_the_uninterrupted_end(whole, tiny_data, tmp_path, monkeypatch):
    cut = stopped_run(tiny_data, tmp_path, monkeypatch)
    checkpoint = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert (checkpoint["phase"], checkpoint["epoch"]) == ("casm", 1) and checkpoint["pool_file"]
    train.run(TrainConfig(data=str(tiny_data), out=str(tmp_path), name="cut", resume=True))
    assert_same_end(cut, whole)


def test_a_checkpoint_without_the_optional_keys_resumes(whole, tiny_data, tmp_path, monkeypatch):
    """Files from before --unshared, --amp and data_kind lack those keys."""
    cut = stopped_run(tiny_data, tmp_path, monkeypatch)
    checkpoint = torch.load(cut / "checkpoint.pt", weights_only=True)
    del checkpoint["mapping_encoder"], checkpoint["optimizers"]["casm"]["scaler"]
    del checkpoint["model"]["data_kind"]
    torch.save(checkpoint, cut / "checkpoint.pt")
    train.run(TrainConfig(data=str(tiny_data), out=str(tmp_path), name="cut", resume=True))
    assert_same_end(cut, whole)
