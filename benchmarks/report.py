"""Render the tables of benchmarks/RESULTS.md from the JSON the benchmark scripts wrote.

Usage: python benchmarks/report.py [--check]
Rewrites only the regions between `<!-- table: NAME -->` and `<!-- /table -->` in RESULTS.md,
each with a markdown table rendered from benchmarks/results/*.json and a line naming the
machine, versions and command recorded there; the text outside the markers is left as it is.
--check writes nothing: it prints a diff and exits 1 when RESULTS.md is not what the JSON renders.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MARKDOWN = HERE / "RESULTS.md"
MARKER = re.compile(r"(<!-- table: ([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.DOTALL)
VERSIONS = ("torch", "onnxruntime", "dali", "opencv")
BACKENDS = {"eager": "eager", "torchscript": "TorchScript", "onnx": "ONNX Runtime"}
MIN_PERCENT = 3  # operators under this share of ONNX Runtime's node time are left out


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(line) + " |" for line in [header, *rows]]
    lines.insert(1, "|" + "---|" * len(header))
    return "".join(line + "\n" for line in lines)


def sig3(value: float | None) -> str:
    """Three significant digits, whole numbers kept whole: 0.469, 3.43, 43.6, 449, 3461."""
    if value is None:
        return "-"
    digits = max(0, 2 - math.floor(math.log10(abs(value)))) if value else 0
    return f"{value:.{digits}f}"


def fixed(value: float | None, digits: int = 3, scale: float = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def backend(name: str) -> str:
    """'onnx fp32' -> 'ONNX Runtime fp32'."""
    first, *rest = name.split(" ")
    return " ".join([BACKENDS.get(first, first), *rest])


def command(result: dict) -> str:
    """The recorded command, or one rebuilt from the recorded arguments (`settings`)."""
    if "command" in result:
        return result["command"]
    args = [
        f"--{key.replace('_', '-')} " + (" ".join(map(str, v)) if isinstance(v, list) else str(v))
        for key, v in result["settings"].items()
        if key != "out"
    ]
    return " ".join([f"python benchmarks/{result['benchmark']}.py", *args])


def machine(info: dict) -> str:
    def value(v) -> str:
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, list):
            return " / ".join(value(x) for x in v)
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    parts = [f"{k.replace('_', ' ')} {value(v)}" for k, v in info.items() if k not in VERSIONS]
    versions = [f"{k} {info[k]}" for k in VERSIONS if k in info]
    return ", ".join(parts) + "; " + ", ".join(versions)


def source(*results: dict) -> str:
    machines = dict.fromkeys(machine(r["machine"]) for r in results)  # distinct, in order
    commands = " and ".join(f"`{command(r)}`" for r in results)
    return f"Machine: {'; '.join(machines)}. Command: {commands}."


def option(result: dict, name: str) -> str:
    """The value of `--name` in the recorded command."""
    words = command(result).split()
    return words[words.index(f"--{name}") + 1]


# One function per table: the JSON files' contents in -> the markdown table out.


def train_step(*results: dict) -> str:
    """Images/s per preset: a column per JSON file (fp32, AMP) and layout."""
    columns, cells = [], {}
    for result in results:
        amp = result["settings"]["amp"]
        for row in result["rows"]:
            column = row["layout"] + " images/s" if amp == "off" else f"{amp} AMP, {row['layout']}"
            if column not in columns:
                columns.append(column)
            cells[row["preset"], column] = f"{row['images_per_second']:.0f}"
    presets = dict.fromkeys(row["preset"] for row in results[0]["rows"])
    rows = [[p, *(cells.get((p, c), "-") for c in columns)] for p in presets]
    return table(["preset", *columns], rows)


def loader(result: dict) -> str:
    rates = {(r["size"], r["threads"], r["loader"]): r["images_per_second"] for r in result["rows"]}
    rows = []
    for (size, threads, kind), torch in rates.items():
        if kind == "torch":
            dali = rates[size, threads, "dali"]
            rows.append(
                [str(size), str(threads), f"{torch:.0f}", f"{dali:.0f}", f"{dali / torch:.2f}"]
            )
    header = ["size", "threads / workers", "torch DataLoader images/s", "DALI images/s"]
    return table([*header, "DALI / torch"], rows)


def infer(result: dict) -> str:
    rows = [
        [
            r["case"],
            backend(r["backend"]),
            f"{r['model_only']:.0f}",
            f"{r['end_to_end_png']:.0f}",
            f"{r['ratio_png']:.2f}",
            f"{r['end_to_end_no_masks']:.0f}",
            f"{r['ratio_no_masks']:.2f}",
        ]
        for r in result["rows"]
    ]
    header = ["case", "backend", "model only", "infer, png", "ratio", "infer, none", "ratio"]
    return table(header, rows)


def infer_stages(result: dict) -> str:
    stages = list(result["rows"][0]["pipeline_core_ms"])
    labels = [s.removesuffix("_ms").replace("_", " ").replace("png", "PNG") for s in stages]
    rows = [
        [r["case"], backend(r["backend"]), sig3(r["model_core_ms"])]
        + [f"{r['pipeline_core_ms'][s]:.2f}" for s in stages]
        for r in result["rows"]
    ]
    return table(["case", "backend", "model", *labels], rows)


def extraction(result: dict) -> str:
    by = {(r["backend"], r["batch"]): r for r in result["rows"]}
    backends = dict.fromkeys(name for name, _ in by)
    batches = dict.fromkeys(batch for _, batch in by)
    header = ["backend"]
    for batch in batches:
        header += [f"batch {batch} images/s", "GFLOP/s", "% of peak"]
    rows = []
    for name in backends:
        rows.append([backend(name)])
        for batch in batches:
            r = by[name, batch]
            rows[-1] += [
                f"{r['images_per_second']:.0f}",
                f"{r['gflops_per_second']:.0f}",
                f"{100 * r['share_of_gemm_peak']:.0f}",
            ]
    return table(header, rows)


def extraction_parity(result: dict) -> str:
    parity = result["parity"]
    real = ", ".join(dict.fromkeys(f"{p['parity_images']['real']:,}" for p in parity.values()))
    rows = [
        [
            precision,
            p["status"],
            f"{p['boxes_iou_above_0.9']:.1%}",
            f"{p['mean_abs_mask']:.1e}",
            f"{p['argmax_agree']:.1%}",
            f"{p['bytes'] / 1e6:.1f} MB",
        ]
        for precision, p in parity.items()
    ]
    header = ["precision", "parity", f"box IoU > 0.9 ({real} real images)"]
    return table([*header, "mean abs. mask difference", "argmax agrees", "file"], rows)


def extraction_profile(result: dict) -> str:
    """Node time by operator, and how many nodes of those operators the optimised graph has."""
    rows = []
    for name, profile in result["ort_profiles"].items():
        shares = {op: s for op, s in profile["time_share"].items() if round(100 * s) >= MIN_PERCENT}
        counts = profile["optimized_graph_ops"]
        nodes = [f"{counts[op]} {op}" for op in shares if not op.startswith("Reorder")]
        reorders = sum(n for op, n in counts.items() if op.startswith("Reorder"))
        nodes += [f"{reorders} reorders"] if any(op.startswith("Reorder") for op in shares) else []
        time = ", ".join(f"{op} {s:.0%}" for op, s in shares.items())
        rows.append([name.removeprefix("onnx "), time, ", ".join(nodes)])
    return table(["graph", "share of node time", "optimised graph"], rows)


def method_cost(result: dict) -> str:
    by = {r["method"]: r for r in result["rows"]}
    names = {
        "encoder": "encoder forward (reference)",
        "casm": "CASM",
        "maskopt": "mask optimisation",
    }
    rows = [
        [
            names.get(m, m.replace("gradcam", "Grad-CAM, stage ")),
            sig3(r["ms_per_image_batch"]),
            sig3(r.get("ms_per_image_batch1")),
            fixed(r.get("flops_per_image"), 0, 1e-6),
            fixed(r["LE_all"]),
            fixed(r["LE_maskopt_images"]),
        ]
        for m, r in by.items()
    ]
    header = [
        "method",
        f"ms per image, batch {option(result, 'batch')}",
        "ms per image, batch 1",
        "MFLOP per image",
        f"LE, {by['casm']['images']:,} images",
        f"LE, the {by['maskopt']['images']:,} images",
    ]
    return table(header, rows)


def method_cost_tuning(result: dict) -> str:
    maskopt = result["maskopt"]
    rows = [
        [
            g["fill"]
            + (" (chosen)" if all(g[k] == v for k, v in maskopt["chosen"].items()) else ""),
            f"{g['area']:g}",
            f"{g['tv']:g}",
            fixed(g["tune_LE"]),
            fixed(g["score_after"]),
            fixed(g["mask_mean"]),
        ]
        for g in maskopt["grid"]
    ]
    header = ["fill", "area", "tv", f"LE, {maskopt['tuning_images']} tuning images"]
    return table([*header, "class score after", "mask mean"], rows)


def image_memory(result: dict) -> str:
    """Peak resident memory one image at the pixel limit adds, per step."""
    rows = [
        [
            r["step"].replace("_", " "),
            r["file"],
            str(r["file_mb"]),
            f"{r['added_mb']:.0f}",
            f"{r['seconds']:.1f}",
        ]
        for r in result["rows"]
    ]
    settings = result["settings"]
    size = f"{settings['width']} x {settings['height']} px ({settings['megapixels']:g} MP)"
    header = ["step", "file", "file MB", f"MB added at {size}", "seconds"]
    return table(header, rows)


def parts_check(result: dict) -> str:
    """A clean-trained classifier's accuracy with each part of `data synth --parts` removed."""
    accuracy = result["accuracy"]
    rows = [["nothing", fixed(accuracy["clean"])]]
    rows += [
        [f"{part}{' (favourite)' if part == result['favourite'] else ''}", fixed(value)]
        for part, value in accuracy["without"].items()
    ]
    verdict = (
        f"parts redundant: {'yes' if result['redundant'] else 'no'}; "
        f"prefers its favourite: {'yes' if result['prefers_favourite'] else 'no'}"
    )
    return table(["part removed", "val accuracy"], rows) + "\n" + verdict + "\n"


