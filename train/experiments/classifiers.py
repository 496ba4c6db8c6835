"""Experiment 4, many classifiers (Fig. 3 analogue): is the evidence gone from masked-out images?

Independently trained classifiers (`train --classifier-only`, other seeds than the mappings')
classify clean, masked-in, masked-out and inpainted masked-out images, for CASM (Table 2 (d))
and Baseline F (Table 2 (a)). The leak control (`eval --leak-control`) trains a classifier on
the binarised masks alone: when it beats chance, the mask's outline tells the class, and the
masked-out accuracies partly measure that leak rather than evidence left in the image.
"""

from __future__ import annotations

from jobs import Job, Scale, mean_std, read_json, train_job
from table2 import DATA, classifier_args

MODELS = {"CASM (L100)": "l100-entropy", "Baseline F": "f-entropy"}
VARIANTS = ("clean", "masked_in", "masked_out", "inpainted")


def jobs(s: Scale) -> list[Job]:
    out, data = s.path("classifiers"), s.dataset(DATA)
    result = [
        train_job(f"classifiers-c{k}", data, out, f"classifier-c{k}", *classifier_args(s, k),
                  deps=["data-synth"])
        for k in s.classifier_seeds
    ]  # fmt: skip
    judges = ",".join(s.path("classifiers", f"classifier-c{k}", "checkpoint.pt")
                      for k in s.classifier_seeds)  # fmt: skip
    for seed in s.seeds:
        models = [s.path("table2", f"{run}-s{seed}", "checkpoint.pt") for run in MODELS.values()]
        result.append(
            Job(
                f"classifiers-eval-s{seed}",
                ["eval", *models, data, "--classifiers", judges, "--leak-control",
                 "--json", s.path("classifiers", f"eval-s{seed}.json")],
                deps=[f"classifiers-c{k}" for k in s.classifier_seeds]
                + [f"table2-{run}-s{seed}" for run in MODELS.values()],
            )
        )  # fmt: skip
    return result


def report(s: Scale) -> str:
    lines = [
        f"Accuracy of {len(s.classifier_seeds)} independently trained classifiers (mean ± "
        f"half-range over classifiers and the mappings' {len(s.seeds)} seeds), and of the "
        "leak control (a classifier of the binarised masks alone):",
        "",
        "| masks of | clean | masked-in | masked-out | inpainted masked-out | mask-only "
        "(leak control) | chance |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, run in MODELS.items():
        accuracy = {v: [] for v in VARIANTS}
        leak, chance = [], []
        for seed in s.seeds:
            name = f"{run}-s{seed}"
            by_classifier = read_json(s.path("classifiers", f"eval-s{seed}.classifiers.json"))
            for result in by_classifier[name].values():
                for v in VARIANTS:
                    accuracy[v].append(result[v])
            control = read_json(s.path("classifiers", f"eval-s{seed}.leak.json"))[name]
            leak.append(control["accuracy"])
            chance.append(control["chance"])
        cells = [mean_std(accuracy[v]) for v in VARIANTS] + [mean_std(leak), mean_std(chance)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
