"""Experiment 8, real photos: Tiny ImageNet over three seeds.

CASM against Baseline F, Grad-CAM, the centre box and the full image on the first 20 classes
(sorted wnids) of Tiny ImageNet (`casm-deploy data tiny-imagenet`,
from the archive `$TINY_IMAGENET`, by default `../shared/data/tiny-imagenet-100.zip`), 500
training and 50 validation photos a class at 64 px, scored uncropped on the validation photos.
Per seed: a classifier pre-trained on clean photos (`--recipe tiny-imagenet --classifier-only`),
then CASM (L100, entropy score, shared encoder) and Baseline F from it (`--recipe
tiny-imagenet`); one `eval` with the centre box and the full image, and one per encoder stage
for Grad-CAM of the pre-trained classifier (F's frozen one), whose best stage per seed is
reported (the choice most generous to Grad-CAM). The sweep varies one setting of CASM's at a
time from seed 0's classifier. Unseen classes: a classifier and CASM trained on the first half
of the classes only, scored on the other half against the same baselines and against the CASM
of all the classes. Many classifiers: classifiers trained independently (other seeds) classify
the photos CASM's and F's binarised masks leave (masked-out) or keep (masked-in).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from jobs import (
    ROOT,
    Job,
    Scale,
    mean_range,
    method_scores,
    read_json,
    train_job,
)

SOURCE = os.environ.get("TINY_IMAGENET", "../shared/data/tiny-imagenet-100.zip")
CLASSES = {"full": 20, "smoke": 2}  # by scale: why 20, the section's text says
SEEDS = (0, 1, 2)
STAGES = (1, 2, 3, 4)
RESULTS_JSON = ROOT / "train" / "results" / "tiny_imagenet.json"
FIGURE = ROOT / "train" / "results" / "tiny_imagenet_masks.png"  # the only data-set images here
# The sweep: one setting changed at a time from the recipe, on seed 0 (name -> its options),
# CASM from seed 0's classifier; the recipe's own row is casm-s0. Chosen to fit the hours the
# section had: each run is about 20 minutes of one thread when two run at a time.
SWEEP = {
    "lambda-1.5": ["--lambda-r", "1.5"],
    "lambda-2.5": ["--lambda-r", "2.5"],
    "fill-black": ["--fill", "black"],
    "crop-0.15": ["--crop-scale", "0.15"],
    "pool-5": ["--pool-size", "5"],
    "bilinear": ["--upsample", "bilinear"],  # the mask's last upsampling, as the paper's text
}
BEST = "bilinear"  # the sweep's best LE on seed 0, then run over the other seeds too
METHODS = {  # the JSON's keys and the table's rows
    "casm": "CASM (L100)",
    "baseline-f": "Baseline F",
    "gradcam": "Grad-CAM (best stage)",
    "center": "centre box",
    "full": "full image",
}
KEYS = ("LE", "OM", "F1", "MaxBoxAccV2", "mask_mean")


def recipe(s: Scale, seed: int) -> list[str]:
    """The recipe's options, fewer epochs at the smoke scale (a check of the plumbing)."""
    if s.name == "smoke":
        return ["--recipe", "tiny-imagenet", "--seed", str(seed), "--pretrain-epochs", "1",
                "--epochs", "1", "--width", "8"]  # fmt: skip
    return ["--recipe", "tiny-imagenet", "--seed", str(seed)]


def data(s: Scale, classes: int) -> str:
    return s.dataset(f"tiny-imagenet-{classes}")


def data_job(s: Scale, classes: int) -> Job:
    return Job(
        f"tiny-data-{classes}",
        ["data", "tiny-imagenet", SOURCE, data(s, classes), "--classes", str(classes)],
    )


def checkpoint(s: Scale, run: str) -> str:
    return s.path("tiny", run, "checkpoint.pt")


def eval_job(name: str, s: Scale, models: list[str], *args: str, deps: list[str]) -> Job:
    return Job(
        f"tiny-eval-{name}",
        ["eval", *[checkpoint(s, m) for m in models], *args,
         "--json", s.path("tiny", f"eval-{name}.json")],
        deps=deps,
    )  # fmt: skip


