"""One table across training runs, read from what each run folder holds.

    python -m tools.runs checkpoints/*                      # aligned text
    python -m tools.runs checkpoints/* --format markdown    # or csv, json

Columns: the run folder, its status, the config keys whose values differ between the runs listed, epochs done
(of those planned), the best epoch, its selection rsum, the report set's R@1 both ways (report.json, best.pt on
valid-root), training pairs/s, time, and what is missing. Status is one of:
  running        another process holds the folder's run lock (engine/rundir.py) right now
  finished       report.json is there and every planned epoch was trained
  stopped early  report.json is there after fewer epochs than planned (patience)
  interrupted    no report.json and nobody running: resume it with --load-checkpoint true
  time budget    bench.study --budget-seconds stopped it on the clock; its R@1 is eval.py's score of its last.pt
                 (scored.json), not best.pt's
  not a run      none of a run's files (metrics.jsonl, last.pt, report.json)

The files are data, never code: metrics.jsonl and report.json are JSON; the config comes from config.json when
the run wrote one, else from last.pt or best.pt read with torch.load(weights_only=True), which unpickles nothing
but tensors, containers and the NumPy arrays of the stored RNG state. What cannot be read (a half-written log,
a run from an older version, a damaged checkpoint) is listed as missing, never raised.
"""
import argparse
import csv
import io
import json
import os

from engine.errors import run_entry

# engine.rundir's names are imported by the functions that read a run folder: that module loads torch (for its
# checkpoints, seconds and hundreds of MB), which --help and the tables' renderers (bench.study) never need.

try:
    import fcntl
except ImportError:  # not on Windows: a running run is not detected there
    fcntl = None

FORMATS = ("table", "csv", "markdown", "json")
TEXT_FORMATS = FORMATS[:3]  # what render() writes; json is each tool's own
OWN_PATHS = ("last-path", "best-path", "load-path")  # name the run's own files: they differ for every run
STUDY_RECORD = "study-run.json"  # bench/study.py's record of a run: holds its wall time
STUDY_SCORE = "scored.json"  # bench/study.py's score of an equal-time run's last.pt (eval.py's metrics)


# ---------------------------------------------------------------- reading one folder

def read_json(path, missing, what):
    """The dict in a JSON file, or None with `what` noted in `missing`."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        missing.append(f"{what} unreadable ({type(e).__name__})")
        return None
    if not isinstance(data, dict):
        missing.append(f"{what} is not a JSON object")
        return None
    return data


def read_config(folder, missing):
    """The run's merged config: config.json, else the one stored in last.pt or best.pt."""
    cfg = read_json(os.path.join(folder, "config.json"), missing, "config.json")
    if cfg is not None:
        return cfg
    for name in ("last.pt", "best.pt"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                ckpt = load_weights_only(path)
            except Exception as e:  # a file from elsewhere: whatever is wrong with it is listed, never raised
                missing.append(f"{name} unreadable ({type(e).__name__})")
                continue
            if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict):
                return ckpt["config"]
            missing.append(f"{name} holds no config")
    missing.append("config")
    return {}


def load_weights_only(path):
    """torch.load without arbitrary unpickling; the RNG state's NumPy array is the one non-tensor it allows.
    mmap: only the small config is used, so the weights are never read into memory."""
    import numpy as np
    import torch

    core = getattr(np, "_core", None) or np.core  # NumPy 2 moved its internals to _core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype("uint32"))]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def is_running(folder):
    """True while a live process holds the run lock (the system drops it when its process dies)."""
    from engine.rundir import LOCK_NAME
    path = os.path.join(folder, LOCK_NAME)
    if fcntl is None or not os.path.isfile(path):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the shared lock taken just now
    return False


