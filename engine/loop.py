"""The epoch loop around `engine.epoch.train_one_epoch`: validation, the epoch's save, early stop; within an
epoch, saves every few steps or minutes and the clean stop on a scheduler's signal (engine.preempt); and the
run's end (`finish`): the report set scored with best.pt, the final scores logged, the curves drawn.

A save within an epoch writes last.pt only (engine.rundir.save_within_epoch): best.pt and metrics.jsonl change
only at an epoch's end, so the selection score and the curves are those of whole epochs. Such a checkpoint's
"epoch" is the last finished epoch (what every resume path and `rundir.repair` read), and its "partial" says how
far into the next one it is: steps done, the sums behind the epoch's mean loss, samples, skipped images. A resume
continues from the next batch (`resume_position`), with every process's RNG state as it was at the save.
"""
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

from engine import rundir
from engine.checkpoint import load_checkpoint
from engine.epoch import Trainer, train_one_epoch
from engine.evaluation import Encoding, evaluate
from engine.files import write_json
from engine.metrics import format_table
from engine.plots import plot_curves
from engine.preempt import StopSignals, stop_message
from engine.reporting import recall_scalars
from engine.runtime import agree, barrier, broadcast_flag, gather_objects, gather_rng_states


def log(rank, message):
    """Print on rank 0; a note that is None (nothing to say) prints nothing."""
    if rank == 0 and message:
        print(message, flush=True)


@dataclass
class Run:
    """What the loop works with, built by train.py. `model` is unwrapped (its state dict is what is saved);
    `position` is the sampler or shard loader that takes `set_epoch` and `resume_at`."""
    cfg: dict
    rank: int
    world_size: int
    model: Any
    trainer: Trainer
    loader: Any
    position: Any
    tokenizer: Any
    enc: Encoding
    select_root: str
    select_files: Optional[list]
    select_pairs: list
    valid_pairs: list
    text_vocab: str
    signals: StopSignals
    reporter: Any = None  # engine.reporting.Reporter; one without targets on ranks other than 0


def state_of(r, epoch, step, best, best_epoch, rngs, log_line, **more):
    """The checkpoint dict (engine.checkpoint): plain values and tensors only."""
    t = r.trainer
    return {"model": r.model.state_dict(), "loss": t.loss_fn.state_dict(), "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(), "scaler": t.scaler.state_dict(), "epoch": epoch, "step": step,
            "best_rsum": best, "best_epoch": best_epoch, "rng": rngs, "config": r.cfg, "metrics": None,
            "select_files": r.select_files, "log_line": log_line, "text_vocab": r.text_vocab, "partial": None,
            "momentum": t.momentum.state_dict() if t.momentum is not None else None,
            **more}


def resume_position(cfg, ckpt, world_size, start_epoch):
    """The "partial" of a checkpoint saved within `start_epoch`, when this run can continue it exactly; a note
    when it cannot (the epoch then starts again from its first batch); (None, None) for an epoch-end checkpoint."""
    partial = ckpt.get("partial")
    if not partial or partial.get("epoch") != start_epoch:
        return None, None
    old = ckpt["config"]
    if partial.get("world_size") != world_size or old.get("batch-size") != cfg["batch-size"]:
        return None, (f"note: {cfg['load-path']} was saved within epoch {start_epoch} by {partial.get('world_size')} "
                      f"process(es) at batch-size {old.get('batch-size')}; with {world_size} at "
                      f"{cfg['batch-size']} its position does not carry over, so epoch {start_epoch} starts again")
    return partial, None


