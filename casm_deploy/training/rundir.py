"""The run folder, `OUT/NAME/`: its lock, --resume, the temporaries a kill leaves, and the log.

`train.run` claims the folder (`claim_run_dir`: rank 0 holds `.lock` for the whole run),
settles the config it goes on with (`resumed_config`), removes what interrupted writes left
(`remove_temporaries`), and writes `config.json` and `metrics.jsonl` (`start_log`,
`append_log`; `trim_log` makes the log agree with the checkpoint a resumed run goes on from).
The checkpoint and the pool files themselves are `checkpoint.save_training`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path

from casm_deploy.checkpoint import RUN_CHECKPOINT
from casm_deploy.common.files import make_folders, write_atomic
from casm_deploy.common.ui import console
from casm_deploy.config import TrainConfig, config_from_dict
from casm_deploy.errors import UserError

LOG = "metrics.jsonl"  # one line per finished epoch of either phase, after the baseline's

# What a kill during a write leaves in a run folder: the temporaries of `files.atomic_file`
# (`.<file name>.partial`, full-size) of the checkpoint, the pool files and `trim_log`'s log,
# and those of the writes of earlier versions (`.<file name>.<random>.tmp`, `metrics.tmp`).
# Without the folder's lock, only those older than STALE_SECONDS are ours to remove: no save
# takes that long, and a younger one may be another run's write in progress.
TEMPORARIES = (
    ".checkpoint.pt.partial",
    ".pool-*.pt.partial",
    f".{LOG}.partial",
    ".checkpoint.pt.*.tmp",
    ".pool-*.pt.*.tmp",
    "metrics.tmp",
)
STALE_SECONDS = 3600


def lock_run_dir(run_dir: Path):
    """An exclusive lock on `run_dir` (on its `.lock` file), held while the returned file is
    open and dropped by the system when the process ends, kill -9 included; None where the
    file system (or the platform) has no locks.

    Raises:
        UserError: another process holds it: a run is going on in that folder.
    """
    try:
        import fcntl
    except ImportError:  # Windows has no fcntl
        return None
    make_folders(run_dir)
    handle = (run_dir / ".lock").open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(f"{run_dir}: another training run is using this folder") from None
    except OSError:  # a file system without locks
        handle.close()
        return None
    return handle


@contextlib.contextmanager
def claim_run_dir(run_dir: Path, main: bool) -> Iterator[bool]:
    """Rank 0 (`main`) holds the folder's lock for the whole block: a second run into it is
    refused. Yields whether the folder is locked (no lock: other ranks, or no locks here).

    A folder this made and left holding nothing but its lock (a run refused before it wrote
    anything: bad data, say) is removed on the way out.
    """
    created = not run_dir.exists()
    lock = lock_run_dir(run_dir) if main else None
    try:
        yield lock is not None
    finally:
        if lock is not None:
            if created and [p.name for p in run_dir.iterdir()] == [".lock"]:
                (run_dir / ".lock").unlink()
                run_dir.rmdir()
            lock.close()


def resumed_config(cfg: TrainConfig, run_dir: Path, main: bool) -> TrainConfig:
    """The config the run goes on with: with --resume, the one it started with (its
    config.json), whatever the flags say now; `resume` is then whether there is a checkpoint
    to resume (killed before its first one, or never started: it starts from scratch).

    Raises:
        UserError: a run is there and --resume was not passed, or its config.json is missing.
    """
    ckpt_path = run_dir / RUN_CHECKPOINT
    if ckpt_path.exists() and not cfg.resume:
        raise UserError(
            f"{run_dir}: a run is already there; pass --resume to continue it, "
            "or choose another --name"
        )
    if not cfg.resume:
        return cfg
    stored_path = run_dir / "config.json"
    if ckpt_path.exists() and not stored_path.is_file():
        raise UserError(f"{stored_path}: missing; cannot tell how the run was started")
    if stored_path.is_file():
        cfg = config_from_dict(TrainConfig, json.loads(stored_path.read_text()))
    cfg = dataclasses.replace(cfg, resume=ckpt_path.exists())
    if not cfg.resume and main:
        console.print(f"{run_dir}: no checkpoint to resume yet; starting the run afresh")
    return cfg


def remove_temporaries(run_dir: Path, locked: bool) -> None:
    """Delete what interrupted writes left in `run_dir` (TEMPORARIES): all of them under the
    folder's lock, else those older than STALE_SECONDS."""
    for pattern in TEMPORARIES:
        for path in run_dir.glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                if locked or time.time() - path.stat().st_mtime > STALE_SECONDS:
                    path.unlink()


def start_log(run_dir: Path, config: dict, baseline: dict) -> None:
    """A new run's folder: its `config.json`, and a log holding the centre-box baseline."""
    make_folders(run_dir)
    log_path = run_dir / LOG
    log_path.unlink(missing_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    with log_path.open("a") as f:
        f.write(json.dumps({"phase": "baseline", **baseline}))
        f.write("\n")


def append_log(run_dir: Path, record: dict) -> None:
    """One finished epoch's line (its training and validation figures) at the log's end."""
    with (run_dir / LOG).open("a") as f:
        f.write(json.dumps(record) + "\n")


def trim_log(run_dir: Path, last: dict) -> None:
    """Make the log agree with a checkpoint: one line per finished epoch, none after `last`.

    A kill between the checkpoint and its log line loses the line (it is restored from the
    checkpoint); a kill in the middle of a write leaves a broken line (dropped).
    """
    log_path = run_dir / LOG
    kept = []
    lines = log_path.read_text().splitlines() if log_path.exists() else []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        kept.append(record)
        if (record["phase"], record.get("epoch")) == (last["phase"], last["epoch"]):
            break
    else:
        kept.append(last)
    write_atomic(log_path, "".join(json.dumps(r) + "\n" for r in kept))
