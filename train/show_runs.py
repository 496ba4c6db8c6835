"""Print the last validation scores of training runs as a Markdown table.

Usage: python train/show_runs.py runs/*/   (reads each run's config.json and metrics.jsonl)
The first row is the centre-box baseline on the same validation images.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ["val_acc", "val_acc_masked", "val_LE", "val_OM", "val_F1", "val_mask_mean"]


def main(run_dirs: list[str]) -> None:
    print(
        "| run | preset | lambda_r | epochs | minutes | pretrained acc | "
        + " | ".join(c.removeprefix("val_") for c in COLUMNS)
        + " |"
    )
    print("|---" * (6 + len(COLUMNS)) + "|")
    baseline = None
    for run_dir in map(Path, run_dirs):
        log = run_dir / "metrics.jsonl"
        if not log.is_file():
            continue
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        config = json.loads((run_dir / "config.json").read_text())
        baseline = baseline or next((r for r in records if r["phase"] == "baseline"), None)
        trained = [r for r in records if r["phase"] in ("pretrain", "casm")]
        last = [r for r in records if r["phase"] == "casm"][-1:] or trained[-1:]
        if not last:
            continue
        minutes = sum(r["seconds"] for r in trained) / 60
        pretrained = [r for r in records if r["phase"] == "pretrain"][-1:]
        pre_acc = f"{pretrained[0]['val_acc']:.3f}" if pretrained else "-"
        cells = [f"{last[0][c]:.3f}" if last[0].get(c) is not None else "-" for c in COLUMNS]
        epochs = f"{last[0]['phase']} {last[0]['epoch']}"
        lambda_r = "paper" if config["lambda_r"] is None else config["lambda_r"]
        print(
            f"| {run_dir.name} | {config['reproduce']} | {lambda_r} | {epochs} | "
            f"{minutes:.1f} | {pre_acc} | " + " | ".join(cells) + " |"
        )
    if baseline:
        cells = [f"{baseline[c]:.3f}" if c in baseline else "-" for c in COLUMNS]
        print("| centre box | - | - | - | - | - | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
