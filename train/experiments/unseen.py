"""Experiment 3, unseen classes (Table 3 analogue): does the mapping localise classes it never saw?

Mappings (L100, entropy) are trained on nested subsets of the 10 classes (the first 2, the
first 5: `data synth --num-classes N`, the same images as the 10-class set), for as many steps
as the 10-class runs of Table 2, which give the last row. Each is scored on the 10-class
validation set, separately on the classes it was trained on (`eval --classes seen`) and on
the others (`--classes unseen`).
"""

from __future__ import annotations

from jobs import Job, Scale, mean_std, read_json, train_job
from table2 import DATA, casm_args, classifier_args, scores

SUBSETS = (2, 5)
ALL_CLASSES = 10


def jobs(s: Scale) -> list[Job]:
    out, full = s.path("unseen"), s.dataset(DATA)
    train_images = s.train_per_class * ALL_CLASSES // 2  # every subset: half the 10-class set
    result = []
    for n in SUBSETS:
        data = s.dataset(f"classes{n}")
        result.append(
            Job(
                f"data-classes{n}",
                ["data", "synth", data, "--num-classes", str(n),
                 "--train-per-class", str(train_images // n),
                 "--val-per-class", str(s.val_per_class)],
            )
        )  # fmt: skip
        for seed in s.seeds:
            clf, name = f"classifier-c{n}-s{seed}", f"l100-c{n}-s{seed}"
            result.append(
                train_job(f"unseen-{clf}", data, out, clf, *classifier_args(s, seed),
                          deps=[f"data-classes{n}"])
            )  # fmt: skip
            checkpoint = s.path("unseen", clf, "checkpoint.pt")
            fraction = min(1.0, 2 * s.epoch_fraction)  # half the images: the same steps
            result.append(
                train_job(f"unseen-{name}", data, out, name,
                          *casm_args(s, checkpoint, seed, "L100", fraction), deps=[f"unseen-{clf}"])
            )  # fmt: skip
            for which in ("seen", "unseen"):
                result.append(
                    Job(
                        f"unseen-eval-{name}-{which}",
                        ["eval", s.path("unseen", name, "checkpoint.pt"), full,
                         "--classes", which,
                         "--json", s.path("unseen", f"eval-{name}-{which}.json")],
                        deps=[f"unseen-{name}", "data-synth"],
                    )
                )  # fmt: skip
    return result


def report(s: Scale) -> str:
    lines = [
        "| classes trained on | LE seen | LE unseen | F1 seen | F1 unseen | area seen | "
        "area unseen |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in SUBSETS:
        seen = [read_json(s.path("unseen", f"eval-l100-c{n}-s{x}-seen.json")) for x in s.seeds]
        unseen = [read_json(s.path("unseen", f"eval-l100-c{n}-s{x}-unseen.json")) for x in s.seeds]
        cells = []
        for key in ("LE", "F1", "mask_mean"):
            cells += [mean_std([r[key] for r in seen]), mean_std([r[key] for r in unseen])]
        lines.append(f"| {n} of {ALL_CLASSES} | " + " | ".join(cells) + " |")
    full = [scores(s, f"l100-entropy-s{x}", x) for x in s.seeds]  # Table 2's (d)
    cells = [f"{mean_std([r[k] for r in full])} | -" for k in ("LE", "F1", "mask_mean")]
    lines.append(f"| {ALL_CLASSES} of {ALL_CLASSES} (Table 2 (d)) | " + " | ".join(cells) + " |")
    return "\n".join(lines)