def seed_jobs(s: Scale, seed: int, classes: int, tag: str = "", f: bool = True) -> list[Job]:
    """A classifier, CASM and (`f`) Baseline F from it, on the first `classes` classes."""
    out, folder = s.path("tiny"), data(s, classes)
    clf, casm, baseline = (f"{kind}{tag}-s{seed}" for kind in ("classifier", "casm", "f"))
    start = ["--weights", checkpoint(s, clf), "--pretrain-epochs", "0"]
    base = recipe(s, seed)
    result = [
        train_job(f"tiny-{clf}", folder, out, clf, *base, "--classifier-only",
                  deps=[f"tiny-data-{classes}"]),
        train_job(f"tiny-{casm}", folder, out, casm, *base, *start, deps=[f"tiny-{clf}"]),
    ]  # fmt: skip
    if f:
        result.append(
            train_job(f"tiny-{baseline}", folder, out, baseline, *base, *start,
                      "--reproduce", "F", deps=[f"tiny-{clf}"])
        )  # fmt: skip
    return result


def jobs(s: Scale) -> list[Job]:
    n = CLASSES[s.name]
    folder, half = data(s, n), n // 2
    result = [data_job(s, n), data_job(s, half)]
    for seed in SEEDS:
        result += seed_jobs(s, seed, n)
        runs = [f"f-s{seed}", f"casm-s{seed}"]  # F first: Grad-CAM explains its classifier
        trained = [f"tiny-{run}" for run in runs]
        result.append(
            eval_job(f"s{seed}", s, runs, folder, "--baseline", "center,full", deps=trained)
        )
        for stage in STAGES:
            result.append(
                eval_job(f"gradcam{stage}-s{seed}", s, runs[:1], folder, "--baseline", "gradcam",
                         "--gradcam-stage", str(stage), deps=trained[:1])
            )  # fmt: skip
        # unseen classes: the first half only, scored on the other half; Grad-CAM at stage 4,
        # its best stage in every seed of the comparison
        result += seed_jobs(s, seed, half, tag=f"-c{half}", f=False)
        models = [f"casm-c{half}-s{seed}", f"casm-s{seed}"]
        result.append(
            eval_job(f"unseen-s{seed}", s, models, folder, "--classes", "unseen",
                     "--baseline", "center,full,gradcam", "--gradcam-stage", "4",
                     deps=[f"tiny-{m}" for m in models])
        )  # fmt: skip
    for seed in SEEDS:
        runs = [f"casm-s{seed}", f"f-s{seed}"]
        judges = [f"classifier-s{other}" for other in SEEDS if other != seed]
        paths = ",".join(checkpoint(s, run) for run in judges)
        result.append(
            eval_job(f"judges-s{seed}", s, runs, folder, "--classifiers", paths,
                     deps=[f"tiny-{r}" for r in runs + judges])
        )  # fmt: skip
    # where the masks fail: LE by the true box's size, each seed's CASM and F, the centre box
    runs = [f"{kind}-s{seed}" for seed in SEEDS for kind in ("casm", "f")]
    result.append(
        Job("tiny-sizes", [folder, s.path("tiny", "sizes.json"),
                           *[f"{run}={checkpoint(s, run)}" for run in runs]],
            deps=[f"tiny-{run}" for run in runs], script="train/experiments/object_sizes.py")
    )  # fmt: skip
    # the README's figure: seed 0's masks on 12 validation photos (F first: Grad-CAM explains
    # its classifier, as in the comparison); `report` copies its masks.png to FIGURE
    result.append(
        Job("tiny-figure", ["visualize", checkpoint(s, "f-s0"), checkpoint(s, "casm-s0"), folder,
                            "--gradcam-stage", "4", "--num-images", "12",
                            "--out", s.path("tiny", "figure")],
            deps=["tiny-f-s0", "tiny-casm-s0"])
    )  # fmt: skip
    clf = checkpoint(s, "classifier-s0")
    for name, options in SWEEP.items():
        run = f"sweep-{name}"
        result.append(
            train_job(f"tiny-{run}", folder, s.path("tiny"), run, *recipe(s, 0), "--weights",
                      clf, "--pretrain-epochs", "0", *options, deps=["tiny-classifier-s0"])
        )  # fmt: skip
        # one eval each, so that a setting added later is one job more
        result.append(eval_job(run, s, [run], folder, deps=[f"tiny-{run}"]))
    for seed in SEEDS[1:]:  # seed 0's is the sweep's run
        run = f"casm-{BEST}-s{seed}"
        result.append(
            train_job(f"tiny-{run}", folder, s.path("tiny"), run, *recipe(s, seed), "--weights",
                      checkpoint(s, f"classifier-s{seed}"), "--pretrain-epochs", "0",
                      *SWEEP[BEST], deps=[f"tiny-classifier-s{seed}"])
        )  # fmt: skip
        result.append(eval_job(run, s, [run], folder, deps=[f"tiny-{run}"]))
    return result


