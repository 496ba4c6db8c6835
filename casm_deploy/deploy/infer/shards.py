"""infer over several processes: torchrun's ranks, or `--shard K/N` processes started by any
scheduler, each doing a disjoint share of the files; and the merge of what they recorded.

A file's share is a stable hash of its path relative to DIR (`shard_of`): it depends neither on
the order a folder is listed in nor on the host. Shard K of N appends its rows to
OUT/parts/part-K-of-N.jsonl (a record like boxes.jsonl: whole batches, fsync'd, a torn last line
cut on the next start) and, once its share is done, writes OUT/parts/part-K-of-N.json (`marker`:
its host, device, provider, counts and times). Masks go to the one OUT/masks/ tree. A shard
skips every file recorded anywhere in OUT, in boxes.jsonl or in a part of any N, so a rerun
with another N, or with torchrun instead of --shard, does only what is not recorded yet.

The last shard of N to finish merges (`merge`): boxes.jsonl gets every part's rows it lacks
(written whole, atomically), then summary.json and the COCO file are written from it, and
parts/ goes. No shard waits on another; locks.py says which processes may run at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from casm_deploy.common.files import remove_owned
from casm_deploy.config import InferConfig
from casm_deploy.deploy.infer.locks import hold
from casm_deploy.deploy.infer.outfolder import PARTS, RECORD, parse, read_record, write_own
from casm_deploy.deploy.infer.outputs import write_coco, write_summary
from casm_deploy.deploy.runtime.info import ModelInfo
from casm_deploy.errors import UserError

PART = re.compile(r"part-(\d+)-of-(\d+)\.(jsonl|json)")  # a part's record, or its marker


@dataclass(frozen=True)
class Shard:
    """Share `index` of `count`: the files whose `shard_of` is `index`."""

    index: int
    count: int
    torchrun: bool = False  # a torchrun rank (RANK of WORLD_SIZE), not --shard

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def name(self) -> str:
        return f"part-{self.index}-of-{self.count}"

    def takes(self, rel: str) -> bool:
        return shard_of(rel, self.count) == self.index


def shard_of(rel: str, count: int) -> int:
    """The share (0 to count - 1) of the file at `rel` (its path relative to DIR)."""
    digest = hashlib.blake2b(os.fsencode(rel), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def shard_for(cfg: InferConfig) -> Shard | None:
    """This process's share: torchrun's rank of its world, `--shard K/N`, or None (all files).

    Raises:
        UserError: --shard under torchrun, or an option that would touch other shards' files.
    """
    from casm_deploy.training.distributed import distributed_from_env

    env = distributed_from_env()
    if env.world > 1 and cfg.shard:
        raise UserError("--shard under torchrun: torchrun's ranks are the shards; drop --shard")
    if env.world > 1:
        shard = Shard(env.rank, env.world, torchrun=True)
    elif cfg.shard:
        index, count = (int(v) for v in cfg.shard.split("/"))  # checked by InferConfig
        shard = Shard(index, count)
    else:
        return None
    if cfg.overwrite:
        raise UserError(
            "--overwrite with shards: each would delete the others' results; start over with a "
            "new --out (or one run of infer --overwrite without shards)"
        )
    if cfg.retry_errors:
        raise UserError(
            "--retry-errors with shards: run it as one process (no --shard, no torchrun), "
            "which merges the parts and does the error rows again"
        )
    return shard


def use_rank_device(cfg: InferConfig, shard: Shard) -> None:
    """A torchrun rank's device: `cuda` (and `auto` where there is CUDA) is cuda:LOCAL_RANK;
    on the CPU, each of the node's ranks is pinned to its own slice of the CPUs (so N ranks
    share the cores instead of each starting a thread per core)."""
    import torch

    from casm_deploy.common.devices import resolve_device
    from casm_deploy.training.distributed import distributed_from_env

    if not shard.torchrun:
        return
    env = distributed_from_env()
    local_rank, local_world = env.local_rank, env.local_world
    device = resolve_device(cfg.device, local_rank)
    if device.type == "cuda":
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"torchrun rank {shard}: LOCAL_RANK {local_rank} but this node has "
                f"{torch.cuda.device_count()} GPUs; start at most that many processes per node"
            )
        torch.cuda.set_device(device)
        return
    cpus = sorted(os.sched_getaffinity(0))
    share = len(cpus) // local_world
    if share >= 1:
        mine = cpus[local_rank * share : (local_rank + 1) * share]
        os.sched_setaffinity(0, mine)
        torch.set_num_threads(len(mine))


# --- a shard's run ---------------------------------------------------------------------------


def hold_share(stack: contextlib.ExitStack, out: Path, shard: Shard) -> None:
    """Take the shard's locks for its run (released by `stack`): its own part's, and its N's.

    Raises:
        UserError: shard K/N runs already, or shards of another N run on OUT.
    """
    parts = out / PARTS
    own = hold(parts / f"{shard.name}.lock", exclusive=True)
    if own is None:
        raise UserError(f"--out {out}: shard {shard} is already running there")
    stack.callback(os.close, own)
    mine = f"of-{shard.count}.lock"
    stack.callback(os.close, hold(parts / mine, exclusive=False, wait=True))
    for other in sorted(parts.glob("of-*.lock")):
        if other.name == mine:
            continue
        probe = hold(other, exclusive=True)
        if probe is None:
            count = other.stem.removeprefix("of-")
            raise UserError(
                f"--out {out}: shards of {count} are running there; a shard of {shard.count} "
                "would share out their files again: let that job finish (or stop it) first"
            )
        os.close(probe)


def recorded(out: Path, shard: Shard) -> set[str]:
    """The paths this shard must not do: those in boxes.jsonl and in every part but the other
    shards of its N (running, maybe: they hold other files, and are theirs to repair)."""
    done = read_record(out / RECORD).done
    for part, index, count in parts_of(out, "jsonl"):
        if count != shard.count or index == shard.index:
            done |= read_record(part).done
    return done


def parts_of(out: Path, kind: str) -> list[tuple[Path, int, int]]:
    """OUT's part records (`kind` jsonl) or markers (json), with their shard index and count."""
    found = []
    for path in sorted((out / PARTS).glob(f"part-*-of-*.{kind}")):
        match = PART.fullmatch(path.name)
        if match and match[3] == kind:
            found.append((path, int(match[1]), int(match[2])))
    return found


