"""Data-parallel training under torchrun (2 CPU processes, gloo): the ranks stay identical.

The test starts `torchrun --standalone --nproc-per-node 2 tests/training/test_distributed.py
DATA OUT`.
Run that way, this file is each rank's program: it trains a tiny CASM with `train.run` and
writes what the rank ended with (weights, pool, the samples it was served) to OUT/rank<r>.pt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def test_two_ranks_keep_identical_weights_on_disjoint_shards(tiny_data, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", __file__, str(tiny_data), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("torchrun hung: the ranks ran different collectives (different graphs?)")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    a, b = ranks
    assert a["step"] == b["step"] == 2 * 9  # 2 CASM epochs of 36 images per rank, batch 4
    for key, value in a["state"].items():  # parameters and BatchNorm statistics
        assert torch.equal(value, b["state"][key]), key
    assert len(a["pool"]) == len(b["pool"]) > 1
    for snapshot_a, snapshot_b in zip(a["pool"], b["pool"], strict=True):
        assert all(torch.equal(snapshot_a[k], snapshot_b[k]) for k in snapshot_a)

    # Every epoch, each rank reads from its own half of the 72 images, in whole batches.
    full_batches = {"batch8-epoch0": 32, "batch4-epoch1000": 36, "batch4-epoch1001": 36}
    for key, size in full_batches.items():
        served, other = a["served"][key], b["served"][key]
        assert len(served) == len(other) == size and not set(served) & set(other), key

    # Only rank 0 wrote the run: one log line per epoch, and its weights in the checkpoint.
    run_dir = tmp_path / "ddp"
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r.get("epoch")) for r in log] == [
        ("baseline", None),
        ("pretrain", 1),
        ("casm", 1),
        ("casm", 2),
    ]
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["phase"] == "done" and checkpoint["step"] == a["step"]
    for part in ("encoder", "decoder"):
        for key, value in checkpoint[part].items():
            assert torch.equal(value, a["state"][f"{part}.{key}"]), (part, key)


def _rank_main(data: str, out: str) -> None:
    """One rank: train with `train.run`, then save what this rank ended with."""
    import torch.distributed as dist

    from casm_deploy.config import TrainConfig
    from casm_deploy.training import train
    from casm_deploy.training.casm import CASM

    rank = int(os.environ["RANK"])
    casms, served = [], {}

    class RecordingCASM(CASM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            casms.append(self)

    class RecordingLoader:
        """Passes a training loader through, noting the sample indices of each epoch."""

        def __init__(self, loader):
            self.loader = loader

        def __getattr__(self, name):
            return getattr(self.loader, name)

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            key = f"batch{self.loader.batch_size}-epoch{self.loader.dataset.epoch}"
            for images, labels, indices in self.loader:
                served.setdefault(key, []).extend(indices.tolist())
                yield images, labels, indices

    build_loader = train.build_loader

    def recording_build_loader(*args, **kwargs):
        loader = build_loader(*args, **kwargs)
        return RecordingLoader(loader) if kwargs["train"] else loader

    train.CASM = RecordingCASM  # where train.run builds it
    train.build_loader = recording_build_loader
    cfg = TrainConfig(
        data=data,
        out=out,
        name="ddp",
        width=8,
        image_size=32,
        pretrain_epochs=1,
        pretrain_batch_size=8,
        epochs=2,
        batch_size=4,
        epoch_fraction=1.0,
        workers=0,
        reproduce="L100",
        smf=4,  # several snapshots, drawn with hp = 0.5: the ranks must draw alike
        device="cpu",
    )
    train.run(cfg)
    assert not dist.is_initialized()  # run() leaves no process group behind
    casm = casms[0]
    torch.save(
        {
            "state": casm.masker.state_dict(),
            "pool": casm.pool.snapshots,
            "step": casm.step_count,
            "served": served,
        },
        Path(out) / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    _rank_main(sys.argv[1], sys.argv[2])
