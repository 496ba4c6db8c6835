"""Experiment 6, objects made of parts, and the headline comparison over three seeds.

The parts set (`data synth --parts 3`) makes each object of three parts, any one of which
identifies the class: the class's shape (the favourite: largest, opaque), a patch of the
class's texture and the class's glyph (both smaller, blended over the clutter). A classifier
trained on clean images leans on the favourite, so a mapping trained against it alone
(Baseline F) need only hide the favourite, while CASM's classifiers keep learning from what
its masks leave, so its masks must cover every part. Per seed and data set: a classifier
pre-trained on clean images; Baseline F, L and L100 (entropy score, shared encoder) from it,
for the same steps as Table 2; one `eval` with the centre box and Grad-CAM of the pre-trained
classifier (stage 3, the best at 64 px in section 5). On the parts set `eval` also scores part
coverage (parts touched by the binarised mask, images with every part touched, the share of
mask weight on the least-covered part), and `benchmarks/parts_check.py` checks each seed's
classifier with each part removed. Today's shapes set (`data synth`) gets the same
comparison without L.
"""

from __future__ import annotations

from jobs import Job, Scale, mean_range, method_scores, read_json, train_job
from table2 import casm_args, classifier_args, data_job

SEEDS = (0, 1, 2)
GRADCAM_STAGE = "3"
# Data sets: name -> (data folder under the scale's data root, CASM presets).
SETS = {"parts": ("parts", ("F", "L", "L100")), "shapes": ("synth", ("F", "L100"))}
# Targets of the parts set, for every seed (issue 15).
TARGET_CASM_TOUCHED, TARGET_F_TOUCHED, TARGET_LE_RATIO = 0.8, 0.5, 0.6


def parts_data_job(s: Scale) -> Job:
    return Job(
        "data-parts",
        ["data", "synth", s.dataset("parts"), "--parts", "3", "--train-per-class",
         str(s.train_per_class), "--val-per-class", str(s.val_per_class)],
    )  # fmt: skip


def data_jobs(s: Scale) -> list[Job]:
    """The parts set; the shapes set is Table 2's (`data-synth`)."""
    return [parts_data_job(s)]


def run_name(preset: str, seed: int) -> str:
    return f"{preset.lower()}-s{seed}"


def jobs(s: Scale) -> list[Job]:
    result = data_jobs(s)
    for set_name, (folder, presets) in SETS.items():
        out, data = s.path("parts", set_name), s.dataset(folder)
        data_dep = "data-parts" if set_name == "parts" else data_job(s).name
        for seed in SEEDS:
            clf = f"parts-{set_name}-classifier-s{seed}"
            result.append(
                train_job(clf, data, out, f"classifier-s{seed}", *classifier_args(s, seed),
                          deps=[data_dep])
            )  # fmt: skip
            checkpoint = s.path("parts", set_name, f"classifier-s{seed}", "checkpoint.pt")
            names = [run_name(p, seed) for p in presets]
            for preset, name in zip(presets, names, strict=True):
                result.append(
                    train_job(
                        f"parts-{set_name}-{name}", data, out, name,
                        *casm_args(s, checkpoint, seed, preset), "--score", "entropy",
                        deps=[clf],
                    )
                )  # fmt: skip
            # F first: Grad-CAM explains the first model's classifier, F's frozen pre-trained one.
            result.append(
                Job(
                    f"parts-{set_name}-eval-s{seed}",
                    ["eval", *[s.path("parts", set_name, n, "checkpoint.pt") for n in names],
                     data, "--baseline", "center,gradcam", "--gradcam-stage", GRADCAM_STAGE,
                     "--json", s.path("parts", set_name, f"eval-s{seed}.json")],
                    deps=[f"parts-{set_name}-{n}" for n in names],
                )
            )  # fmt: skip
            if set_name == "parts":
                result.append(
                    Job(
                        f"parts-parts-check-s{seed}",
                        ["--classifier", checkpoint, "--data", data,
                         "--out", s.path("parts", set_name, f"check-s{seed}.json")],
                        deps=[clf],
                        script="benchmarks/parts_check.py",
                    )
                )  # fmt: skip
    return result