def number(value):
    """`value` when it is a number (not a bool), else None: a log line from elsewhere may hold anything."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def dig(entry, *keys):
    """entry[k1][k2]... or None where a level is missing (a log line from an older version)."""
    for key in keys:
        if not isinstance(entry, dict) or key not in entry:
            return None
        entry = entry[key]
    return entry


def read_run(folder):
    """One row: {run, status, epochs, planned, best_epoch, select_rsum, i2t_R@1, t2i_R@1, pairs_per_s,
    seconds, config, missing}."""
    from engine.rundir import LOG_NAME, read_log
    row = {"run": folder, "status": None, "epochs": None, "planned": None, "best_epoch": None,
           "select_rsum": None, "report_i2t_R@1": None, "report_t2i_R@1": None, "pairs_per_s": None,
           "seconds": None, "config": {}, "missing": []}
    missing = row["missing"]
    if not os.path.isdir(folder):
        row["status"] = "not a run"
        missing.append("not a folder")
        return row
    present = {n: os.path.isfile(os.path.join(folder, n)) for n in (LOG_NAME, "last.pt", "best.pt", "report.json")}
    if not any(present[n] for n in (LOG_NAME, "last.pt", "report.json")):
        row["status"] = "running" if is_running(folder) else "not a run"
        missing += [n for n in (LOG_NAME, "last.pt", "report.json")]
        return row
    missing += [n for n, there in present.items() if not there]

    log_path = os.path.join(folder, LOG_NAME)
    log = read_log(log_path)
    if present[LOG_NAME]:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = sum(1 for line in f if line.strip())
        if lines > len(log):
            missing.append(f"{lines - len(log)} unreadable line(s) of {LOG_NAME}")
    row["epochs"] = len({e["epoch"] for e in log if isinstance(number(dig(e, "epoch")), int)})
    best = [e for e in log if dig(e, "best") is True]
    if best:
        row["best_epoch"], row["select_rsum"] = dig(best[-1], "epoch"), number(dig(best[-1], "select", "rsum"))
    elif log:
        missing.append("best epoch in the log")
    speeds = [number(dig(e, "train", "samples_per_s")) for e in log]
    # an epoch's time: its wall time where the line records one, else its training loop's (samples / speed)
    times = [number(dig(e, "seconds")) or (number(dig(e, "train", "samples")) or 0) / s if s else None
             for e, s in zip(log, speeds, strict=True)]
    if log and None not in speeds and None not in times:
        row["pairs_per_s"], row["seconds"] = sum(speeds) / len(speeds), sum(times)
    elif log:
        missing.append("speed in the log")
    study = read_json(os.path.join(folder, STUDY_RECORD), missing, STUDY_RECORD)
    if isinstance(dig(study, "seconds"), (int, float)):
        row["seconds"] = study["seconds"]  # bench/study.py timed the whole run: wall time

    report = read_json(os.path.join(folder, "report.json"), missing, "report.json")
    if report is not None and report.get("written_by") == "eval.py":
        missing.append("report.json (the one there is eval.py's, not the run's)")
        report = None
    budgeted = dig(study, "stopped") in ("terminated", "killed")  # bench.study's clock ended it
    if report is None and budgeted:
        report = read_json(os.path.join(folder, STUDY_SCORE), missing, STUDY_SCORE)
        if report is not None and "report.json" in missing:
            missing.remove("report.json")  # an equal-time run has scored.json in its place
    if report is not None:
        row["report_i2t_R@1"] = number(dig(report, "image_to_text", "R@1"))
        row["report_t2i_R@1"] = number(dig(report, "text_to_image", "R@1"))
        if row["best_epoch"] is None:
            row["best_epoch"] = number(report.get("epoch"))

    row["config"] = read_config(folder, missing)
    planned = row["config"].get("epochs")
    row["planned"] = planned if isinstance(planned, int) else None
    if is_running(folder):
        row["status"] = "running"
    elif budgeted:
        row["status"] = "time budget"
    elif report is None:
        row["status"] = "interrupted"
    elif row["planned"] is not None and row["epochs"] < row["planned"]:
        row["status"] = "stopped early"
    else:
        row["status"] = "finished"
    return row


# ---------------------------------------------------------------- the table

def differing_keys(rows):
    """Config keys whose values are not the same in every run that has a config, in first-seen order."""
    configs = [r["config"] for r in rows if r["config"]]
    keys = dict.fromkeys(k for c in configs for k in c if k not in OWN_PATHS)
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]


def cell(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table_rows(rows, keys):
    """Header and text cells."""
    header = ["run", "status", *keys, "epochs", "best epoch", "select rsum", "report I2T R@1", "report T2I R@1",
              "pairs/s", "time s", "missing"]
    out = [header]
    for r in rows:
        epochs = "-" if r["epochs"] is None else f"{r['epochs']}/{cell(r['planned'])}"
        out.append([r["run"], r["status"], *(cell(r["config"].get(k), 6) if r["config"] else "-" for k in keys),
                    epochs, cell(r["best_epoch"]), cell(r["select_rsum"]), cell(r["report_i2t_R@1"]),
                    cell(r["report_t2i_R@1"]), cell(r["pairs_per_s"], 1), cell(r["seconds"], 0),
                    "; ".join(r["missing"]) or "-"])
    return out


def format_runs(rows, fmt="table"):
    keys = differing_keys(rows)
    if fmt == "json":
        return json.dumps([{**{k: v for k, v in r.items() if k != "config"},
                            "config": {k: r["config"].get(k) for k in keys}} for r in rows], indent=2, default=str)
    return render(table_rows(rows, keys), fmt)


def render(cells, fmt="table"):
    """Rows of text cells, the first the header, as aligned text, csv or markdown; bench/study.py prints its
    tables through this too, so a README table from either tool has one shape."""
    if fmt == "csv":
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(cells)
        return buffer.getvalue().rstrip("\n")
    if fmt == "markdown":
        escape = [[c.replace("|", "\\|") for c in line] for line in cells]
        lines = ["| " + " | ".join(line) + " |" for line in escape]
        return "\n".join([lines[0], "|" + "---|" * len(cells[0]), *lines[1:]])
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells)


def parse_args(argv):
    p = argparse.ArgumentParser(description="One table of training run folders: differing config keys, epochs, "
                                            "best epoch, selection rsum, report-set R@1, speed, status.")
    p.add_argument("folders", nargs="+", help="run folders, e.g. checkpoints/*")
    p.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")
    return p.parse_args(argv)


def run(argv):
    args = parse_args(argv)
    rows = [read_run(os.path.normpath(f)) for f in args.folders]
    print(format_runs(rows, args.format))
    return rows


def main(argv=None):
    return run_entry(run, argv)


if __name__ == "__main__":
    main()
