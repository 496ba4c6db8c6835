"""What splitting `infer` over processes costs on this machine: two processes (torchrun ranks,
one CPU each) against one process with a thread per CPU, on the same images.

Usage: python benchmarks/infer_split.py [--model export/default/masker.onnx]
       [--data data/synth/train] [--images 6000] [--batch 64] [--repeats 3]
Prints a table and writes benchmarks/results/infer_split.json.

Each configuration is the real command line in subprocesses, from the image files on disk to
PNG masks and one merged boxes.jsonl:
  one process        casm-deploy infer DIR (the model's and the decoders' threads: every CPU)
  torchrun, 2 ranks  torchrun --standalone --nproc-per-node 2 -m casm_deploy infer DIR (each
                     rank pinned to a CPU of its own, one model thread)
  2 x --shard        casm-deploy infer DIR --shard 0/2 and 1/2 started together, unpinned (each
                     sees every CPU, as two jobs a scheduler puts on one node without a CPU
                     limit)
Timed: the wall time of the whole job (start-up, model load, the folder's scan, the work, the
merge), and summary.json's images/s (the job's files over the time from its first process's
first batch to its last process's last).
The configurations take turns, `--repeats` rounds; each keeps its fastest round.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

from common import command, linked, machine, write_json

from casm_deploy.common.cpus import cpu_model, usable_cpus
from casm_deploy.data.imagefiles import scan

CONFIGS = ("one process", "torchrun, 2 ranks", "2 x --shard")


def jobs(config: str, folder: Path, out: Path, args: argparse.Namespace) -> list[list[str]]:
    """The processes of one configuration, started together."""
    infer = ["-m", "casm_deploy", "infer", str(folder), "--model", args.model, "--out", str(out)]
    infer += ["--batch", str(args.batch)]
    if config == "one process":
        return [[sys.executable, *infer]]
    if config == "torchrun, 2 ranks":
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        return [[sys.executable, *launcher, *infer]]
    return [[sys.executable, *infer, "--shard", f"{k}/2"] for k in range(2)]


def timed(config: str, folder: Path, out: Path, args: argparse.Namespace) -> dict:
    """One run of a configuration into a fresh `out`: its wall time and summary.json's rate."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # each its default
    start = time.perf_counter()
    processes = [
        subprocess.Popen(job, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for job in jobs(config, folder, out, args)
    ]
    failed = [p.stderr.read().decode()[-2000:] for p in processes if p.wait() != 0]
    wall = time.perf_counter() - start
    if failed:
        raise SystemExit(f"{config}: a process failed:\n{failed[0]}")
    summary = json.loads((out / "summary.json").read_text())
    if summary["files"] != args.images or summary["error"]:
        raise SystemExit(f"{config}: {summary['files']} files, {summary['error']} errors")
    return {"wall_s": round(wall, 3), "images_per_second": summary["images_per_second"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="export/default/masker.onnx")
    parser.add_argument("--data", default="data/synth/train")
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/infer_split.json")
    args = parser.parse_args()
    entries = list(islice(scan(Path(args.data)), args.images))
    if len(entries) < args.images:
        raise SystemExit(f"{args.data}: {len(entries)} images, the benchmark wants {args.images}")
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(dir=".") as tmp:  # on the disk users write to
        folder = linked(entries, Path(tmp) / "images")
        for round_ in range(args.repeats):
            for k, config in enumerate(CONFIGS):
                result = timed(config, folder, Path(tmp) / f"out-{round_}-{k}", args)
                print(f"round {round_ + 1}: {config}: {result}")
                if config not in best or result["wall_s"] < best[config]["wall_s"]:
                    best[config] = result
    one = best["one process"]
    rows = [
        {
            "config": config,
            **best[config],
            "wall_vs_one": round(best[config]["wall_s"] / one["wall_s"], 3),
            "rate_vs_one": round(best[config]["images_per_second"] / one["images_per_second"], 3),
        }
        for config in CONFIGS
    ]
    print(f"{'config':20} {'wall s':>8} {'images/s':>9} {'wall / one':>11} {'rate / one':>11}")
    for r in rows:
        print(
            f"{r['config']:20} {r['wall_s']:8.2f} {r['images_per_second']:9.1f} "
            f"{r['wall_vs_one']:11.2f} {r['rate_vs_one']:11.2f}"
        )
    import onnxruntime

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    info = {**machine(onnxruntime), "cpu_model": cpu_model(), "usable_cpus": usable_cpus()}
    info["avx512f"] = " avx512f" in flags
    write_json(
        args.out,
        {"command": command("infer_split.py", args), "machine": info, "rows": rows},
    )


if __name__ == "__main__":
    main()
