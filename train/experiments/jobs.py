"""The experiments' plumbing: a scale, a job (one `casm-deploy` call), and a runner.

A job is skipped when its marker file says it finished; an interrupted training run is resumed
(`--resume`), so `make experiments` can be stopped and started again without losing work.
Jobs run two at a time, each on one thread (the machine has two cores), in dependency order.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).with_name("casm-deploy"))


@dataclass(frozen=True)
class Scale:
    """How big the experiments are: `full` for train/RESULTS.md, `smoke` to check the plumbing."""

    name: str
    runs: str  # root of every run folder
    data: str  # root of the generated data sets
    train_per_class: int  # images per class of the 10-class data set
    val_per_class: int
    pretrain_epochs: int  # classifier pre-training
    epochs: int  # CASM phase
    epoch_fraction: float
    width: int = 16  # ResNet-18 at a quarter of torchvision's width: four times the runs
    seeds: tuple[int, ...] = (0, 1)
    classifier_seeds: tuple[int, ...] = (10, 11, 12, 13, 14)  # the many-classifiers test
    other_arch_seeds: tuple[int, ...] = (20, 21)  # its classifiers of other architectures

    def path(self, *parts: str) -> str:
        return str(Path(self.runs, *parts))

    def dataset(self, name: str) -> str:
        return str(Path(self.data, name))


SCALES = {
    "full": Scale("full", "runs/exp", "data", 1000, 100, 6, 6, 0.5),
    # smoke: 14 images a class, the fewest that give every data set one batch of 64.
    "smoke": Scale(
        "smoke", "runs/exp-smoke", "data/exp-smoke", 14, 4, 1, 1, 1.0, width=8,
        classifier_seeds=(10, 11), other_arch_seeds=(20,),
    ),
}  # fmt: skip


@dataclass
class Job:
    """One `casm-deploy` call (or one of a script's, with `script`). `done` is the marker
    written when it succeeds."""

    name: str  # unique; also the log's name
    args: list[str]
    deps: list[str] = field(default_factory=list)
    resume_from: str = ""  # a checkpoint: when it exists, the call gets --resume
    first: bool = False  # start before the others when ready (the longest runs)
    script: str = ""  # a Python script of the repository to run instead of casm-deploy

    def log(self, scale: Scale) -> Path:
        return Path(scale.runs, "logs", f"{self.name}.log")

    def done(self, scale: Scale) -> Path:
        return Path(scale.runs, "logs", f"{self.name}.done")

    def command(self) -> list[str]:
        resume = ["--resume"] if self.resume_from and Path(self.resume_from).exists() else []
        program = [sys.executable, self.script] if self.script else [CLI]
        return [*program, *self.args, *resume]

    def shown(self) -> str:
        """The command as train/RESULTS.md lists it."""
        program = ["python", self.script] if self.script else ["casm-deploy"]
        return shlex.join([*program, *self.args])


def train_job(
    name: str, data: str, out: str, run: str, *args: str, deps=(), first: bool = False
) -> Job:
    """A `casm-deploy train DATA --out OUT --name RUN ...` job, resumed if interrupted."""
    return Job(
        name,
        ["train", data, "--out", out, "--name", run, "--workers", "1", *args],
        deps=list(deps),
        resume_from=str(Path(out, run, "checkpoint.pt")),
        first=first,
    )


def run_jobs(jobs: list[Job], scale: Scale, parallel: int = 2) -> None:
    """Run the jobs not yet done, `parallel` at a time, each after its dependencies."""
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise SystemExit(f"duplicate job names: {sorted({n for n in names if names.count(n) > 1})}")
    finished = {j.name for j in jobs if j.done(scale).exists()}
    pending = sorted((j for j in jobs if j.name not in finished), key=lambda j: not j.first)
    print(f"{len(jobs)} jobs, {len(finished)} done already, {len(pending)} to run", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    running: dict[Future, Job] = {}
    start = time.time()
    with ThreadPoolExecutor(parallel) as pool:
        while pending or running:
            ready = [j for j in pending if all(d in finished for d in j.deps)]
            for job in ready[: parallel - len(running)]:
                pending.remove(job)
                running[pool.submit(_call, job, scale, env)] = job
            if not running:  # what is left waits on jobs that were not selected
                print(f"not run, waiting on unselected jobs: {[j.name for j in pending]}")
                return
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                seconds = future.result()
                finished.add(job.name)
                print(
                    f"[{time.time() - start:6.0f} s] done {job.name} ({seconds:.0f} s)", flush=True
                )


def _call(job: Job, scale: Scale, env: dict) -> float:
    log = job.log(scale)
    log.parent.mkdir(parents=True, exist_ok=True)
    command = job.command()
    print(f"start {job.name}: {job.shown()}", flush=True)
    start = time.time()
    with log.open("w") as out:
        rc = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    seconds = time.time() - start
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise SystemExit(f"{job.name} failed (exit {rc}); the end of {log}:\n{tail}")
    job.done(scale).write_text(json.dumps({"seconds": round(seconds, 1), "command": command}))
    return seconds


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def method_scores(stem: str, method: str, first: str) -> dict:
    """One method's scores from `eval --json STEM.json`: the first model's are in STEM.json,
    every other method's in STEM.<method>.json."""
    return read_json(f"{stem}.json" if method == first else f"{stem}.{method}.json")


def last_epoch(run_dir: str | Path) -> dict:
    """The last line of a run's metrics.jsonl (the scores after its last epoch)."""
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def seconds(scale: Scale, job_name: str) -> float:
    return read_json(Path(scale.runs, "logs", f"{job_name}.done"))["seconds"]


def mean_range(values: list[float]) -> str:
    """`0.123 (0.100-0.150)`: the mean over the seeds and their range, or the value alone."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return (
        f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ({min(values):.3f}-{max(values):.3f})"
    )


def mean_std(values: list[float]) -> str:
    """`0.123 ± 0.045` over the seeds (the half-range for two), or the value alone."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    spread = (max(values) - min(values)) / 2
    return f"{mean:.3f} ± {spread:.3f}"