class WithinEpoch:
    """`after_step` for train_one_epoch: saves every few steps or minutes, and the stop on a signal. The epoch
    loop keeps `epoch`, `best`, `best_epoch`, `history` (the last finished epoch's line) and `replacing` current."""

    def __init__(self, r, steps_per_epoch, replacing):
        self.r, self.steps_per_epoch, self.replacing = r, steps_per_epoch, replacing
        self.epoch, self.best, self.best_epoch, self.history = 0, -1.0, None, None
        self.last_save = time.monotonic()

    def __call__(self, p):
        r, cfg = self.r, self.r.cfg
        step = self.epoch * self.steps_per_epoch + p["steps"]
        every_steps, every_s = cfg["save-every-steps"], cfg["save-every-minutes"] * 60
        due = (bool(every_steps) and step % every_steps == 0) or \
            (bool(every_s) and time.monotonic() - self.last_save >= every_s)
        stop, due = agree([r.signals.requested, due], r.world_size, r.trainer.device)
        if not stop and (not due or p["steps"] == self.steps_per_epoch):  # the epoch's end saves anyway
            return False
        rngs = gather_rng_states(r.world_size)
        if r.rank == 0:
            r.reporter.flush()  # everything logged up to this step is on disk before the checkpoint says so
            done = {k: p[k] for k in ("steps", "samples", "skipped", "skipped_files", "seconds", "waiting", "totals")}
            state = state_of(r, self.epoch - 1, step, self.best, self.best_epoch, rngs, self.history,
                             partial={**done, "epoch": self.epoch, "world_size": r.world_size})
            rundir.save_within_epoch(cfg, state, self.replacing)
            self.replacing = []
        barrier()  # no process leaves before the save is done: torchrun would stop rank 0 in the middle of it
        self.last_save = time.monotonic()
        if stop:
            raise stop_message(cfg, r.signals.requested or "a signal to another process", self.epoch, p["steps"],
                               self.steps_per_epoch, step)
        return False


def warn_skipped(stats, rank, world_size):
    """Sum the epoch's decoding failures over the processes into `stats` (skipped_images: failures,
    skipped_files: distinct files, folder data only) and warn once about them on rank 0."""
    names = stats.pop("skipped_file_names")
    counts = gather_objects((stats["skipped_images"], names), world_size)
    stats["skipped_images"] = sum(c for c, _ in counts)
    files = len(set().union(*(n for _, n in counts)))
    stats["skipped_files"] = files
    if files:  # folder data: a bad file is met once per caption row that reaches it
        log(rank, f"warning: {files} image file(s) failed to decode this epoch and were skipped "
                  f"({stats['skipped_images']} skips: one per caption row that met a bad file)")
    elif stats["skipped_images"]:  # shards name no files
        log(rank, f"warning: {stats['skipped_images']} undecodable image(s) skipped this epoch (counted each time "
                  f"the stream reads one)")


