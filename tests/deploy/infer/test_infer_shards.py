"""`infer` over several processes: torchrun ranks and `--shard K/N`, each file recorded once
whatever is killed or rerun with another N, and `casm-deploy merge`.

The model is a tiny random ONNX export (32 px); the images are small PNGs made here. The
torchrun and kill tests run real processes.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from casm_deploy.cli import app
from casm_deploy.config import InferConfig
from casm_deploy.deploy.infer.locks import hold
from casm_deploy.deploy.infer.shards import shard_of
from casm_deploy.options import ConfigError

runner = CliRunner()
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
N = 480  # images: enough that a shard is still running when it is killed


@pytest.fixture(scope="module")
def model(make_exports, tiny_data, tmp_path_factory) -> str:
    return str(make_exports(tmp_path_factory.mktemp("model"), tiny_data, formats=("onnx",))["onnx"])


def make_images(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        path = root / f"d{i % 3}" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image = np.full((24, 24, 3), 60, np.uint8)
        y, x = rng.integers(0, 12, 2)
        image[y : y + 12, x : x + 12] = rng.integers(120, 255, 3)
        cv2.imwrite(str(path), image)
    return root


def command(images: Path, out: Path, model: str, *extra: str) -> list[str]:
    args = ["infer", str(images), "--model", model, "--out", str(out), "--batch", "2"]
    return [*args, "--workers", "1", *extra]


def invoke(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result.output


def by_path(out: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in (out / "boxes.jsonl").read_text().splitlines()]
    assert len(rows) == len({r["path"] for r in rows}), "a file recorded twice"
    return {r["path"]: r for r in rows}


def masks(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in (out / "masks").rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def whole(model, tmp_path_factory):
    """480 images and one process's outputs for them: what every split run must equal."""
    root = tmp_path_factory.mktemp("shards")
    images = make_images(root / "images", N)
    invoke(*command(images, root / "whole", model))
    return {"images": images, "out": root / "whole"}


def test_shares_are_stable_disjoint_and_cover_every_path():
    paths = [f"d{i % 7}/{i:05d}.JPEG" for i in range(2000)]
    for n in (1, 2, 3, 8):
        shares = [shard_of(p, n) for p in paths]
        assert set(shares) == set(range(n))
        assert max(shares.count(k) for k in range(n)) < 2000 / n * 1.2  # about even
    # pinned: a new release must give an interrupted job's files the same shares
    assert shard_of("n01440764/ILSVRC2012_val_00000293.JPEG", 8) == 1


@pytest.mark.parametrize("text", ["3/2", "2/2", "1", "a/b", "-1/2", "1/0"])
def test_a_bad_shard_is_refused(text):
    with pytest.raises(ConfigError, match="--shard"):
        InferConfig(dir="x", shard=text)


def test_torchrun_two_ranks_record_what_one_process_records(model, whole, tmp_path):
    out = tmp_path / "torchrun"
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    run += ["-m", "casm_deploy", *command(whole["images"], out, model)]
    subprocess.run(run, env=ENV, check=True, timeout=300)
    assert by_path(out) == by_path(whole["out"])
    assert masks(out) == masks(whole["out"])
    assert not (out / "parts").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == summary["files"] == N
    assert summary["this_run"]["ok"] == N
    assert [s["shard"] for s in summary["shards"]] == ["0/2", "1/2"]
    assert sum(s["ok"] for s in summary["shards"]) == N
    assert {s["device"] for s in summary["shards"]} == {"cpu"}


def test_a_shard_killed_mid_run_resumes_and_records_each_file_once(model, whole, tmp_path):
    out = tmp_path / "killed"
    shard0 = [sys.executable, "-m", "casm_deploy", *command(whole["images"], out, model)]
    victim = subprocess.Popen([*shard0, "--shard", "0/2"], env=ENV)
    part = out / "parts" / "part-0-of-2.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and victim.poll() is None:
        if part.is_file() and part.read_text().count("\n") >= 10:
            break
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    share = sum(shard_of(rel, 2) == 0 for rel in by_path(whole["out"]))
    assert 10 <= part.read_text().count("\n") < share, "the shard was not killed mid-way"
    with open(part, "a") as f:  # as if the kill cut a write short
        f.write('{"path": "d0/000.png", "sta')
    output = invoke(*command(whole["images"], out, model, "--shard", "1/2"))
    assert "not finished yet: 0/2" in output
    assert not (out / "boxes.jsonl").exists()
    output = invoke(*command(whole["images"], out, model, "--shard", "0/2"))
    assert str(N) in output  # the merged table
    assert by_path(out) == by_path(whole["out"])
    assert masks(out) == masks(whole["out"])
    assert not (out / "parts").exists() and not list(out.rglob(".*.partial"))


