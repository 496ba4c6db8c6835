"""Experiment 4, many classifiers (Fig. 3 analogue): is the evidence gone from masked-out images?

Independently trained classifiers (`train --classifier-only`, other seeds than the mappings')
classify clean, masked-in, masked-out and inpainted masked-out images, for CASM (Table 2 (d))
and Baseline F (Table 2 (a)). Besides ResNet-18s like the one the mappings trained against,
the judges include classifiers of other architectures at the same width (MobileNetV3-small and
ConvNeXt-Tiny): masks made against one architecture, judged by classifiers of others. The
leak control (`eval --leak-control`) trains a classifier on the binarised masks alone: when
it beats chance, the mask's outline tells the class, and the masked-out accuracies partly
measure that leak rather than evidence left in the image.
"""

from __future__ import annotations

from jobs import Job, Scale, mean_std, read_json, train_job
from table2 import DATA, classifier_args

MODELS = {"CASM (L100)": "l100-entropy", "Baseline F": "f-entropy"}
VARIANTS = ("clean", "masked_in", "masked_out", "inpainted")
OTHER_ARCHS = ("mobilenet_v3_small", "convnext_tiny")


def judges(s: Scale) -> dict[str, str]:
    """Each judge's run name -> its architecture: the ResNet-18s, then the other families."""
    named = {f"classifier-c{k}": "resnet18" for k in s.classifier_seeds}
    for arch in OTHER_ARCHS:
        named |= {f"classifier-{arch}-c{k}": arch for k in s.other_arch_seeds}
    return named


def jobs(s: Scale) -> list[Job]:
    out, data = s.path("classifiers"), s.dataset(DATA)
    result = []
    for run, arch in judges(s).items():
        seed = run.rsplit("-c", 1)[1]
        result.append(
            train_job(f"classifiers-{run.removeprefix('classifier-')}", data, out, run,
                      *classifier_args(s, int(seed)), "--arch", arch, deps=["data-synth"])
        )  # fmt: skip
    paths = ",".join(s.path("classifiers", run, "checkpoint.pt") for run in judges(s))
    trained = [j.name for j in result]
    for seed in s.seeds:
        models = [s.path("table2", f"{run}-s{seed}", "checkpoint.pt") for run in MODELS.values()]
        result.append(
            Job(
                f"classifiers-eval-s{seed}",
                ["eval", *models, data, "--classifiers", paths, "--leak-control",
                 "--json", s.path("classifiers", f"eval-s{seed}.json")],
                deps=trained + [f"table2-{run}-s{seed}" for run in MODELS.values()],
            )
        )  # fmt: skip
    return result


def report(s: Scale) -> str:
    named = judges(s)
    lines = [
        "Accuracy of independently trained classifiers, by architecture (mean ± half-range over "
        f"a row's classifiers and the mappings' {len(s.seeds)} seeds; the mappings trained "
        "against a ResNet-18), and of the leak control (a classifier of the binarised masks "
        "alone):",
        "",
        "| masks of | judged by | clean | masked-in | masked-out | inpainted masked-out | "
        "mask-only (leak control) | chance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, run in MODELS.items():
        accuracy = {(arch, v): [] for arch in set(named.values()) for v in VARIANTS}
        leak, chance = [], []
        for seed in s.seeds:
            name = f"{run}-s{seed}"
            by_classifier = read_json(s.path("classifiers", f"eval-s{seed}.classifiers.json"))
            for judge, result in by_classifier[name].items():
                for v in VARIANTS:
                    accuracy[named[judge], v].append(result[v])
            control = read_json(s.path("classifiers", f"eval-s{seed}.leak.json"))[name]
            leak.append(control["accuracy"])
            chance.append(control["chance"])
        for arch in dict.fromkeys(named.values()):  # ResNet-18 first
            count = sum(a == arch for a in named.values())
            cells = [mean_std(accuracy[arch, v]) for v in VARIANTS]
            controls = [mean_std(leak), mean_std(chance)] if arch == "resnet18" else ["", ""]
            lines.append(f"| {label} | {count} {arch} | " + " | ".join(cells + controls) + " |")
    return "\n".join(lines)