def run_epochs(r, start_epoch, best, best_epoch, history, replacing, partial=None, rng=None):
    """Train epochs start_epoch.. (the first from `partial` when given, with this process's `rng` state);
    returns the last epoch's log line (None when nothing was trained). Raises Stopped after a signal's save."""
    cfg, rank, world_size = r.cfg, r.rank, r.world_size
    steps_per_epoch = len(r.loader)
    saver = WithinEpoch(r, steps_per_epoch, replacing)

    for epoch in range(start_epoch, cfg["epochs"]):
        if r.position is not None:
            r.position.set_epoch(epoch)
        progress = None
        if partial is not None:  # only for the first epoch of a resumed run
            r.position.resume_at(partial["samples"] // world_size)  # this process's share
            progress = {**partial, "rng": rng}
            partial = None
        saver.epoch, saver.best, saver.best_epoch, saver.history = epoch, best, best_epoch, history
        stats = train_one_epoch(r.trainer, r.loader, epoch, show_progress=rank == 0, progress=progress,
                                after_step=saver, reporter=r.reporter, first_step=epoch * steps_per_epoch)
        stats.pop("stopped")
        warn_skipped(stats, rank, world_size)
        if rank == 0:
            selection = evaluate(r.model, r.tokenizer, r.select_root, r.enc, only=r.select_files,
                                 pairs=r.select_pairs)
            report = evaluate(r.model, r.tokenizer, cfg["valid-root"], r.enc, pairs=r.valid_pairs) \
                if cfg["report-every-epoch"] else None
        rngs = gather_rng_states(world_size)  # after validation, which draws from the RNG too
        stop = False
        if rank == 0:
            print("selection split:\n" + format_table(selection), flush=True)
            improved = selection["rsum"] > best
            if improved:
                best, best_epoch = selection["rsum"], epoch
            history = {"epoch": epoch, "train": stats, "select": selection, "best": improved}
            if report is not None:
                history["valid_not_used_for_selection"] = report
            scalars = recall_scalars("select", selection)
            if report is not None:
                scalars.update(recall_scalars("report", report))
            r.reporter.epoch((epoch + 1) * steps_per_epoch, epoch, scalars)  # flushed before the save: see there
            state = state_of(r, epoch, (epoch + 1) * steps_per_epoch, best, best_epoch, rngs, history,
                             metrics=selection)
            rundir.save_epoch(cfg, state, improved, saver.replacing)
            saver.replacing = []
            print(f"epoch {epoch}: loss {stats['loss']:.4f}, selection rsum {selection['rsum']:.4f}"
                  f"{' (best)' if improved else ''}, {stats['samples_per_s']:.1f} samples/s, "
                  f"{stats['data_wait_share']:.0%} of the time waiting for data", flush=True)
            stop = cfg["patience"] is not None and epoch - best_epoch >= cfg["patience"]
            if stop:
                print(f"early stop: no better selection rsum for {cfg['patience']} epoch(s) since epoch "
                      f"{best_epoch}", flush=True)
        saver.last_save = time.monotonic()
        stop, signalled = agree([broadcast_flag(stop, world_size), r.signals.requested], world_size,
                                r.trainer.device)
        if signalled and epoch + 1 < cfg["epochs"] and not stop:  # saved just now, whole: stop here
            barrier()
            raise stop_message(cfg, r.signals.requested or "a signal to another process", epoch + 1, 0,
                               steps_per_epoch, (epoch + 1) * steps_per_epoch)
        if stop:
            break
        barrier()
    return history


def finish(r, history, trained):
    """The run's end on rank 0: the report set scored with best.pt, the final scores logged (unless a finished run
    was resumed with nothing to train: they are logged already), the curves drawn."""
    cfg = r.cfg
    history["report"] = final_report(cfg, r.model, r.tokenizer, r.enc, r.valid_pairs)
    if trained:
        r.reporter.final((history["epoch"] + 1) * len(r.loader), history["report"], cfg,
                         table=format_table(history["report"]) if history["report"] else "")
    log_file = rundir.log_path(cfg)
    plot = plot_curves(log_file, rundir.curves_path(cfg))
    print(f"log: {log_file}; curves: {plot}")


def final_report(cfg, model, tokenizer, enc, pairs):
    """Score best.pt (chosen on the selection split, never on this set) on valid-root, whose rows are `pairs`;
    print and write it."""
    if not os.path.isfile(cfg["best-path"]):  # resumed into new paths from a run whose best was saved elsewhere
        print(f"note: no {cfg['best-path']} in this run's files; the report on valid-root is skipped")
        return None
    best = load_checkpoint(cfg["best-path"], map_location="cpu")
    model.load_state_dict(best["model"])
    report = evaluate(model, tokenizer, cfg["valid-root"], enc, pairs=pairs)
    print(f"report: {cfg['valid-root']} scored with {cfg['best-path']} (epoch {best['epoch']}, chosen on the "
          f"selection split)\n" + format_table(report), flush=True)
    if "one_caption_per_image" in report:
        print(format_table(report["one_caption_per_image"]), flush=True)
    report = {**report, "epoch": best["epoch"], "checkpoint": cfg["best-path"], "valid_root": cfg["valid-root"]}
    path = write_json(rundir.report_path(cfg), report)
    print(f"report written to {path}")
    return report
