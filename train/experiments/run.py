"""`make experiments`: run every experiment of train/RESULTS.md, then write its tables.

Usage: python train/experiments/run.py [--scale full|smoke] [--only NAME,...] [--report-only]

Each experiment is a module here with `jobs(scale)` (the `casm-deploy` calls) and
`report(scale)` (its markdown table). Finished jobs are skipped and interrupted training runs
resumed, so the command can be stopped and started again. `--scale smoke` runs the same
jobs on a tiny data set and writes its tables under runs/exp-smoke/ (a check of the plumbing).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import time
from pathlib import Path

import classifiers
import gradcam
import table2
import torch
import two_copies
import unseen
from jobs import ROOT, SCALES, Job, Scale, run_jobs, seconds

# Section titles of train/RESULTS.md and the experiments behind them, in the order.
EXPERIMENTS = {
    "1. Thinning strategies, score functions, shared encoder (Table 2 analogue)": table2,
    "2. Two copies of the object (§2.1)": two_copies,
    "3. Unseen classes (Table 3 analogue)": unseen,
    "4. Many classifiers and the leak control (Fig. 3 analogue)": classifiers,
    "5. Grad-CAM at every stage, and at 128 px": gradcam,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--only", default="", help="comma-separated substrings of job names")
    parser.add_argument("--report-only", action="store_true", help="write the tables only")
    parser.add_argument("--parallel", type=int, default=2, help="jobs at a time (one thread each)")
    args = parser.parse_args()
    os.chdir(ROOT)  # the runs' paths are relative to the repository
    scale = SCALES[args.scale]
    jobs = [job for module in EXPERIMENTS.values() for job in module.jobs(scale)]
    if args.only:
        wanted = args.only.split(",")
        jobs = [j for j in jobs if any(w in j.name for w in wanted)]
    if not args.report_only:
        start = time.time()
        run_jobs(jobs, scale, args.parallel)
        print(f"jobs finished in {(time.time() - start) / 60:.1f} min")
    if args.only:
        return
    out = ROOT / "train" / "RESULTS.md" if scale.name == "full" else Path(scale.runs, "RESULTS.md")
    write_results(out, scale, jobs)


def write_results(path: Path, scale: Scale, jobs: list[Job]) -> None:
    """train/RESULTS.md: per experiment its description, table, compute time and commands."""
    machine = (
        f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU; python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )
    total = sum(seconds(scale, j.name) for j in jobs) / 60
    text = [
        "# Experiments: results\n",
        "Written by `make experiments` (`python train/experiments/run.py`) from the runs it "
        f"made; do not edit by hand. Machine: {machine}. Each job ran on one thread, two at a "
        "time. Recipe: ResNet-18 at width "
        f"{scale.width}, 64 px unless said, classifier pre-training {scale.pretrain_epochs} "
        f"epochs, CASM {scale.epochs} epochs of {scale.epoch_fraction:g} of the 10-class "
        "training set (the same number of steps everywhere); ± is the half-range over "
        f"seeds {', '.join(map(str, scale.seeds))}.\n",
        f"In all {len(jobs)} jobs, {total:.0f} minutes of one CPU thread: about "
        f"{total / 2:.0f} minutes of wall time two at a time.\n",
    ]
    for title, module in EXPERIMENTS.items():
        own = module.jobs(scale)
        minutes = sum(seconds(scale, j.name) for j in own) / 60
        doc = module.__doc__.split("\n", 1)[1].strip()
        commands = "\n".join(shlex.join(["casm-deploy", *j.args]) for j in own)
        text += [
            f"## {title}\n",
            f"{doc}\n",
            f"{module.report(scale)}\n",
            f"{len(own)} jobs; {minutes:.0f} minutes of one CPU thread in all.\n",
            f"<details><summary>commands</summary>\n\n```bash\n{commands}\n```\n</details>\n",
        ]
    path.write_text("\n".join(text))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
