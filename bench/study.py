"""What trains best, measured: a small training study anyone can rerun on a CPU.

    python -m bench.study                                   # every variant, seeds 0 and 1: 25 min on a busy 2-core CPU
    python -m bench.study --variants infonce-fixed,sigmoid --seeds 0
    python -m bench.study --set epochs=1 --output /tmp/study/study.json    # any config key, for every run
    python -m bench.study --budget-seconds 90 --seeds 0,1,2   # equal wall time instead of equal steps

configs/study/base.yaml is a small, fast version of the demo (fewer training images, 32 px images, 48 optimizer
steps); every other file in configs/study/ is a variant that lists only the keys it changes, and all of them
train on the same data for the same number of optimizer steps. Each variant x seed is one process (nothing
imports train.py):

    python train.py --config configs/study/base.yaml --KEY=VALUE (the variant's, then --set's) --seed S \
        --last-path RUNS/VARIANT-sS/last.pt --best-path RUNS/VARIANT-sS/best.pt --overwrite true

RUNS is the folder of --output. The table is read back from each run's files: report.json (best.pt, chosen on the
held-out selection split, scored on the report set valid-root), metrics.jsonl (steps and pairs trained) and
best.pt (the temperature it reached). A run whose report.json exists is not run again unless --rerun, so an
interrupted study picks up where it stopped, and the table is rewritten after every run. A finished run made
with other settings (a changed value in base.yaml, the variant or --set) is an error, never mixed into the
table. The data is written once, with seed 0, and is the same for every run; a run's seed sets its weights, its
batches and which training images it holds out.

With --budget-seconds every run trains for that much wall time instead (bench/study_time.py: stopped by SIGTERM,
scored by eval.py on last.pt into scored.json), and the table shows the steps and pairs each variant reached. Its
runs go in a folder of their own by default, checkpoints/study/time-<budget>s/.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from tools.runs import TEXT_FORMATS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY_DIR = os.path.join(REPO, "configs", "study")
BASE = "base"
BASELINE = "infonce-fixed"  # the variant every other one is read against: listed first
TRAIN_IMAGES = 712  # written once; base.yaml holds 200 out for selection, leaving 512 x 3 = 1536 training pairs
RUN_FILE = "study-run.json"  # in each run folder: the command it ran and how long it took
TIMED_KEYS = ("started", "stopped", "returncode")  # what an equal-time run's record adds


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--variants", help="comma-separated variants, the YAML files of configs/study/ "
                                      "(default: all of them but base)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds; each variant runs once per seed")
    p.add_argument("--output", help="JSON table; the runs go in folders beside it, one per variant and seed "
                                    "(default checkpoints/study/study.json, or with --budget-seconds "
                                    "checkpoints/study/time-<budget>s/study.json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a train.py config key for every run, after the variant's own (repeatable); "
                        "relative paths are from the repository root")
    p.add_argument("--train-images", type=int, default=TRAIN_IMAGES,
                   help="training images to write when the study's data is absent (3 captions each)")
    p.add_argument("--rerun", action="store_true",
                   help="run again even where a run finished before (its report.json, or scored.json at equal time)")
    p.add_argument("--budget-seconds", type=float, help="equal wall time: train every run for this many seconds "
                                                         "(train.py's start-up included), then stop and score it")
    p.add_argument("--grace-seconds", type=float, default=60.0,
                   help="after the budget's SIGTERM, how long a run may take to stop before SIGKILL")
    p.add_argument("--format", choices=TEXT_FORMATS, default="table",
                   help="how the table is printed: aligned text, markdown (for the README) or csv")
    return p.parse_args(argv)


# --help or a mistyped option is answered before torch loads (seconds, hundreds of MB, through study_time and the
# checkpoint reader): the command line is checked here, and the heavy imports below run only once it parses.
if __name__ == "__main__":
    parse_args(sys.argv[1:])

import yaml

from bench import study_time
from bench.study_table import METRICS, format_table, summarise
from engine.checkpoint import load_checkpoint
from engine.config import ConfigError, load_yaml
from engine.errors import UserError, run_entry
from engine.files import write_json
from engine.rundir import LOG_NAME, read_log

# ---------------------------------------------------------------- variants and command lines

def variant_names():
    names = sorted(f[:-5] for f in os.listdir(STUDY_DIR) if f.endswith(".yaml") and f[:-5] != BASE)
    return sorted(names, key=lambda n: n != BASELINE)  # stable: the baseline first, the rest by name


def read_variant(name):
    """(what it tests, {key: value}): the file's first comment line and its keys."""
    path = os.path.join(STUDY_DIR, name + ".yaml")
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    return first.lstrip("#").strip(), load_yaml(path)