def scores(s: Scale, eval_name: str, method: str, first: str) -> dict:
    return method_scores(s.path("tiny", f"eval-{eval_name}"), method, first)


def best_gradcam(s: Scale, seed: int) -> tuple[int, dict]:
    """The encoder stage whose Grad-CAM has the lowest LE for this seed, and its scores."""
    by_stage = {k: scores(s, f"gradcam{k}-s{seed}", "gradcam", f"f-s{seed}") for k in STAGES}
    stage = min(by_stage, key=lambda k: by_stage[k]["LE"])
    return stage, by_stage[stage]


def seed_results(s: Scale, seed: int) -> dict:
    """One seed's entry of tiny_imagenet.json."""
    first = f"f-s{seed}"
    methods = {
        "casm": scores(s, f"s{seed}", f"casm-s{seed}", first),
        "baseline-f": scores(s, f"s{seed}", first, first),
        "gradcam": best_gradcam(s, seed)[1],
        "center": scores(s, f"s{seed}", "center", first),
        "full": scores(s, f"s{seed}", "full", first),
    }
    return {
        "seed": seed,
        "top1": last_line(s, f"classifier-s{seed}")["val_acc"],
        "gradcam_stage": best_gradcam(s, seed)[0],
        "methods": {
            name: {k: m.get(k) for k in ("LE", "OM", "F1", "MaxBoxAccV2", "mask_mean")}
            for name, m in methods.items()
        },
    }


def comparison_table(results: list[dict]) -> str:
    header = "| method | LE | OM | F1 | MaxBoxAccV2 | area | LE per seed |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for key, label in METHODS.items():
        runs = [r["methods"][key] for r in results]
        cells = [mean_range([m[k] for m in runs]) for k in KEYS]
        per_seed = ", ".join(f"{m['LE']:.3f}" for m in runs)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {per_seed} |")
    return "\n".join(lines)


def last_line(s: Scale, run: str) -> dict:
    lines = Path(s.path("tiny", run, "metrics.jsonl")).read_text().splitlines()
    return json.loads(lines[-1])


def sweep_table(s: Scale) -> str:
    lines = [
        "| CASM, one change from the recipe | LE | F1 | MaxBoxAccV2 | area |",
        "|---|---|---|---|---|",
    ]
    rows = [("the recipe (casm-s0)", scores(s, "s0", "casm-s0", "f-s0"))]
    for name, options in SWEEP.items():
        run = f"sweep-{name}"
        rows.append((f"`{' '.join(options)}`", scores(s, run, run, run)))
    for change, m in rows:
        cells = " | ".join(f"{m[k]:.3f}" for k in ("LE", "F1", "MaxBoxAccV2", "mask_mean"))
        lines.append(f"| {change} | {cells} |")
    return "\n".join(lines)


UNSEEN = {  # eval-unseen's methods: label -> name in its JSON files
    "CASM of the first half (unseen classes)": "casm-c{half}-s{seed}",
    "CASM of all the classes (seen)": "casm-s{seed}",
    "Grad-CAM, stage 4, first half's classifier": "gradcam",
    "centre box": "center",
    "full image": "full",
}


