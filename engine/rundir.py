"""A training run's files: last.pt, best.pt and metrics.jsonl, kept consistent whatever instant a run is killed,
and report.json and curves.png, written beside them when the run ends.

Each epoch is saved in this order:
  1. last.pt, which holds everything: the model and optimizer, the epoch, the best score so far and its epoch,
     and the epoch's log line;
  2. best.pt, when the epoch is the best so far (the same state);
  3. the epoch's line appended to metrics.jsonl.
Each file is written atomically (engine.files), so a kill leaves either the old or the new version of a file.
A save within an epoch (`save_within_epoch`, engine.loop) writes last.pt alone: its "epoch" stays the last
finished one and its "log_line" that epoch's line, so everything below holds for it too, and best.pt and the log
move only at an epoch's end.
On resume from last.pt (epoch e), `repair` brings the other two in line with it: the log is cut back to epochs
<= e and completed with epoch e's line if that append was lost; best.pt is rewritten from last.pt if epoch e
was the best and its best.pt write was lost. Temporaries a killed writer left are removed at start.

One run at a time writes a run folder (`locked`). A run refuses to start over the files of another one unless
`overwrite: true`; even then they stay until the new run saves its first epoch in their place, so a new run that
stops early (bad data, a crash, Ctrl-C) loses nothing.
"""
import contextlib
import json
import os

from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.config import ConfigError
from engine.files import WriteError, atomic_write, remove_stale_partials

try:
    import fcntl
except ImportError:  # not on Windows: runs there are not locked
    fcntl = None

LOG_NAME = "metrics.jsonl"
LOCK_NAME = ".train.lock"


def run_folder(cfg):
    """The folder of last-path, where the log, the report and the curves go too."""
    return os.path.dirname(os.path.abspath(cfg["last-path"]))


def log_path(cfg):
    return os.path.join(run_folder(cfg), LOG_NAME)


def report_path(cfg):
    return os.path.join(run_folder(cfg), "report.json")


def curves_path(cfg):
    return os.path.join(run_folder(cfg), "curves.png")


def outputs(cfg):
    """{what it is: path} for every file a run writes."""
    return {"last-path": cfg["last-path"], "best-path": cfg["best-path"], "the log": log_path(cfg),
            "the report": report_path(cfg), "the curves": curves_path(cfg)}


def run_files(cfg):
    return [p for p in outputs(cfg).values() if os.path.exists(p)]


@contextlib.contextmanager
def locked(cfg):
    """Hold an exclusive lock on the run folder while the body runs, so a second run on the same files fails at
    once (naming this one's pid) instead of interleaving their writes. The system drops the lock when its process
    dies, so a killed run never blocks the next one."""
    folder = run_folder(cfg)
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise WriteError(f"could not create the run folder {folder} ({e.strerror or e}); choose another "
                         f"last-path") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
                raise ConfigError(f"another training run (pid {pid}) is writing to {folder}; wait for it to end, "
                                  f"stop it, or write this run elsewhere with --last-path/--best-path") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode("ascii"))
        yield
    finally:
        if fcntl is not None:  # loader workers forked meanwhile share the lock's open file: unlock it for them too
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def check_paths(cfg):
    """One-line errors for output paths that cannot work: a folder where a file goes, two outputs on one file."""
    seen = {}
    for what, path in outputs(cfg).items():
        if os.path.isdir(path):
            fix = f"give {what} a file path" if what.endswith("-path") else "move it away or choose another last-path"
            raise ConfigError(f"{what} {path} is a folder, not a file; {fix}")
        real = os.path.realpath(path)
        if real in seen:
            raise ConfigError(f"{seen[real]} and {what} are the same file ({path}); give them different paths")
        seen[real] = what
    if cfg["load-checkpoint"] and os.path.isdir(cfg["load-path"]):
        raise ConfigError(f"load-path {cfg['load-path']} is a folder; pass the checkpoint in it, e.g. "
                          f"{os.path.join(cfg['load-path'], 'last.pt')}")


def resumes_in_place(cfg):
    """True when the run resumes from its own last.pt, so the files beside it are its own. A load-path that is
    not there counts too: loading it fails next, with a message that says so."""
    if not cfg["load-checkpoint"]:
        return False
    if not os.path.isfile(cfg["load-path"]) or not os.path.exists(cfg["last-path"]):
        return not os.path.isfile(cfg["load-path"])
    return os.path.samefile(cfg["load-path"], cfg["last-path"])


def prepare(cfg):
    """Before any data is read, with the run's lock held and its paths checked (`check_paths`, before the lock,
    so that a refused run creates nothing): remove killed writers' temporaries, and refuse to start over another
    run's files unless `overwrite` says so.

    Returns (a note to print or None, the other run's files that this run replaces). They are not removed here:
    pass them to `save_epoch` (a fresh run) or `discard` them when the resumed state is in place."""
    for path in outputs(cfg).values():
        remove_stale_partials(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    existing = [] if resumes_in_place(cfg) else run_files(cfg)
    if not existing:
        return None, []
    if not cfg["overwrite"]:
        verb = "exists" if len(existing) == 1 else "exist"
        how = f"this run resumes from {cfg['load-path']}, not from them" if cfg["load-checkpoint"] else \
            "resume it with --load-checkpoint true"
        raise ConfigError(f"{', '.join(existing)} already {verb} from another run; {how}, write this run elsewhere "
                          f"with --last-path/--best-path, or pass --overwrite true to replace them")
    return (f"overwrite: {', '.join(existing)} will be replaced once this run has trained its first epoch "
            f"(kept if it stops before)"), existing


def discard(paths, keep=()):
    """Remove the files of a run this one replaces (those still there, but `keep`)."""
    for path in paths:
        if path not in keep and os.path.exists(path):
            os.remove(path)


def save_epoch(cfg, state, improved, replacing=()):
    """Save one finished epoch in the order the module docstring gives. `state["log_line"]` is the log entry.

    `replacing`: another run's files that this run overwrites, removed just before its first save (last.pt is
    replaced by the save itself), so that nothing of that run is mixed into this one's."""
    discard(replacing, keep=(cfg["last-path"],))
    save_checkpoint(cfg["last-path"], **state)
    if improved:
        save_checkpoint(cfg["best-path"], **state)
    append_log(log_path(cfg), state["log_line"])


def save_within_epoch(cfg, state, replacing=()):
    """Save last.pt in the middle of an epoch (`state["partial"]` says where); best.pt and the log stay."""
    discard(replacing, keep=(cfg["last-path"],))
    save_checkpoint(cfg["last-path"], **state)


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
    if ckpt.get("log_line") is not None:  # epoch e's line, whether or not its append survived
        kept.append(ckpt["log_line"])
    else:  # a checkpoint from before log lines were stored: keep what the log has for epoch e
        kept += [e for e in entries if e.get("epoch") == epoch][:1]
    if [e.get("epoch") for e in kept] != [e.get("epoch") for e in entries]:
        notes.append(f"{LOG_NAME} set back to epoch {epoch} to match {cfg['load-path']}")
    atomic_write(path, lambda f: f.writelines(json.dumps(e) + "\n" for e in kept))
    if ckpt.get("best_epoch") == epoch and not ckpt.get("partial"):  # a save within an epoch has other weights
        best = load_checkpoint(cfg["best-path"]) if os.path.isfile(cfg["best-path"]) else None
        if best is None or best.get("epoch") != epoch:
            save_checkpoint(cfg["best-path"], **ckpt)
            notes.append(f"{cfg['best-path']} rewritten from epoch {epoch}, the best, whose save was cut short")
    return notes
