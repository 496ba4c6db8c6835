"""A run killed with SIGKILL and resumed ends exactly where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ARGS = [
    "--width",
    "8",
    "--image-size",
    "32",
    "--pretrain-epochs",
    "2",
    "--epochs",
    "12",
    "--batch-size",
    "4",
    "--epoch-fraction",
    "1.0",
    "--workers",
    "0",
    "--reproduce",
    "L100",
    "--smf",
    "5",
]


@pytest.fixture
def train():
    """Start `casm-deploy train` in a subprocess; whatever is still running is killed after."""
    started = []

    def start(data, out, name, *extra):
        command = [sys.executable, "-m", "casm_deploy", "train", str(data), "--out", str(out)]
        process = subprocess.Popen(
            [*command, "--name", name, *ARGS, *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},  # two runs at once share the cores
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def temporaries(run_dir):
    """What interrupted writes leave (files.atomic_file's; earlier versions' .tmp)."""
    return [p.name for p in run_dir.iterdir() if p.name.endswith((".partial", ".tmp"))]


def epochs_logged(path):
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(train, tiny_data, tmp_path):
    reference = train(tiny_data, tmp_path, "whole")

    victim = train(tiny_data, tmp_path, "killed")
    log = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while not any(r["phase"] == "casm" for r in epochs_logged(log)):
        assert victim.poll() is None, victim.stderr.read()
        assert time.time() < deadline, "the run never reached its first CASM epoch"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert killed_at["phase"] == "casm", "the run finished before it could be killed"
    assert (tmp_path / "killed" / killed_at["pool_file"]).exists()
    leftovers = temporaries(tmp_path / "killed")
    assert len(leftovers) <= 1  # at most the write that SIGKILL interrupted

    resumed = train(tiny_data, tmp_path, "killed", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    # The interrupted write's temporary went at the resume.
    assert not temporaries(tmp_path / "killed")

    # At most the epoch in progress was lost and redone: one log line per epoch, in order.
    logged = [(r["phase"], r.get("epoch")) for r in epochs_logged(log)]
    expected = [("baseline", None), ("pretrain", 1), ("pretrain", 2)]
    assert logged == expected + [("casm", e) for e in range(1, 13)]

    a = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    assert a["phase"] == b["phase"] == "done" and a["step"] == b["step"]
    for part in ("encoder", "decoder"):
        for key in b[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)


def test_resume_before_any_checkpoint_starts_the_run(train, tiny_data, tmp_path):
    short = ["--pretrain-epochs", "0", "--epochs", "1"]  # the last of a repeated option counts
    process = train(tiny_data, tmp_path, "none", "--resume", *short)
    assert process.wait(timeout=120) == 0, process.stderr.read()
    assert torch.load(tmp_path / "none" / "checkpoint.pt", weights_only=True)["phase"] == "done"


def test_a_second_run_into_the_same_folder_is_refused(train, tiny_data, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "checkpoint.pt").write_bytes(b"")
    process = train(tiny_data, tmp_path, "busy")
    assert process.wait(timeout=120) == 2
    assert "--resume" in process.stderr.read()