def scalar(value):
    """A config value as train.py's command line reads it back (a YAML scalar)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value) if isinstance(value, float) else str(value)


def run_settings(overrides, sets, seed, forced=None):
    """What makes one run differ from base.yaml: the variant's keys, then --set's, then `forced` (the equal-time
    mode's epochs), then the seed. A later one replaces an earlier one's key (train.py refuses a key twice)."""
    forced = forced or {}
    later = set(parse_sets(sets)) | set(forced)
    return [f"--{k}={scalar(v)}" for k, v in overrides.items() if k not in later] + \
        [f"--{s}" for s in sets if s.partition("=")[0] not in forced] + \
        [f"--{k}={scalar(v)}" for k, v in forced.items()] + ["--seed", str(seed)]


def train_argv(settings, folder):
    """train.py's arguments for one run; its files go in `folder` (a fresh start over any unfinished run)."""
    return ["--config", os.path.join("configs", "study", BASE + ".yaml"), *settings,
            "--last-path", os.path.join(folder, "last.pt"), "--best-path", os.path.join(folder, "best.pt"),
            "--overwrite", "true"]


def parse_sets(sets):
    """['epochs=1', ...] -> {'epochs': 1, ...}, values read as YAML scalars as train.py reads them."""
    out = {}
    for s in sets:
        key, eq, raw = s.partition("=")
        if not eq or not key:
            raise ConfigError(f"--set takes KEY=VALUE (a train.py config key), got {s!r}")
        out[key] = yaml.safe_load(raw) if raw else ""
    return out


def prepare_data(sets, train_images):
    """Write the study's data and text model once, where base.yaml (or --set) points; seed 0 for every run."""
    from transformers.utils import logging as hf_logging

    from tools.demo import make_demo
    hf_logging.disable_progress_bar()  # the text model's "writing shards" bar would cut into the progress lines
    cfg = {**load_yaml(os.path.join(STUDY_DIR, BASE + ".yaml")), **parse_sets(sets)}
    at = {k: os.path.join(REPO, cfg[k]) for k in ("train-root", "valid-root", "text-model")}
    make_demo(at["train-root"], at["valid-root"], at["text-model"], train_images=train_images, seed=0)
    return {k: cfg[k] for k in at}


# ---------------------------------------------------------------- one run

def run_one(settings, folder, rerun, budget=None, cfg=None):
    """Train one variant x seed unless it finished before; returns its record's {"seconds", "skipped", ...}.
    A finished run counts only if base.yaml, `settings` and `budget` are what they were when it ran. With a
    `budget` ({"seconds", "grace"}) the run is stopped by the clock and scored on last.pt (bench/study_time.py);
    `cfg` is its merged config, for the scoring's device and workers."""
    marker = study_time.SCORE_NAME if budget else "report.json"  # written last: the run is finished
    done, record_path = os.path.join(folder, marker), os.path.join(folder, RUN_FILE)
    setup = {"base": load_yaml(os.path.join(STUDY_DIR, BASE + ".yaml")), "settings": settings,
             "budget_seconds": budget and budget["seconds"]}
    finished = [n for n in ("report.json", study_time.SCORE_NAME) if os.path.isfile(os.path.join(folder, n))]
    if finished and not rerun:  # either mode's result: an equal-steps run is never replaced by an equal-time one
        record = None
        if os.path.isfile(record_path):
            with open(record_path, encoding="utf-8") as f:
                record = json.load(f)
        if record is None or not same_setup(record, setup):
            raise ConfigError(f"{folder} holds a finished run made with other settings; pass --rerun to replace "
                              f"it, or write this study elsewhere with --output")
        if os.path.isfile(done):
            return {**{k: record[k] for k in ("seconds", *TIMED_KEYS) if k in record}, "skipped": True}
    os.makedirs(folder, exist_ok=True)
    for name in ("report.json", study_time.SCORE_NAME):
        if os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))  # a failed rerun must not leave the old result to be read as its own
    argv = train_argv(settings, folder)
    write_json(record_path, {**setup, "argv": argv, "seconds": None, "returncode": None})
    log, cmd = os.path.join(folder, "train.log"), [sys.executable, "train.py", *argv]
    if budget:
        result = study_time.run_for(cmd, REPO, log, budget["seconds"], budget["grace"])
        write_json(record_path, {**setup, "argv": argv, **result})
        study_time.check_stop(result, folder, last_line(log))
        study_time.score(folder, cfg["valid-root"], cfg)
        return {**result, "skipped": False}
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        try:
            code = proc.wait()
        except BaseException:  # Ctrl-C or a kill of the study: never leave a training run behind
            proc.kill()
            proc.wait()
            raise
    seconds = time.perf_counter() - start
    write_json(record_path, {**setup, "argv": argv, "seconds": seconds, "returncode": code})
    if code or not os.path.isfile(done):
        raise UserError(f"the run in {folder} failed (exit {code}): {last_line(log)}; its output is in {log}")
    return {"seconds": seconds, "skipped": False}


def same_setup(record, setup):
    """Whether a finished run was made with `setup`: the same variant keys, --set and seed, and the same value for
    every key base.yaml had then. A key added to base.yaml since (a new train.py option written down at its
    default) does not make the run stale; change a value, or pass --rerun, to run it again."""
    old, new = record["base"], setup["base"]
    return record["settings"] == setup["settings"] and record.get("budget_seconds") == setup.get("budget_seconds") \
        and all(k in new and new[k] == v for k, v in old.items())


