"""Experiment 7, mappings of their own: how small can the mapping be when it needs no classifier?

Per seed, mappings with an encoder of their own (`train --mapping-arch A --mapping-width W`),
freshly initialised and trained by the mapping's loss alone, in the CASM phase (L100) of Table
2's classifier of that seed, beside the shared CASM of Table 2 (d), which starts from the same
classifier and takes the same steps. One `eval` per seed scores them, with Grad-CAM at its
best stage for this recipe (3, section 5) on the shared CASM's classifier. The classifier each
mapping trained beside is in its checkpoint; the masks need none. The cost of each is in
benchmarks/RESULTS.md (the frontier).
"""

from __future__ import annotations

from jobs import Job, Scale, mean_std, method_scores, train_job
from table2 import DATA, casm_args

# (arch, width): the recipe's ResNet-18 width and smaller, and a MobileNetV3 at its own width.
MAPPINGS = (("resnet18", 16), ("resnet18", 8), ("resnet18", 4), ("mobilenet_v3_small", 64))
SHARED = "l100-entropy"  # Table 2 (d)
GRADCAM_STAGE = 3


def run_name(arch: str, width: int, seed: int) -> str:
    return f"map-{arch}-w{width}-s{seed}"


def jobs(s: Scale) -> list[Job]:
    out, data = s.path("mappings"), s.dataset(DATA)
    result = []
    for seed in s.seeds:
        classifier = s.path("table2", f"classifier-s{seed}", "checkpoint.pt")
        names = []
        for arch, width in MAPPINGS:
            name = run_name(arch, width, seed)
            names.append(name)
            result.append(
                train_job(
                    f"mappings-{name}", data, out, name, *casm_args(s, classifier, seed),
                    "--mapping-arch", arch, "--mapping-width", str(width),
                    deps=[f"table2-classifier-s{seed}"],
                )
            )  # fmt: skip
        shared = s.path("table2", f"{SHARED}-s{seed}", "checkpoint.pt")
        models = [shared, *(s.path("mappings", n, "checkpoint.pt") for n in names)]
        result.append(
            Job(
                f"mappings-eval-s{seed}",
                ["eval", *models, data, "--baseline", "gradcam", "--gradcam-stage",
                 str(GRADCAM_STAGE), "--json", s.path("mappings", f"eval-s{seed}.json")],
                deps=[f"table2-{SHARED}-s{seed}", *(f"mappings-{n}" for n in names)],
            )
        )  # fmt: skip
    return result


def report(s: Scale) -> str:
    keys = ("LE", "MaxBoxAccV2", "F1", "mask_mean")
    lines = [
        "| masks of | encoder of the masks | LE | MaxBoxAccV2 | F1 | area |",
        "|---|---|---|---|---|---|",
    ]

    def row(label: str, encoder: str, method: str) -> str:
        runs = [
            method_scores(s.path("mappings", f"eval-s{seed}"), method(seed), f"{SHARED}-s{seed}")
            for seed in s.seeds
        ]
        cells = [mean_std([r.get(k) for r in runs]) for k in keys]
        return f"| {label} | {encoder} | " + " | ".join(cells) + " |"

    lines.append(row("CASM (L100), Table 2 (d)", "the classifier's", lambda k: f"{SHARED}-s{k}"))
    for arch, width in MAPPINGS:
        label = f"mapping {arch} at width {width}"
        lines.append(row(label, "its own", lambda k, a=arch, w=width: run_name(a, w, k)))
    lines.append(row(f"Grad-CAM, stage {GRADCAM_STAGE}", "the classifier's", lambda k: "gradcam"))
    return "\n".join(lines)
