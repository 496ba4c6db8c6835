"""Experiment 2, two copies (§2.1): does the mask cover both copies of a duplicated object?

Images hold the same object twice, side by side (`data synth --copies 2`), and are stretched
whole to the input size so both copies stay in view (`--resize stretch`, no crop, no flip).

- One-sided set-up (the paper's situation): the starting classifier is pre-trained on images
  whose right copy is replaced by clutter (`--right clutter`), so it learns to look left only.
  Baseline F freezes it; CASM (L, L100) starts from it and keeps training it on real two-copy
  images.
- Symmetric set-up: the starting classifier is pre-trained on real two-copy images.

Reported: the share of mask mass on the copy with less mass (0.5: both covered equally) and
the fraction of images whose binarised mask touches both copies (`eval --copies`). LE and F1
are there for completeness only: the box of a mask over both copies overlaps neither copy's
box by half, so here LE favours masks of one copy. The starting classifiers' accuracy is on
the validation images of their own data (stretched two-copy images at 64 px are hard to
classify with this small a network and budget).
"""

from __future__ import annotations

from jobs import Job, Scale, last_epoch, mean_std, method_scores, train_job
from table2 import casm_args, classifier_args

SETUPS = {"one-sided": "copies2-clutter", "symmetric": "copies2"}  # classifier's data
PRESETS = ("F", "L", "L100")
STRETCH = ["--resize", "stretch"]


def data_jobs(s: Scale) -> list[Job]:
    # Half the images of the 10-class set (two copies cost twice the pixels to generate);
    # twice the epoch share below keeps the number of steps.
    per_class = str(max(1, s.train_per_class // 2))
    common = ["--copies", "2", "--train-per-class", per_class, "--val-per-class"]
    return [
        Job("data-copies2", ["data", "synth", s.dataset("copies2"), *common, str(s.val_per_class)]),
        Job(
            "data-copies2-clutter",
            ["data", "synth", s.dataset("copies2-clutter"), *common, str(s.val_per_class),
             "--right", "clutter"],
        ),
    ]  # fmt: skip


def jobs(s: Scale) -> list[Job]:
    out, data = s.path("copies"), s.dataset("copies2")
    fraction = min(1.0, 2 * s.epoch_fraction)
    result = data_jobs(s)
    for setup, clf_data in SETUPS.items():
        for seed in s.seeds:
            clf = f"{setup}-classifier-s{seed}"
            result.append(
                train_job(
                    f"copies-{clf}", s.dataset(clf_data), out, clf, *classifier_args(s, seed),
                    *STRETCH, deps=[f"data-{clf_data}"],
                )
            )  # fmt: skip
            checkpoint = s.path("copies", clf, "checkpoint.pt")
            names = [f"{setup}-{p.lower()}-s{seed}" for p in PRESETS]
            for preset, name in zip(PRESETS, names, strict=True):
                result.append(
                    train_job(
                        f"copies-{name}", data, out, name,
                        *casm_args(s, checkpoint, seed, preset, fraction),
                        *STRETCH, deps=[f"copies-{clf}", "data-copies2"],
                    )
                )  # fmt: skip
            result.append(
                Job(
                    f"copies-eval-{setup}-s{seed}",
                    ["eval", *[s.path("copies", n, "checkpoint.pt") for n in names],
                     data, *STRETCH, "--copies",
                     "--json", s.path("copies", f"eval-{setup}-s{seed}.json")],
                    deps=[f"copies-{n}" for n in names],
                )
            )  # fmt: skip
    return result


def report(s: Scale) -> str:
    lines = [
        "| set-up | starting classifier's accuracy | method | lighter-copy share | "
        "touches both | LE | F1 | area |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for setup in SETUPS:
        acc = [
            last_epoch(s.path("copies", f"{setup}-classifier-s{seed}"))["val_acc"]
            for seed in s.seeds
        ]
        for i, preset in enumerate(PRESETS):
            runs = [
                method_scores(
                    s.path("copies", f"eval-{setup}-s{seed}"),
                    f"{setup}-{preset.lower()}-s{seed}",
                    first=f"{setup}-{PRESETS[0].lower()}-s{seed}",
                )
                for seed in s.seeds
            ]
            keys = ("copy_share_lighter", "copy_touch_both", "LE", "F1", "mask_mean")
            cells = " | ".join(mean_std([r[k] for r in runs]) for k in keys)
            first = f"{setup} | {mean_std(acc)}" if i == 0 else " | "
            lines.append(f"| {first} | {preset} | {cells} |")
    return "\n".join(lines)