def _times(ratio: float | None) -> str:
    return "not measured" if ratio is None else f"{ratio}x"


def frontier(result: dict) -> str:
    """Quality against cost per image, one row per method, on the same images."""
    kinds = {"casm-shared": "CASM, shared encoder", "gradcam": "Grad-CAM", "maskopt": "mask opt."}
    rows = [
        [
            r["method"],
            kinds.get(r["kind"], "mapping of its own"),
            fixed(r["LE"]),
            fixed(r["MaxBoxAccV2"]),
            sig3(r["ms_per_image"]),
            sig3(r.get("ms_per_image_ort_fp32")),
            sig3(r.get("ms_per_image_ort_int8")),
        ]
        for r in result["rows"]
    ]
    header = ["method", "masks from", "LE", "MaxBoxAccV2", "ms, eager", "ms, ORT fp32"]
    table_text = table([*header, "ms, ORT int8"], rows)
    verdicts = [
        f"- {name}: {_times(t['cheaper_than_gradcam_eager'])} cheaper than Grad-CAM eager, "
        f"{_times(t['cheaper_than_gradcam_ort_int8'])} with ORT int8; "
        f"LE {t['LE_above_casm']:+.3f} "
        f"against the shared CASM; targets {'all met' if t['met'] else 'not all met'}"
        for name, t in result["targets"].items()
    ]
    return table_text + "\n" + "\n".join(verdicts) + "\n"