def unseen_table(s: Scale) -> str:
    half = CLASSES[s.name] // 2
    lines = ["| method | LE | F1 | MaxBoxAccV2 | area |", "|---|---|---|---|---|"]
    for label, name in UNSEEN.items():
        runs = []
        for seed in SEEDS:
            first = f"casm-c{half}-s{seed}"
            runs.append(scores(s, f"unseen-s{seed}", name.format(half=half, seed=seed), first))
        cells = [mean_range([m[k] for m in runs]) for k in ("LE", "F1", "MaxBoxAccV2", "mask_mean")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


VARIANTS = ("clean", "masked_in", "masked_out", "inpainted")


def judges_table(s: Scale) -> str:
    lines = [
        "| masks of | clean | masked-in | masked-out | inpainted masked-out |",
        "|---|---|---|---|---|",
    ]
    for label, run in (("CASM (L100)", "casm"), ("Baseline F", "f")):
        accuracy = {v: [] for v in VARIANTS}
        for seed in SEEDS:
            judged = read_json(s.path("tiny", f"eval-judges-s{seed}.classifiers.json"))
            for result in judged[f"{run}-s{seed}"].values():
                for v in VARIANTS:
                    accuracy[v].append(result[v])
        lines.append(f"| {label} | " + " | ".join(mean_range(accuracy[v]) for v in VARIANTS) + " |")
    return "\n".join(lines)


def sizes_table(s: Scale) -> str:
    """LE by the true box's share of the frame (object_sizes.py), mean over seeds."""
    sizes = read_json(s.path("tiny", "sizes.json"))
    bins = sizes["center"]["bins"]
    head = " | ".join(f"LE, box {b['lo']:.2f}-{min(b['hi'], 1):.2f} ({b['n']})" for b in bins)
    lines = [
        f"| method | {head} | predicted box area by bin | corr |",
        "|---|" + "---|" * len(bins) + "---|---|",
    ]

    def mean(runs: list[dict], i: int, key: str, digits: int) -> str:
        values = [r["bins"][i][key] for r in runs if r["bins"][i]["n"]]  # an empty bin: -
        return f"{sum(values) / len(values):.{digits}f}" if values else "-"

    for label, kind in (("CASM (L100)", "casm"), ("Baseline F", "f"), ("centre box", "center")):
        runs = [sizes["center"]] if kind == "center" else [sizes[f"{kind}-s{k}"] for k in SEEDS]
        cells = [mean(runs, i, "LE", 3) for i in range(len(bins))]
        boxes = ", ".join(mean(runs, i, "box_area", 2) for i in range(len(bins)))
        corr = sum(r["corr"] for r in runs) / len(runs)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {boxes} | {corr:.2f} |")
    return "\n".join(lines)


def best_table(s: Scale) -> str:
    """The sweep's best setting over the three seeds, against the recipe's CASM."""
    recipe_runs = [scores(s, f"s{k}", f"casm-s{k}", f"f-s{k}") for k in SEEDS]
    names = [f"sweep-{BEST}" if k == 0 else f"casm-{BEST}-s{k}" for k in SEEDS]
    best_runs = [scores(s, name, name, name) for name in names]
    lines = ["| CASM | LE | MaxBoxAccV2 | area | LE per seed |", "|---|---|---|---|---|"]
    for label, runs in (("the recipe", recipe_runs), (f"`{' '.join(SWEEP[BEST])}`", best_runs)):
        cells = [mean_range([m[k] for m in runs]) for k in ("LE", "MaxBoxAccV2", "mask_mean")]
        per_seed = ", ".join(f"{m['LE']:.3f}" for m in runs)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {per_seed} |")
    return "\n".join(lines)


def report(s: Scale) -> str:
    results = [seed_results(s, seed) for seed in SEEDS]
    if s.name == "full":
        RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_JSON.write_text(json.dumps({"seeds": results}, indent=2) + "\n")
        shutil.copyfile(s.path("tiny", "figure", "masks.png"), FIGURE)
    top1 = mean_range([r["top1"] for r in results])
    stages = ", ".join(str(r["gradcam_stage"]) for r in results)
    spread = f"mean (min-max) over seeds {', '.join(map(str, SEEDS))}"
    n, half = CLASSES[s.name], CLASSES[s.name] // 2
    return "\n\n".join(
        [
            f"**The comparison** ({n} classes, {spread}; also in "
            f"`train/results/tiny_imagenet.json`). The classifiers' top-1 on the validation "
            f"photos: {top1}. Grad-CAM's best stage, per seed: {stages}.",
            comparison_table(results),
            f"**Unseen classes**: a classifier and CASM trained on the first {half} classes, "
            f"scored on the other {half} ({spread}):",
            unseen_table(s),
            "**Many classifiers**: each seed's masks judged by the other two seeds' classifiers "
            "(trained independently on the clean photos), classifying what the binarised masks "
            f"keep and leave ({spread} and the two classifiers):",
            judges_table(s),
            "**Where the masks fail** (`train/experiments/object_sizes.py`, mean over seeds): "
            "LE by the share of the frame the true box covers, the predicted boxes' mean area in "
            "each bin, and the correlation of mask area with true box area (corr):",
            sizes_table(s),
            "**The sweep** (seed 0, one change at a time from the recipe):",
            sweep_table(s),
            f"**The sweep's best LE over the three seeds** (`{' '.join(SWEEP[BEST])}`; seed 0's "
            f"is the sweep's run, mean (min-max) over seeds {', '.join(map(str, SEEDS))}):",
            best_table(s),
        ]
    )
