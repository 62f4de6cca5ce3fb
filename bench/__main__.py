"""Speed benchmarks: data pipeline, training step, encoding and recall, each against a naive baseline.

    python -m bench --quick                        # about a minute on a 2-core CPU, small model
    python -m bench                                # resnet50, longer runs
    python -m bench --only recall,encode --device cuda --output bench-gpu.json

Every item is timed several times and the median is reported, next to its baseline timed in the same run
(the two alternate, so a busy machine slows both alike). All data is generated in a temporary folder; nothing
is downloaded. The issue's targets are reported as PASS/MISS, never as a failing exit.

This file holds the command line, the report and the JSON; the measurements are in bench/cases.py (data,
train, encode) and bench/recall.py.
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

SECTIONS = ("data", "train", "encode", "recall")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small model and short runs: about a minute on 2 CPU cores")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--output", default="bench.json", help="JSON results file")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--repeats", type=int, help="timed runs per item (median reported); default 3 quick, 5 full")
    p.add_argument("--image-model", help="torchvision ResNet; default resnet18 quick, resnet50 full")
    p.add_argument("--text-model", help="Hugging Face folder; default pretrains/roberta (full) when present, "
                                        "else a small random RoBERTa generated here")
    p.add_argument("--image-size", type=int, help="model input side for train/encode; default 64 quick, 224 full")
    p.add_argument("--batch-size", type=int, help="default 32 quick, 64 full")
    p.add_argument("--steps", type=int, help="distinct batches (train, encode), each timed --repeats times; "
                                             "default 4 quick, 5 full")
    p.add_argument("--workers", default="auto", help="data-loading workers (as num-workers in train.yaml)")
    p.add_argument("--threads", type=int, help="torch threads in this process; default torch's own choice "
                                               "(1 is steadier when other jobs share the CPU)")
    p.add_argument("--data-images", type=int, help="generated 640x480 images (5 captions each); default 32/96")
    p.add_argument("--recall-sizes", default="5000x5000,25000x5000", help="CAPTIONSxIMAGES,...")
    p.add_argument("--loop-queries", type=int, help="loop queries timed per direction; default 300 quick, 2000 full")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile variants (CUDA only); auto = on in full mode")
    a = p.parse_args(argv)
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        p.error(f"--only takes {', '.join(SECTIONS)}; got {', '.join(bad)}")
    a.only = only
    try:
        a.recall_sizes = [tuple(int(v) for v in s.lower().split("x")) for s in a.recall_sizes.split(",")]
    except ValueError:
        a.recall_sizes = None
    if not a.recall_sizes or not all(len(s) == 2 and min(s) > 0 for s in a.recall_sizes):
        p.error("--recall-sizes takes CAPTIONSxIMAGES pairs, e.g. 5000x5000,25000x5000")
    if a.workers != "auto":
        if not a.workers.isdigit():
            p.error("--workers takes auto or a whole number")
        a.workers = int(a.workers)
    quick = a.quick
    defaults = {"repeats": (3, 5), "image_model": ("resnet18", "resnet50"), "image_size": (64, 224),
                "batch_size": (32, 64), "steps": (4, 5), "data_images": (32, 96), "loop_queries": (300, 2000)}
    for key, (q, full) in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, q if quick else full)
    if a.text_model is None and not quick and os.path.isfile("pretrains/roberta/config.json"):
        a.text_model = "pretrains/roberta"
    return a


# --help or a mistyped option is answered before torch, torchvision and transformers load (seconds, hundreds of MB):
# the command line is checked here, and the heavy imports below run only once it parses.
if __name__ == "__main__":
    parse_args(sys.argv[1:])

import torch
from PIL import Image

from bench.cases import bench_data, bench_encode, bench_train
from bench.recall import bench_recall
from bench.workspace import Workspace
from engine.errors import run_entry
from engine.files import write_json
from engine.runtime import resolve_device

# ---------------------------------------------------------------- the report

class Report:
    """Rows of (median of runs, ratio to a baseline row, target check), plus notes and skipped items."""

    def __init__(self):
        self.rows, self.notes, self.skipped = [], [], []

    def add(self, section, item, unit, runs, baseline=None, lower_is_better=False, target=None, check=None,
            **extra):
        """`runs` are values in `unit`. The ratio is how many times better than `baseline` (>1 = better)."""
        row = {"section": section, "item": item, "unit": unit, "median": statistics.median(runs),
               "runs": list(runs), "baseline": baseline["item"] if baseline else None, "ratio": None,
               "target": target, "status": None, **extra}
        if baseline:
            a, b = row["median"], baseline["median"]
            row["ratio"] = b / a if lower_is_better else a / b
        if check is not None:
            row["status"] = "PASS" if check(row) else "MISS"
        self.rows.append(row)
        return row


def number(v):
    if v is None:
        return ""
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"


def format_rows(header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [header, *rows])


def format_report(results):
    header = ("section", "item", "median", "unit", "runs (spread)", "vs baseline", "target", "status")
    rows = []
    for r in results:
        spread = (max(r["runs"]) - min(r["runs"])) / r["median"] if r["median"] else 0.0
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else ("baseline" if r.get("is_baseline") else "")
        rows.append((r["section"], r["item"], number(r["median"]), r["unit"], f"{len(r['runs'])} ({spread:.0%})",
                     ratio, r["target"] or "", r["status"] or ""))
    return format_rows(header, rows)


def machine_info(device):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import torchvision
    import transformers
    from PIL import features
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"cpu": cpu, "cores": cores, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "transformers": transformers.__version__,
            "pillow": Image.__version__, "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
            "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def load_average():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None

# ---------------------------------------------------------------- main

def amp_variants(device, report):
    """(use-amp, amp-dtype) settings to time: fp32 everywhere; on CUDA also fp16 and, where supported, bf16."""
    out = {"fp32": (False, "float16")}
    if device.type != "cuda":
        report.skipped.append("AMP fp16/bf16: CPU run; bf16 autocast is 3-15x slower than fp32 on AVX2 CPUs "
                              "and train.py ignores use-amp on the CPU")
        return out
    out["amp fp16"] = (True, "float16")
    if torch.cuda.is_bf16_supported():
        out["amp bf16"] = (True, "bfloat16")
    else:
        report.skipped.append("AMP bf16: this GPU does not support bfloat16")
    return out


def run(argv):
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # the text model's "writing shards" bar would cut into the table
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load_average()
    report = Report()
    amps = amp_variants(device, report)
    compile_on = device.type == "cuda" and (args.compile == "on" or (args.compile == "auto" and not args.quick))
    if not compile_on:
        report.skipped.append("torch.compile: " + ("CPU run; compiling takes minutes here, more than the run"
                                                   if device.type != "cuda" else "off (--compile on to time it)"))
    train_variants = [(name, amp, False) for name, amp in amps.items()]
    if compile_on:
        train_variants.append((f"{train_variants[-1][0]} + compile", train_variants[-1][1], True))
    start = time.perf_counter()
    stages = None
    with tempfile.TemporaryDirectory(prefix="bench-") as folder:
        ws = Workspace(folder, args.data_images, 5, args.text_model, (64, 2) if args.quick else (256, 4))
        if "data" in args.only:
            stages = bench_data(ws, args, device, report)
        if "train" in args.only:
            bench_train(ws, args, device, report, train_variants)
        if "encode" in args.only:
            bench_encode(ws, args, device, report, amps)
        if "recall" in args.only:
            bench_recall(args, device, report)
    machine = machine_info(device)
    load_after = load_average()
    result = {"machine": machine, "settings": vars(args), "load_average_before": load_before,
              "load_average_after": load_after, "busy": bool(load_before and load_before[0] > 0.5),
              "seconds": time.perf_counter() - start, "results": report.rows, "notes": report.notes,
              "skipped": report.skipped, "data_stages": stages}
    print(format_result(result))
    write_json(args.output, result)
    print(f"results written to {args.output}")
    return result


def format_result(result):
    m, stages, before, after = (result[k] for k in ("machine", "data_stages", "load_average_before",
                                                    "load_average_after"))
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['torch_threads']} threads, "
             f"device {m.get('gpu', m['device'])}", format_report(result["results"])]
    if stages:
        lines += ["", "data pipeline stages, CPU ms per sample in one thread (as in a loader worker):",
                  format_rows(("stage", "ms"), [(k, f"{v:.3f}") for k, v in stages["ms_per_sample"].items()]),
                  f"real/naive worker time from these stages: {stages['ratio_from_stages']:.2f}x; decode and crop "
                  f"alone: {stages['ratio_if_after_crop_were_free']:.2f}x", ""]
    lines += [f"note: {line}" for line in result["notes"]] + [f"skipped: {line}" for line in result["skipped"]]
    if before:
        lines.append(f"load average before {before[0]:.2f}, after {after[0]:.2f} on {m['cores']} cores"
                     + ("; busy before the run, so timings are noisy (--threads 1 keeps torch's threads from "
                        "fighting the other jobs)" if result["busy"] else ""))
    lines.append(f"total {result['seconds']:.0f} s")
    return "\n".join(lines)


def main(argv=None):
    return run_entry(run, argv)


if __name__ == "__main__":
    main()