def infer_split(result: dict) -> str:
    rows = [
        [
            r["config"],
            f"{r['wall_s']:.1f}",
            f"{r['wall_vs_one']:.2f}",
            f"{r['images_per_second']:.0f}",
            f"{r['rate_vs_one']:.2f}",
        ]
        for r in result["rows"]
    ]
    header = ["processes", "job wall s", "wall / one process", "images/s", "images/s / one"]
    return table(header, rows)


PEER_RUNTIMES = {
    "eager": "eager",
    "torchscript": "TorchScript",
    "ort-fp32": "ONNX Runtime fp32",
    "ort-int8": "ONNX Runtime int8",
}


def peers(result: dict) -> str:
    """ms per image and peak memory per method and runtime at two batch sizes, the end-to-end
    rates, and the ratios against their targets."""
    batch = result["settings"]["batch"]
    by = {(r["method"], r["runtime"], r["batch"]): r for r in result["rows"]}
    keys = dict.fromkeys((method, runtime) for method, runtime, _ in by)
    rows = []
    for method, runtime in keys:
        big, one = by.get((method, runtime, batch), {}), by.get((method, runtime, 1), {})
        rows.append(
            [
                method,
                PEER_RUNTIMES.get(runtime, runtime),
                sig3(big.get("ms_per_image")),
                sig3(one.get("ms_per_image")),
                fixed(big.get("peak_rss_mb"), 0),
                fixed(one.get("peak_rss_mb"), 0),
            ]
        )
    header = ["method", "runtime", f"ms per image, batch {batch}", "ms per image, batch 1"]
    text = table([*header, f"peak MB, batch {batch}", "peak MB, batch 1"], rows)
    e2e = result["end_to_end"]
    lines = [
        f"End to end from {e2e['jpegs']:,} JPEGs to PNG masks, batch {batch}: `infer` with "
        f"{e2e['small_mapping']} (ONNX Runtime fp32) {e2e['infer_images_per_s']:.0f} images/s; "
        f"the pytorch-grad-cam loop {e2e['gradcam_loop_images_per_s']:.1f} images/s; `infer` "
        f"with the shared CASM {e2e['infer_resnet50_png_images_per_s']:.1f} images/s, "
        f"{e2e['model_only_resnet50_images_per_s']:.1f} on in-memory batches.",
        "",
    ]
    for r in result["ratios"].values():
        value = "not measured" if r["value"] is None else f"{r['value']:.2f}x"
        verdict = "met" if r["met"] else "missed"
        lines.append(f"- {r['of']}: {value} (target {r['target']:g}x, {verdict})")
    lines += [f"- not measured: {s['method']} ({s['reason']})" for s in result.get("skipped", [])]
    versions = ", ".join(f"{k} {v}" for k, v in result["libraries"].items() if v)
    note = (
        f"Random weights: a trained model costs the same. Peak MB: the method's own process at "
        f"its highest while that batch size ran (libraries, weights and images included). "
        f"{versions}."
    )
    return text + "\n" + note + "\n\n" + "\n".join(lines) + "\n"


