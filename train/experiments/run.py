"""`make experiments`: run every experiment of train/RESULTS.md, then write its tables.

Usage: python train/experiments/run.py [--scale full|smoke] [--only NAME,...] [--sections N,...]
       [--report-only]

Each experiment is a module here with `jobs(scale)` (the `casm-deploy` calls) and
`report(scale)` (its markdown table). Finished jobs are skipped and interrupted training runs
resumed, so the command can be stopped and started again. `--scale smoke` runs the same
jobs on a tiny data set and writes its tables under runs/exp-smoke/ (a check of the plumbing).
`--sections 6` runs one section's jobs (and the jobs they need) and rewrites that section
only; the others are kept as they are, each naming the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import time
from pathlib import Path

import classifiers
import gradcam
import mappings
import parts
import table2
import tiny_imagenet
import torch
import two_copies
import unseen
from jobs import ROOT, SCALES, Job, Scale, run_jobs, seconds

from casm_deploy.common.cpus import cpu_model

# Section titles of train/RESULTS.md and the experiments behind them, in the order.
EXPERIMENTS = {
    "1. Thinning strategies, score functions, shared encoder (Table 2 analogue)": table2,
    "2. Two copies of the object (§2.1)": two_copies,
    "3. Unseen classes (Table 3 analogue)": unseen,
    "4. Many classifiers and the leak control (Fig. 3 analogue)": classifiers,
    "5. Grad-CAM at every stage, and at 128 px": gradcam,
    "6. Objects made of parts, and CASM against the baselines over three seeds": parts,
    "7. Mappings of their own: smaller encoders that need no classifier": mappings,
    "8. Real photos: Tiny ImageNet over three seeds, unseen classes and many classifiers": (
        tiny_imagenet
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--only", default="", help="comma-separated substrings of job names")
    parser.add_argument(
        "--sections",
        default="",
        help="comma-separated section numbers: run only their jobs (and what they need) and "
        "rewrite only their sections of RESULTS.md, keeping the others",
    )
    parser.add_argument("--report-only", action="store_true", help="write the tables only")
    parser.add_argument("--parallel", type=int, default=2, help="jobs at a time (one thread each)")
    args = parser.parse_args()
    os.chdir(ROOT)  # the runs' paths are relative to the repository
    scale = SCALES[args.scale]
    every = [job for module in EXPERIMENTS.values() for job in module.jobs(scale)]
    jobs, numbers = every, None
    if args.sections:
        numbers = {int(n) for n in args.sections.split(",")}
        modules = [m for k, m in enumerate(EXPERIMENTS.values(), 1) if k in numbers]
        jobs = with_dependencies([j for m in modules for j in m.jobs(scale)], every)
    if args.only:
        wanted = args.only.split(",")
        jobs = with_dependencies([j for j in jobs if any(w in j.name for w in wanted)], every)
    if not args.report_only:
        start = time.time()
        run_jobs(jobs, scale, args.parallel)
        print(f"jobs finished in {(time.time() - start) / 60:.1f} min")
    if args.only:
        return
    out = ROOT / "train" / "RESULTS.md" if scale.name == "full" else Path(scale.runs, "RESULTS.md")
    write_results(out, scale, numbers)


def with_dependencies(selected: list[Job], every: list[Job]) -> list[Job]:
    """The selected jobs and, in their order, every job they depend on (directly or not)."""
    by_name = {j.name: j for j in every}
    wanted, todo = set(), [j.name for j in selected]
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo += by_name[name].deps
    return [j for j in every if j.name in wanted]


def machine() -> str:
    """This machine, as a section of train/RESULTS.md names it."""
    return (
        f"{cpu_model() or platform.machine()}, {os.cpu_count()} cores, no GPU; "
        f"python {platform.python_version()}, torch {torch.__version__}"
    )


# A section's last line before its commands; an old file's header named the machine instead.
TOTALS = re.compile(r"^(\d+) jobs; (\d+) minutes of one CPU thread in all(?:, on (.*))?\.$", re.M)
OLD_MACHINE = re.compile(r"Machine: (.*?)\. Each job")


def old_sections(path: Path) -> dict[str, str]:
    """The sections of an existing RESULTS.md by title, each naming the machine it ran on."""
    if not path.exists():
        return {}
    text = path.read_text()
    header_machine = OLD_MACHINE.search(text.split("\n## ", 1)[0])
    sections = {}
    for chunk in text.split("\n## ")[1:]:
        title, body = chunk.split("\n", 1)
        if header_machine and not (TOTALS.search(body) and TOTALS.search(body).group(3)):
            body = TOTALS.sub(
                lambda m: (
                    f"{m[1]} jobs; {m[2]} minutes of one CPU thread in all, on {header_machine[1]}."
                ),
                body,
            )
        sections[title] = body.rstrip("\n") + "\n"
    return sections


def write_results(path: Path, scale: Scale, numbers: set[int] | None = None) -> None:
    """train/RESULTS.md: per experiment its description, table, compute time and commands.

    `numbers`: rewrite only these sections (by number); the others are kept as they are.
    """
    kept = old_sections(path)
    sections, missing, jobs, minutes = [], [], 0, 0.0
    for number, (title, module) in enumerate(EXPERIMENTS.items(), 1):
        if numbers is not None and number not in numbers:
            if title not in kept:  # never run: the file says so rather than invent it
                missing.append(str(number))
                continue
            body = kept[title]
            totals = TOTALS.search(body)
            jobs, minutes = jobs + int(totals[1]), minutes + int(totals[2])
            sections.append(f"## {title}\n{body}")
            continue
        own = module.jobs(scale)
        own_minutes = sum(seconds(scale, j.name) for j in own) / 60
        jobs, minutes = jobs + len(own), minutes + own_minutes
        doc = module.__doc__.split("\n", 1)[1].strip()
        commands = "\n".join(j.shown() for j in own)
        sections.append(
            "\n".join(
                [
                    f"## {title}\n",
                    f"{doc}\n",
                    f"{module.report(scale)}\n",
                    f"{len(own)} jobs; {own_minutes:.0f} minutes of one CPU thread in all, on "
                    f"{machine()}.\n",
                    f"<details><summary>commands</summary>\n\n```bash\n{commands}\n```\n"
                    "</details>\n",
                ]
            )
        )
    header = [
        "# Experiments: results\n",
        "Written by `make experiments` (`python train/experiments/run.py`) from the runs it "
        "made; do not edit by hand. Each section names the machine it ran on; each job ran on "
        "one thread, two at a time. Recipe: ResNet-18 at width "
        f"{scale.width}, 64 px unless said, classifier pre-training {scale.pretrain_epochs} "
        f"epochs, CASM {scale.epochs} epochs of {scale.epoch_fraction:g} of the 10-class "
        "training set (the same number of steps everywhere); ± is the half-range over "
        f"seeds {', '.join(map(str, scale.seeds))} unless said.\n",
        f"In all {jobs} jobs, {minutes:.0f} minutes of one CPU thread: about "
        f"{minutes / 2:.0f} minutes of wall time two at a time.\n",
    ]
    if missing:
        header.append(
            f"Not run yet, so not here: section {', '.join(missing)} "
            f"(`make experiments SECTIONS={','.join(missing)}`).\n"
        )
    path.write_text("\n".join(header) + "\n" + "\n".join(sections))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
