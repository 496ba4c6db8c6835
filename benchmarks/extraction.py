"""Mask extraction throughput on this CPU: eager, TorchScript and ONNX Runtime fp32 / fp16 / int8.

Usage: python benchmarks/extraction.py [--checkpoint runs/demo/checkpoint.pt]
       [--export export/default] [--batches 1,32,256] [--seconds 2] [--repeats 3]
       [--parity-images 1000]
Prints tables and writes benchmarks/results/extraction.json.

The demo mapping through `casm_deploy.Masker.run` (uint8 NHWC batches of decoded validation
images in memory, as infer feeds it): eager from the checkpoint, TorchScript and ONNX fp32 from
the demo's export, ONNX fp16 and int8 exported here by `export.run` into a temporary folder (its
parity report against eager fp32 is recorded, int8's box agreement included). Throughput is set
against the model's FLOPs (counted once on the eager Masker) and a GEMM peak measured in the same
run; ONNX Runtime's per-operator time shows where each precision spends it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from common import command, machine, write_json
from torch.utils.flop_counter import FlopCounterMode

from casm_deploy.artifact import read_metadata, sha256_file
from casm_deploy.checkpoint import load_masker
from casm_deploy.common.ui import console
from casm_deploy.config import ExportConfig
from casm_deploy.data.decode import read_image
from casm_deploy.data.imagenet import list_images
from casm_deploy.deploy.runtime.masker import Masker

PRECISIONS = ("fp16", "int8")  # exported here; fp32 comes from the demo's export
PROFILE_BATCH = 32
GEMM_REPEATS = 20


def load_images(data: Path, wnids: list[str], size: int, count: int) -> np.ndarray:
    """Up to `count` validation images as infer decodes them: (N, S, S, 3) uint8."""
    samples = list_images(data, "val", wnids)[:count]
    return np.stack([read_image(path, size)[0] for path, _ in samples])


def batches_of(images: np.ndarray, batch: int, minimum: int = 4) -> list[np.ndarray]:
    """Contiguous batches cycling through `images` (tiled when a few batches need more)."""
    reps = -(-batch * minimum // len(images))
    pool = np.concatenate([images] * reps) if reps > 1 else images
    return [pool[k : k + batch] for k in range(0, len(pool) - batch + 1, batch)]


def throughput(masker: Masker, batches: list[np.ndarray], seconds: float) -> float:
    """Images per second of `masker.run` over whole passes of `batches` for >= `seconds`."""
    for images in batches[:2]:  # warm-up: allocations, ORT's first-run graph work
        masker.run(images)
    done, start = 0, time.perf_counter()
    while True:
        for images in batches:
            masker.run(images)
            done += len(images)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def gemm_peak(n: int, repeats: int) -> float:
    """Best GFLOP/s of an n x n fp32 torch.matmul on all of torch's threads."""
    a, b = torch.rand(n, n), torch.rand(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def model_flops(checkpoint: Path) -> tuple[int, dict[str, int]]:
    """FLOPs of one image through the eager Masker (a multiply-add counts 2), total and by op."""
    masker, spec = load_masker(checkpoint)
    size = spec.image_size
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        masker(torch.rand(1, 3, size, size))
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return int(counter.get_total_flops()), by_op


def op_profile(path: Path, images: np.ndarray, runs: int) -> dict[str, dict]:
    """Where ONNX Runtime's time goes: the share of node time per operator type over `runs`
    calls on `images`, and the operator counts of the graph it optimised for this CPU.

    The session is built as `deploy.runtime.onnxruntime_backend.OnnxBackend` builds it, with
    profiling on.
    """
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "ort")
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
        inputs = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255
        for _ in range(runs):
            session.run(None, {"images": inputs})
        events = json.loads(Path(session.end_profiling()).read_text())
    micros: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            micros[event["args"]["op_name"]] += event["dur"]
    total = sum(micros.values()) or 1.0
    ranked = sorted(micros.items(), key=lambda kv: -kv[1])
    counts = Counter(node.op_type for node in graph.node)
    return {
        "time_share": {op: round(us / total, 4) for op, us in ranked},
        "optimized_graph_ops": dict(counts.most_common()),
    }