def scores(s: Scale, set_name: str, method: str, seed: int) -> dict:
    """`eval`'s scores of one method (a run's name, `center` or `gradcam`) for one seed."""
    stem = s.path("parts", set_name, f"eval-s{seed}")
    return method_scores(stem, method, run_name("F", seed))


METHODS = {"F": "Baseline F", "L": "CASM (L)", "L100": "CASM (L100)"}


def methods(set_name: str, seed: int) -> list[tuple[str, str]]:
    """(label, eval name) of every row of a data set's table."""
    presets = SETS[set_name][1]
    rows = [(METHODS[p], run_name(p, seed)) for p in presets]
    return rows + [(f"Grad-CAM (stage {GRADCAM_STAGE})", "gradcam"), ("centre box", "center")]


def comparison_table(s: Scale, set_name: str) -> str:
    parts = set_name == "parts"
    keys = ["LE", "OM", "F1", "mask_mean"]
    header = "| method | LE | OM | F1 | area |"
    if parts:
        keys += ["part_coverage", "parts_all_touched", "part_share_least"]
        header += " parts touched | all parts touched | least part's share |"
    header += " LE per seed |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row, (label, _) in enumerate(methods(set_name, SEEDS[0])):
        runs = [scores(s, set_name, methods(set_name, seed)[row][1], seed) for seed in SEEDS]
        cells = [mean_range([r.get(k) for r in runs]) for k in keys]
        per_seed = ", ".join(f"{r['LE']:.3f}" for r in runs)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {per_seed} |")
    return "\n".join(lines)


def redundancy_table(s: Scale) -> str:
    """Each seed's pre-trained classifier, with nothing and with each part removed."""
    checks = [read_json(s.path("parts", "parts", f"check-s{seed}.json")) for seed in SEEDS]
    kinds = list(checks[0]["accuracy"]["without"])
    favourite = checks[0]["favourite"]
    header = "| seed | clean | " + " | ".join(
        f"without {k}{' (favourite)' if k == favourite else ''}" for k in kinds
    )
    lines = [header + " | redundant | prefers the favourite |", "|" + "---|" * (len(kinds) + 4)]
    for seed, c in zip(SEEDS, checks, strict=True):
        without = " | ".join(f"{c['accuracy']['without'][k]:.3f}" for k in kinds)
        lines.append(
            f"| {seed} | {c['accuracy']['clean']:.3f} | {without} | "
            f"{'yes' if c['redundant'] else 'no'} | {'yes' if c['prefers_favourite'] else 'no'} |"
        )
    return "\n".join(lines)


def targets_table(s: Scale) -> str:
    """The parts set's targets, seed by seed."""
    lines = [
        f"| seed | CASM (L100) parts touched (>= {TARGET_CASM_TOUCHED}) | Baseline F parts "
        f"touched (<= {TARGET_F_TOUCHED}) | LE L100 / F (<= {TARGET_LE_RATIO}) |",
        "|---|---|---|---|",
    ]
    for seed in SEEDS:
        casm = scores(s, "parts", run_name("L100", seed), seed)
        f = scores(s, "parts", run_name("F", seed), seed)
        ratio = casm["LE"] / f["LE"] if f["LE"] else float("inf")
        cells = [
            (casm["part_coverage"], casm["part_coverage"] >= TARGET_CASM_TOUCHED),
            (f["part_coverage"], f["part_coverage"] <= TARGET_F_TOUCHED),
            (ratio, ratio <= TARGET_LE_RATIO),
        ]
        text = " | ".join(f"{v:.3f} ({'met' if ok else 'missed'})" for v, ok in cells)
        lines.append(f"| {seed} | {text} |")
    return "\n".join(lines)


def report(s: Scale) -> str:
    spread = f"mean (min-max) over seeds {', '.join(map(str, SEEDS))}"
    return "\n\n".join(
        [
            f"**Parts set** ({spread}):",
            comparison_table(s, "parts"),
            "Targets, per seed:",
            targets_table(s),
            "Redundancy of the parts (`parts_check.py`: validation accuracy of each seed's "
            "pre-trained classifier):",
            redundancy_table(s),
            f"**Shapes set** (`data synth`, {spread}):",
            comparison_table(s, "shapes"),
        ]
    )