def last_line(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else "no output"


def read_run(folder):
    """What the table needs from a finished run's files."""
    with open(os.path.join(folder, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    log = read_log(os.path.join(folder, LOG_NAME))
    best = load_checkpoint(os.path.join(folder, "best.pt"))  # the safe loader: a run folder is data too
    scale = best["model"]["log_scale"].exp().clamp(max=100).item()  # as model.logit_scale caps it
    return {"report": {name: report[d][k] for name, d, k in METRICS}, "rsum": report["rsum"],
            "best_epoch": report["epoch"], "epochs": len(log), "steps": sum(e["train"]["steps"] for e in log),
            "pairs": sum(e["train"]["samples"] for e in log), "temperature": 1 / scale}


def read_timed_run(folder, started):
    """What the table needs from an equal-time run: eval.py's scores of last.pt, and what last.pt holds."""
    with open(os.path.join(folder, study_time.SCORE_NAME), encoding="utf-8") as f:
        scored = json.load(f)
    return {"report": {name: scored[d][k] for name, d, k in METRICS}, "rsum": scored["rsum"],
            **study_time.read_checkpoint(folder, started)}


# ---------------------------------------------------------------- main

def check_args(args):
    known = variant_names()
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else known
    unknown = [v for v in args.variants if v not in known]
    if unknown or not args.variants:
        raise ConfigError(f"unknown variant {', '.join(map(repr, unknown)) or '(none given)'}; --variants takes "
                          f"a comma-separated list of {', '.join(known)}")
    raw = args.seeds
    try:
        args.seeds = [int(s) for s in raw.split(",") if s.strip()]
    except ValueError:
        args.seeds = []
    if not args.seeds or min(args.seeds) < 0 or len(set(args.seeds)) < len(args.seeds):
        raise ConfigError(f"--seeds takes distinct comma-separated whole numbers >= 0, e.g. 0,1; got {raw!r}")
    if args.train_images < 2:
        raise ConfigError("--train-images must be at least 2")
    if args.budget_seconds is not None and not args.budget_seconds > 0:
        raise ConfigError(f"--budget-seconds must be more than 0, got {args.budget_seconds:g}")
    if not args.grace_seconds >= 0:
        raise ConfigError(f"--grace-seconds must be 0 or more, got {args.grace_seconds:g}")
    if args.output is None:
        args.output = os.path.join("checkpoints", "study", *(
            [f"time-{args.budget_seconds:g}s"] if args.budget_seconds else []), "study.json")
    parse_sets(args.set)


def run(argv):
    args = parse_args(argv)
    check_args(args)
    data = prepare_data(args.set, args.train_images)
    budget = args.budget_seconds and {"seconds": args.budget_seconds, "grace": args.grace_seconds}
    sets = parse_sets(args.set)
    # equal time: train.py must not run out of epochs first (--set epochs=N instead sizes its schedule)
    forced = {"epochs": study_time.NEVER_ENDS} if budget and "epochs" not in sets else {}
    output = os.path.abspath(args.output)
    runs_dir = os.path.dirname(output)
    descriptions = {v: read_variant(v)[0] for v in args.variants}
    # seed by seed: a study cut short still has every variant once before any has its second seed
    todo = [(v, s) for s in args.seeds for v in args.variants]
    runs, load_before = [], os.getloadavg()
    for i, (variant, seed) in enumerate(todo, 1):
        folder = os.path.join(runs_dir, f"{variant}-s{seed}")
        keys = read_variant(variant)[1]
        settings = run_settings(keys, args.set, seed, forced)
        cfg = {**load_yaml(os.path.join(STUDY_DIR, BASE + ".yaml")), **keys, **sets, **data}
        print(f"[{i}/{len(todo)}] {variant} seed {seed}: ", end="", flush=True)
        done = run_one(settings, folder, args.rerun, budget, cfg)
        scores = read_timed_run(folder, done["started"]) if budget else read_run(folder)
        result = {"variant": variant, "seed": seed, "folder": folder, "settings": settings, **done, **scores}
        runs.append(result)
        print(("finished before, " if done["skipped"] else f"{done['seconds']:.0f} s, ") +
              (f"{done['stopped']}, {result['steps']} steps, " if budget else "") +
              ", ".join(f"{k} {v:.3f}" for k, v in result["report"].items()), flush=True)
        table = summarise(sorted(runs, key=lambda r: args.variants.index(r["variant"])))
        write_json(output, {"data": data, "seeds": args.seeds, "set": args.set, "variants": descriptions,
                            "budget_seconds": args.budget_seconds, "scored": "last.pt" if budget else "best.pt",
                            "load_average_before": load_before, "load_average_after": os.getloadavg(),
                            "table": table, "runs": runs, "complete": i == len(todo)})
    print("\n" + format_table(table, descriptions, args.format, args.budget_seconds))
    print(f"table written to {output}")
    return table


def main(argv=None):
    return run_entry(run, argv)


if __name__ == "__main__":
    main()
