"""Experiment 1, the Table 2 analogue: thinning strategies, score functions, a shared encoder.

Per seed: one classifier pre-trained on clean images, then every CASM variant starts from it
for the same number of steps: F, L, FL, L100, L1000 with the entropy and the classification
score, and F, L, L100 with an encoder of their own (`--unshared`). One `eval` per seed scores
them all on the validation set (LE, OM, F1 and the mask statistics). The runs are about 470
steps, so L100 and L1000 store a snapshot every 10 and 100 steps, a tenth of the presets'
periods (`--smf`): with 1000, L1000 would keep only its first snapshot and be FL exactly.
The area weight is the default recipe's (2.5) for both scores.
"""

from __future__ import annotations

from jobs import Job, Scale, mean_std, method_scores, read_json, train_job

PRESETS = ("F", "L", "FL", "L100", "L1000")
SCORES = ("entropy", "classification")
UNSHARED = ("F", "L", "L100")
DATA = "synth"


def variants() -> list[tuple[str, str, bool]]:
    """(preset, score, shared) of every row, in the table's order."""
    rows = [(p, s, True) for s in SCORES for p in PRESETS]
    return rows + [(p, "entropy", False) for p in UNSHARED]


def run_name(preset: str, score: str, shared: bool, seed: int) -> str:
    return f"{preset.lower()}-{score}{'' if shared else '-unshared'}-s{seed}"


def data_job(s: Scale) -> Job:
    return Job(
        "data-synth",
        ["data", "synth", s.dataset(DATA), "--train-per-class", str(s.train_per_class),
         "--val-per-class", str(s.val_per_class)],
    )  # fmt: skip


def classifier_args(s: Scale, seed: int) -> list[str]:
    return [
        "--classifier-only", "--width", str(s.width), "--pretrain-epochs",
        str(s.pretrain_epochs), "--seed", str(seed),
    ]  # fmt: skip


# The runs are about 470 steps, a tenth or less of the reference's, so the snapshot periods
# are a tenth of the presets' too: with 100 and 1000, L1000 would store only its first
# snapshot and be FL exactly (the same seed gives the same run), and L100 would keep the whole
# history. With 10 and 100, L100 holds the last ~300 steps and L1000 five snapshots of the run.
SMF = {"L100": 10, "L1000": 100}


def casm_args(
    s: Scale, classifier: str, seed: int, preset: str = "L100", fraction: float = 0.0
) -> list[str]:
    """The CASM phase every experiment uses, from a pre-trained classifier.

    `fraction`: the share of the training set per epoch, when not the scale's (a data set
    half as large takes twice the share, so every experiment trains for the same steps).
    """
    smf = ["--smf", str(SMF[preset])] if preset in SMF else []
    return [
        "--weights", classifier, "--pretrain-epochs", "0", "--width", str(s.width),
        "--epochs", str(s.epochs), "--epoch-fraction", str(fraction or s.epoch_fraction),
        "--seed", str(seed), "--reproduce", preset, *smf,
    ]  # fmt: skip


def jobs(s: Scale) -> list[Job]:
    out, data = s.path("table2"), s.dataset(DATA)
    result = [data_job(s)]
    for seed in s.seeds:
        clf = f"table2-classifier-s{seed}"
        result.append(
            train_job(clf, data, out, f"classifier-s{seed}", *classifier_args(s, seed),
                      deps=["data-synth"])
        )  # fmt: skip
        checkpoint = s.path("table2", f"classifier-s{seed}", "checkpoint.pt")
        names = []
        for preset, score, shared in variants():
            name = run_name(preset, score, shared, seed)
            extra = [] if shared else ["--unshared"]
            result.append(
                train_job(
                    f"table2-{name}", data, out, name, *casm_args(s, checkpoint, seed, preset),
                    "--score", score, *extra, deps=[clf],
                )
            )  # fmt: skip
            names.append(name)
        result.append(
            Job(
                f"table2-eval-s{seed}",
                ["eval", *[s.path("table2", n, "checkpoint.pt") for n in names], data,
                 "--baseline", "center", "--json", s.path("table2", f"eval-s{seed}.json")],
                deps=[f"table2-{n}" for n in names],
            )
        )  # fmt: skip
    return result


def scores(s: Scale, name: str, seed: int) -> dict:
    """The eval scores of run `name` (the first model's file has no suffix)."""
    first = run_name(*variants()[0], seed)
    return method_scores(s.path("table2", f"eval-s{seed}"), name, first)


def report(s: Scale) -> str:
    keys = ("LE", "OM", "F1", "mask_mean", "mask_std", "mask_entropy", "mask_tv")
    header = "| | preset | score | encoder | LE | OM | F1 | area | std | entropy | TV |"
    lines = [header, "|" + "---|" * 11]
    letters = "abcdefghijklm"
    for letter, (preset, score, shared) in zip(letters, variants(), strict=True):
        runs = [scores(s, run_name(preset, score, shared, seed), seed) for seed in s.seeds]
        cells = [mean_std([r[k] for r in runs]) for k in keys]
        encoder = "shared" if shared else "unshared"
        lines.append(f"| ({letter}) | {preset} | {score} | {encoder} | " + " | ".join(cells) + " |")
    centre = [read_json(s.path("table2", f"eval-s{seed}.center.json")) for seed in s.seeds]
    lines.append(
        f"| | centre box | | | {mean_std([c['LE'] for c in centre])} | - | "
        f"{mean_std([c['F1'] for c in centre])} | {centre[0]['mask_mean']:.3f} | | | |"
    )
    return "\n".join(lines)