# JSON file(s) -> {marker name: renderer}; a renderer gets the files' contents in this order.
RENDERERS = {
    ("train_step.json", "train_step_bf16.json"): {"train_step": train_step},
    ("loader.json",): {"loader": loader},
    ("infer.json",): {"infer": infer, "infer-stages": infer_stages},
    ("extraction.json",): {
        "extraction": extraction,
        "extraction-parity": extraction_parity,
        "extraction-profile": extraction_profile,
    },
    ("method_cost.json",): {"method_cost": method_cost, "method_cost-tuning": method_cost_tuning},
    ("image_memory.json",): {"image_memory": image_memory},
    ("parts_check.json",): {"parts_check": parts_check},
    ("frontier.json",): {"frontier": frontier},
    ("infer_split.json",): {"infer-split": infer_split},
    ("peers.json",): {"peers": peers},
}
# Files a new benchmark writes on its first full run: until then, their tables are empty.
OPTIONAL = {"peers.json"}


def render_tables(results_dir: Path) -> dict[str, str]:
    """Marker name -> the region's new text: the table, a blank line, the source line."""
    loaded = {
        path.name: json.loads(path.read_text()) for path in sorted(results_dir.glob("*.json"))
    }
    tables = {}
    for files, renderers in RENDERERS.items():
        missing = [name for name in files if name not in loaded]
        if missing and set(files) <= OPTIONAL and len(missing) == len(files):
            tables |= dict.fromkeys(renderers, "")  # not run yet
            continue
        if missing:
            raise SystemExit(f"{results_dir}: missing {', '.join(missing)}")
        results = [loaded[name] for name in files]
        for marker, render in renderers.items():
            tables[marker] = render(*results) + "\n" + source(*results) + "\n"
    return tables


def render(results_dir: Path, markdown: str) -> str:
    """`markdown` with every marked region replaced by its table rendered from the JSON."""
    tables = render_tables(results_dir)
    found = [m.group(2) for m in MARKER.finditer(markdown)]
    unknown = sorted(set(found) - set(tables))
    unmarked = sorted(set(tables) - set(found))
    if unknown or unmarked:
        raise SystemExit(f"markers with no renderer: {unknown}; tables with no marker: {unmarked}")
    return MARKER.sub(lambda m: m.group(1) + tables[m.group(2)] + m.group(4), markdown)


def run(results_dir: Path = RESULTS, markdown_path: Path = MARKDOWN, check: bool = False) -> int:
    old = markdown_path.read_bytes().decode()
    new = render(results_dir, old)
    if check:
        if new == old:
            return 0
        diff = difflib.unified_diff(
            old.splitlines(keepends=True),
            new.splitlines(keepends=True),
            f"{markdown_path} (committed)",
            f"{markdown_path} (rendered from {results_dir})",
        )
        sys.stdout.writelines(diff)
        print(f"\n{markdown_path} is not what {results_dir} renders: run benchmarks/report.py")
        return 1
    if new != old:
        markdown_path.write_bytes(new.encode())
        print(f"wrote {markdown_path}")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="diff only, exit 1 if out of date")
    raise SystemExit(run(check=parser.parse_args().check))


if __name__ == "__main__":
    main()