def export_precision(checkpoint: Path, precision: str, out: Path, parity_images: int) -> dict:
    """ONNX at `precision` through `export.run` (parity against eager fp32 included)."""
    from casm_deploy.deploy.export.job import run

    cfg = ExportConfig(
        checkpoint=str(checkpoint), out=str(out), torchscript=False, onnx=True,
        precision=precision, parity_images=parity_images,
    )  # fmt: skip
    report = run(cfg)
    (result,) = [r for r in report["parity"]["results"] if r["format"] == "onnx"]
    worst = result.get("worst") or {}
    return {
        "status": result["status"],
        "export_seconds": report["seconds"],
        "parity_images": report["parity"]["images"],
        "bytes": report["files"]["onnx"]["bytes"],
        **{k: worst.get(k) for k in ("boxes_iou_above_0.9", "mean_abs_mask", "argmax_agree")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/demo/checkpoint.pt")
    parser.add_argument("--export", default="export/default", help="its masker.onnx, masker.ts")
    parser.add_argument("--data", default="data/synth", help="validation images (and parity)")
    parser.add_argument("--images", type=int, default=1000, help="validation images to cycle")
    parser.add_argument("--batches", default="1,32,256")
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="best of, backends interleaved")
    parser.add_argument("--parity-images", type=int, default=1000, help="real images, >= 64")
    parser.add_argument("--gemm-size", type=int, default=2048)
    parser.add_argument("--profile-runs", type=int, default=20, help="0: no operator profile")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "extraction.json"))
    args = parser.parse_args()

    checkpoint, export = Path(args.checkpoint), Path(args.export)
    models = {
        "eager fp32": checkpoint,
        "torchscript fp32": export / "masker.ts",
        "onnx fp32": export / "masker.onnx",
    }
    for path in models.values():
        if not path.is_file():
            raise SystemExit(f"{path}: missing; run `make demo` first")
    # The fp32 files must be this checkpoint's, or the backends would compare different models.
    digest = sha256_file(checkpoint)
    for path in list(models.values())[1:]:
        if read_metadata(path)["checkpoint_sha256"] != digest:
            raise SystemExit(f"{path}: exported from another checkpoint than {checkpoint}")

    # The GEMM peak before and after the throughput runs (a best of many), the higher kept.
    peaks = [gemm_peak(args.gemm_size, GEMM_REPEATS)]
    with tempfile.TemporaryDirectory() as tmp:
        parity = {}
        for precision in PRECISIONS:
            folder = Path(tmp) / precision
            parity[precision] = export_precision(checkpoint, precision, folder, args.parity_images)
            models[f"onnx {precision}"] = folder / "masker.onnx"
        maskers = {name: Masker.load(path, device="cpu") for name, path in models.items()}
        first = next(iter(maskers.values()))
        wnids = list(first.info.wnids)
        images = load_images(Path(args.data), wnids, first.image_size, args.images)

        sizes = [int(b) for b in args.batches.split(",")]
        rates: dict[tuple[str, int], float] = {}
        for batch in sizes:
            batches = batches_of(images, batch)
            for _ in range(args.repeats):  # interleaved, so drift hits every backend alike
                for name, masker in maskers.items():
                    rate = throughput(masker, batches, args.seconds)
                    rates[name, batch] = max(rates.get((name, batch), 0.0), rate)
                    console.print(f"{name:<18} batch {batch:>4}: {rate:8.0f} images/s")

        profiles = {}
        if args.profile_runs:
            for name in ("onnx fp32", "onnx fp16", "onnx int8"):
                profiles[name] = op_profile(
                    models[name], batches_of(images, PROFILE_BATCH)[0], args.profile_runs
                )

    flops, flops_by_op = model_flops(checkpoint)
    peaks.append(gemm_peak(args.gemm_size, GEMM_REPEATS))
    peak = max(peaks)
    rows = [
        {
            "backend": name,
            "batch": batch,
            "images_per_second": round(rate, 1),
            "gflops_per_second": round(rate * flops / 1e9, 2),
            "share_of_gemm_peak": round(rate * flops / 1e9 / peak, 4),
        }
        for (name, batch), rate in rates.items()
    ]

    def rate(name: str, batch: int) -> float:
        return rates[name, batch]

    big = [b for b in sizes if b >= 32]
    int8 = parity["int8"]
    targets = {
        "onnx_fp32_over_eager_at_least_2x": {
            str(b): round(rate("onnx fp32", b) / rate("eager fp32", b), 3) for b in big
        },
        "int8_over_onnx_fp32_at_least_1.3x": {
            str(b): round(rate("onnx int8", b) / rate("onnx fp32", b), 3) for b in sizes
        },
        "int8_box_iou_above_0.9_share_at_least_0.95": int8["boxes_iou_above_0.9"],
    }

    print(f"\nimages/s on {os.cpu_count()} CPU cores; model {flops / 1e6:.1f} MFLOP per image;")
    print(
        f"GEMM peak {peak:.1f} GFLOP/s (fp32 {args.gemm_size}^2 torch.matmul, best of "
        f"{GEMM_REPEATS}, before and after: {peaks[0]:.1f}, {peaks[1]:.1f})"
    )
    print(f"{'backend':<18}" + "".join(f"{'batch ' + str(b):>14}{'GFLOP/s':>9}" for b in sizes))
    for name in maskers:
        cells = "".join(f"{rate(name, b):>14.0f}{rate(name, b) * flops / 1e9:>9.1f}" for b in sizes)
        print(f"{name:<18}{cells}")
    print("\nparity of the exports made here (worst batch size, against eager fp32):")
    for precision, p in parity.items():
        print(
            f"{precision}: {p['status']}; box IoU > 0.9 on {p['boxes_iou_above_0.9']:.1%} of "
            f"{p['parity_images']['real']} real images; mean |dmask| {p['mean_abs_mask']:.2e}"
        )
    print("\ntargets:", json.dumps(targets))
    for name, profile in profiles.items():
        shares = list(profile["time_share"].items())[:6]
        print(f"{name} at batch {PROFILE_BATCH}, node time by op: ", end="")
        print(", ".join(f"{op} {share:.0%}" for op, share in shares))
        print(f"  optimised graph: {profile['optimized_graph_ops']}")

    import onnxruntime

    result = {
        "command": command("extraction.py", args),
        "machine": machine(onnxruntime),
        "model_flops_per_image": flops,
        "model_flops_by_op": flops_by_op,
        "gemm_peak_gflops": round(peak, 1),
        "gemm_peak_before_after": [round(p, 1) for p in peaks],
        "rows": rows,
        "parity": parity,
        "targets": targets,
        "ort_profile_batch": PROFILE_BATCH,
        "ort_profiles": profiles,
    }
    write_json(args.out, result)


if __name__ == "__main__":
    main()