def write_marker(
    out: Path, shard: Shard, info: ModelInfo, run: dict[str, Any], started: float
) -> None:
    """OUT/parts/part-K-of-N.json: shard K of N did its share (`run`: `outputs.run_summary`)."""
    marker = {
        "shard": str(shard),
        "index": shard.index,
        "count": shard.count,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": started,  # Unix times
        "finished": time.time(),
        "run": run,
        "info": asdict(info),  # for the merge's COCO categories
    }
    path = out / PARTS / f"{shard.name}.json"
    write_own(path, (json.dumps(marker, indent=2) + "\n").encode())


def missing_shards(out: Path, count: int) -> list[int]:
    """The shards of `count` without a marker: not finished (or not started)."""
    finished = {index for _, index, n in parts_of(out, "json") if n == count}
    return [k for k in range(count) if k not in finished]


# --- the merge -------------------------------------------------------------------------------


def join_records(out: Path) -> int:
    """boxes.jsonl with, after its own lines, every part's rows of paths it does not have yet,
    written whole (a temporary, renamed); returns the rows added. Only while no shard runs.

    Idempotent: a merge killed after this step finds the rows in boxes.jsonl and adds none.
    """
    record = out / RECORD
    seen = read_record(record).done
    parts = [path for path, _, _ in parts_of(out, "jsonl")]
    for part in parts:
        read_record(part)  # cuts a torn last line (a shard killed during an append)
    added = 0

    def lines() -> Iterator[bytes]:
        nonlocal added
        if record.exists():
            with open(record, "rb") as f:
                yield from f
        for part in parts:
            with open(part, "rb") as f:
                for line in f:
                    row = parse(line)
                    if row is not None and row["path"] not in seen:
                        seen.add(row["path"])
                        added += 1
                        yield line

    if parts:
        write_own(record, lines())
    return added


def merge(out: Path, coco: str = "") -> dict[str, Any] | None:
    """Join the parts into boxes.jsonl, then write summary.json (counts over the whole record,
    the job's speed and every shard's device and provider) and the COCO file (`coco`, else the
    shards' --coco), then remove parts/. The caller holds OUT's locks, exclusively.

    Returns:
        The summary, or None where no shard finished (no marker: nothing to summarise).
    """
    join_records(out)
    markers = [json.loads(path.read_text()) for path, _, _ in parts_of(out, "json")]
    summary = None
    if markers:
        summary = write_summary(out, job_summary(markers))
        last = max(markers, key=lambda m: m["finished"])
        coco = coco or last["run"]["config"].get("coco", "")
        if coco:
            info = {k: tuple(v) if isinstance(v, list) else v for k, v in last["info"].items()}
            write_coco(out / RECORD, Path(coco), ModelInfo(**info))
    remove_owned(out, [PARTS])
    return summary


def job_summary(markers: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json's run fields for the shards' job: `this_run` counts the files of each
    shard's last run over the job's wall time (its first batch to its last), and `shards`
    lists each."""
    last = max(markers, key=lambda m: m["finished"])
    counts = {s: sum(m["run"]["this_run"][s] for m in markers) for s in ("ok", "error")}
    seconds = max(m["finished"] for m in markers) - min(m["started"] for m in markers)
    done = counts["ok"] + counts["error"]
    shards = [
        {
            "shard": m["shard"],
            "host": m["host"],
            "pid": m["pid"],
            **{k: m["run"][k] for k in ("device", "provider", "backend", "images_per_second")},
            **m["run"]["this_run"],
        }
        for m in sorted(markers, key=lambda m: (m["count"], m["index"]))
    ]
    return {
        **last["run"],
        "this_run": {**counts, "seconds": round(seconds, 3)},
        "images_per_second": round(done / seconds, 2) if done and seconds > 0 else None,
        "shards": shards,
    }
