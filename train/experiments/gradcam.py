"""Experiment 5, a fair Grad-CAM: every encoder stage, and CASM against Grad-CAM at 128 px.

At 64 px the last stage is 2x2, so Grad-CAM's usual read-out (stage 4) is unfairly coarse:
Grad-CAM is scored at each of the four stages (`eval --gradcam-stage`) on the same images as
the CASM of Table 2 (d) (its classifier is the one Grad-CAM explains), and a classifier and a
CASM trained at 128 px give one comparison where stage 4 is 4x4.
"""

from __future__ import annotations

from jobs import Job, Scale, mean_std, read_json, train_job
from table2 import DATA, casm_args, classifier_args

STAGES = (1, 2, 3, 4)
LARGE = 128


def eval_jobs(s: Scale, model: str, tag: str, deps: list[str]) -> list[Job]:
    return [
        Job(
            f"gradcam-eval-{tag}-stage{k}",
            ["eval", model, s.dataset(DATA), "--baseline", "gradcam",
             "--gradcam-stage", str(k), "--json", s.path("gradcam", f"eval-{tag}-stage{k}.json")],
            deps=deps,
        )
        for k in STAGES
    ]  # fmt: skip


def jobs(s: Scale) -> list[Job]:
    out, data = s.path("gradcam"), s.dataset(DATA)
    result = []
    for seed in s.seeds:
        model = s.path("table2", f"l100-entropy-s{seed}", "checkpoint.pt")
        result += eval_jobs(s, model, f"64-s{seed}", [f"table2-l100-entropy-s{seed}"])
    size = ["--image-size", str(LARGE)]
    seed = s.seeds[0]  # one seed: a 128 px run costs four 64 px runs
    clf, name = f"classifier-{LARGE}-s{seed}", f"l100-{LARGE}-s{seed}"
    result.append(
        train_job(f"gradcam-{clf}", data, out, clf, *classifier_args(s, seed), *size,
                  deps=["data-synth"], first=True)
    )  # fmt: skip
    checkpoint = s.path("gradcam", clf, "checkpoint.pt")
    result.append(
        train_job(f"gradcam-{name}", data, out, name, *casm_args(s, checkpoint, seed), *size,
                  deps=[f"gradcam-{clf}"], first=True)
    )  # fmt: skip
    model = s.path("gradcam", name, "checkpoint.pt")
    return result + eval_jobs(s, model, f"{LARGE}-s{seed}", [f"gradcam-{name}"])


def row(s: Scale, size: int, seeds: tuple[int, ...]) -> str:
    casm, by_stage = [], {k: [] for k in STAGES}
    for seed in seeds:
        for k in STAGES:
            stem = s.path("gradcam", f"eval-{size}-s{seed}-stage{k}")
            by_stage[k].append(read_json(f"{stem}.gradcam.json")["LE"])
            if k == STAGES[0]:
                casm.append(read_json(f"{stem}.json")["LE"])
    best = min(STAGES, key=lambda k: sum(by_stage[k]))
    cells = [mean_std(by_stage[k]) + (" (best)" if k == best else "") for k in STAGES]
    return f"| {size} px | {len(seeds)} | {mean_std(casm)} | " + " | ".join(cells) + " |"


def report(s: Scale) -> str:
    lines = [
        "LE (lower is better) on the validation set; Grad-CAM explains the CASM's own classifier.",
        "",
        "| input | seeds | CASM (L100) | Grad-CAM stage 1 | stage 2 | stage 3 | stage 4 |",
        "|---|---|---|---|---|---|---|",
        row(s, 64, s.seeds),
        row(s, LARGE, s.seeds[:1]),
    ]
    return "\n".join(lines)
