"""A training run's files: last.pt, best.pt and metrics.jsonl, kept consistent whatever instant a run is killed.

Each epoch is saved in this order:
  1. last.pt, which holds everything: the model and optimizer, the epoch, the best score so far and its epoch,
     and the epoch's log line;
  2. best.pt, when the epoch is the best so far (the same state);
  3. the epoch's line appended to metrics.jsonl.
Each file is written atomically (engine.files), so a kill leaves either the old or the new version of a file.
On resume from last.pt (epoch e), `repair` brings the other two in line with it: the log is cut back to epochs
<= e and completed with epoch e's line if that append was lost; best.pt is rewritten from last.pt if epoch e
was the best and its best.pt write was lost. Temporaries a killed writer left are removed at start.
A fresh run refuses to start over another run's files unless `overwrite: true`.
"""
import json
import os

from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.config import ConfigError
from engine.files import atomic_write, remove_stale_partials

LOG_NAME = "metrics.jsonl"


def log_path(cfg):
    return os.path.join(os.path.dirname(os.path.abspath(cfg["last-path"])), LOG_NAME)


def run_files(cfg):
    return [p for p in (cfg["last-path"], cfg["best-path"], log_path(cfg)) if os.path.exists(p)]


def prepare(cfg):
    """Before any data is read: remove killed writers' temporaries, and refuse to start a fresh run over the
    files of another one (or clear them when `overwrite` says so). Returns a note to print, or None."""
    for path in (cfg["last-path"], cfg["best-path"], log_path(cfg)):
        remove_stale_partials(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    if cfg["load-checkpoint"]:
        return None
    existing = run_files(cfg)
    if not existing:
        return None
    if not cfg["overwrite"]:
        raise ConfigError(f"{', '.join(existing)} already exist from another run; resume it with "
                          f"--load-checkpoint true, write this run elsewhere with --last-path/--best-path, or "
                          f"pass --overwrite true to replace them")
    for path in existing:
        os.remove(path)
    return f"overwrite: removed {', '.join(existing)}"


def save_epoch(cfg, state, improved):
    """Save one finished epoch in the order the module docstring gives. `state["log_line"]` is the log entry."""
    save_checkpoint(cfg["last-path"], **state)
    if improved:
        save_checkpoint(cfg["best-path"], **state)
    append_log(log_path(cfg), state["log_line"])


def append_log(path, entry):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_log(path):
    """The log's entries; a torn last line (a kill mid-append) is dropped."""
    if not os.path.isfile(path):
        return []
    entries = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                entries.append(json.loads(line))
            except ValueError:
                break
    return entries


def repair(cfg, ckpt):
    """Make metrics.jsonl and best.pt agree with the resumed last.pt (see the module docstring). Returns notes."""
    notes = []
    epoch = ckpt["epoch"]
    path = log_path(cfg)
    entries = read_log(path)
    kept = [e for e in entries if e.get("epoch", -1) < epoch]
    if "log_line" in ckpt:  # epoch e's line, whether or not its append survived
        kept.append(ckpt["log_line"])
    else:  # a checkpoint from before log lines were stored: keep what the log has for epoch e
        kept += [e for e in entries if e.get("epoch") == epoch][:1]
    if [e.get("epoch") for e in kept] != [e.get("epoch") for e in entries]:
        notes.append(f"{LOG_NAME} set back to epoch {epoch} to match {cfg['load-path']}")
    atomic_write(path, lambda f: f.writelines(json.dumps(e) + "\n" for e in kept))
    if ckpt.get("best_epoch") == epoch:
        best = load_checkpoint(cfg["best-path"]) if os.path.isfile(cfg["best-path"]) else None
        if best is None or best.get("epoch") != epoch:
            save_checkpoint(cfg["best-path"], **ckpt)
            notes.append(f"{cfg['best-path']} rewritten from epoch {epoch}, the best, whose save was cut short")
    return notes