def test_a_rerun_with_another_n_or_one_process_does_only_the_rest(model, whole, tmp_path):
    out, images = tmp_path / "switched", whole["images"]
    invoke(*command(images, out, model, "--shard", "0/2"))
    done = {rel for rel in by_path(whole["out"]) if shard_of(rel, 2) == 0}
    for k in range(3):  # N = 3 now: each does its share of the files 0/2 did not do
        invoke(*command(images, out, model, "--shard", f"{k}/3"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["this_run"]["ok"] == N
    counts = {s["shard"]: s["ok"] for s in summary["shards"]}
    assert counts["0/2"] == len(done)
    assert sum(counts[f"{k}/3"] for k in range(3)) == N - len(done)
    assert by_path(out) == by_path(whole["out"])
    # shards, then one process: it joins the parts first and does only the rest
    out = tmp_path / "then-one"
    invoke(*command(images, out, model, "--shard", "1/4"))
    output = invoke(*command(images, out, model))
    assert "recorded by an earlier sharded run joined" in output
    assert by_path(out) == by_path(whole["out"]) and not (out / "parts").exists()


def test_merge_names_missing_shards_and_is_idempotent(model, whole, tmp_path):
    out, images = tmp_path / "merge", whole["images"]
    invoke(*command(images, out, model, "--shard", "2/3"))
    result = runner.invoke(app, ["merge", str(out)])
    assert result.exit_code == 1
    assert "missing shards 0/3" in result.output and "1/3" in result.output
    assert not (out / "boxes.jsonl").exists()  # nothing merged
    invoke(*command(images, out, model, "--shard", "0/3"))
    invoke(*command(images, out, model, "--shard", "1/3"))  # the last: it merges
    assert by_path(out) == by_path(whole["out"]) and not (out / "parts").exists()
    output = invoke("merge", str(out))
    assert "nothing to merge" in " ".join(output.split())


def test_shards_that_would_overlap_are_refused(model, whole, tmp_path):
    out, images = tmp_path / "locked", whole["images"]
    invoke(*command(images, out, model, "--shard", "0/2"))  # makes OUT and parts/
    parts = out / "parts"
    fd = hold(parts / "part-1-of-2.lock", exclusive=True)  # shard 1/2 running elsewhere
    output = invoke(*command(images, out, model, "--shard", "1/2"), code=2)
    assert "shard 1/2 is already running" in output
    os.close(fd)
    # a shard of a job of 4 running: OUT's lock and its N's lock shared
    running = [hold(out / ".lock", exclusive=False), hold(parts / "of-4.lock", exclusive=False)]
    output = invoke(*command(images, out, model, "--shard", "1/2"), code=2)
    assert "shards of 4 are running" in output
    output = invoke(*command(images, out, model), code=2)  # one process: OUT is in use
    assert "in use by another infer run" in output
    for fd in running:
        os.close(fd)
    fd = hold(out / ".lock", exclusive=True)  # a single-process run (or a merge) holds OUT
    output = invoke(*command(images, out, model, "--shard", "1/2"), code=2)
    assert "in use by a single-process infer run or a merge" in output
    output = invoke("merge", str(out), code=2)
    assert "still writing it" in output
    os.close(fd)


@pytest.mark.parametrize("flag", ["--overwrite", "--retry-errors"])
def test_options_that_touch_other_shards_files_are_refused(model, whole, tmp_path, flag):
    output = invoke(
        *command(whole["images"], tmp_path / "o", model, "--shard", "0/2", flag), code=2
    )
    assert f"{flag} with shards" in output
    assert not (tmp_path / "o").exists()


def test_a_shard_of_another_run_is_refused(make_checkpoint, model, whole, tiny_data, tmp_path):
    out = tmp_path / "other"
    invoke(*command(whole["images"], out, model, "--shard", "0/2"))
    other = make_checkpoint(tmp_path / "other.pt", tiny_data, seed=1)
    output = invoke(*command(whole["images"], out, other, "--shard", "1/2"), code=2)
    assert "holds results of another run (changed: model_sha256" in output


@pytest.mark.gpu
def test_a_torchrun_rank_runs_on_its_local_gpu(monkeypatch):
    """Under torchrun, `--device auto` and `cuda` are cuda:LOCAL_RANK; a rank beyond the node's
    GPUs is a one-line error."""
    import torch

    from casm_deploy.deploy.infer.shards import shard_for, use_rank_device
    from casm_deploy.errors import UserError

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    cfg = InferConfig(dir="x", device="cuda")
    shard = shard_for(cfg)
    assert shard is not None and shard.torchrun and str(shard) == "0/2"
    use_rank_device(cfg, shard)
    assert torch.cuda.current_device() == 0
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
    with pytest.raises(UserError, match="LOCAL_RANK"):
        use_rank_device(cfg, shard)
