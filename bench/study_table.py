"""The study's table: one row per variant, the mean and spread over its seeds, at equal steps or equal time.
Printed through tools.runs.render, the same code as the runs table, as aligned text, markdown or csv."""
import statistics

from tools.runs import render

METRICS = (("I2T R@1", "image_to_text", "R@1"), ("I2T R@5", "image_to_text", "R@5"),
           ("T2I R@1", "text_to_image", "R@1"), ("T2I R@5", "text_to_image", "R@5"))


def spread(values, digits=3):
    """'mean' for one value, 'mean (min-max)' for several."""
    mean = f"{statistics.fmean(values):.{digits}f}"
    return mean if len(values) == 1 else f"{mean} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def summarise(runs):
    """One row per variant from its runs (dicts with variant, seed, seconds and read_run's or read_timed_run's
    keys), in run order."""
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == variant]
        row = {"variant": variant, "seeds": [r["seed"] for r in mine]}
        for name, *_ in METRICS:
            values = [r["report"][name] for r in mine]
            row[name] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
                         "values": values}
        for key in ("rsum", "temperature", "seconds"):
            row[key] = statistics.fmean(r[key] for r in mine)
        for key in ("steps", "pairs", "epochs", "best_epoch", "saved_at", "stopped"):
            if key in mine[0]:  # epochs and best epoch at equal steps; when last.pt was saved at equal time
                row[key] = [r[key] for r in mine]
        rows.append(row)
    return rows


def table_cells(rows):
    """Header and text cells: equal-steps rows show the epoch of best.pt, equal-time rows when last.pt was saved."""
    timed = bool(rows) and "saved_at" in rows[0]
    metrics = [name for name, *_ in METRICS]
    if timed:
        header = ["variant", "seeds", *metrics, "steps", "pairs", "stopped", "saved at s", "T", "s/run"]
    else:
        header = ["variant", "seeds", *metrics, "steps", "pairs", "best epoch", "T", "s/run"]
    cells = [header]
    for r in rows:
        line = [r["variant"], ",".join(map(str, r["seeds"])), *(spread(r[name]["values"]) for name in metrics)]
        if timed:
            line += [spread(r["steps"], 0), spread(r["pairs"], 0), ",".join(r["stopped"]),
                     f"{statistics.fmean(r['saved_at']):.0f}"]
        else:
            line += ["/".join(sorted(set(map(str, r["steps"])))), "/".join(sorted(set(map(str, r["pairs"])))),
                     ",".join(f"{b}/{e}" for b, e in zip(r["best_epoch"], r["epochs"], strict=True))]
        cells.append(line + [f"{r['temperature']:.4f}", f"{r['seconds']:.0f}"])
    return cells


def format_table(rows, notes, fmt="table", budget=None):
    """The table through tools.runs.render (aligned text, markdown or csv), and, but for csv, what it shows."""
    text = render(table_cells(rows), fmt)
    if fmt == "csv":
        return text
    if budget:
        about = (f"Equal wall time: every run trained for {budget:g} s (counted from train.py's launch, its start-up "
                 "included), then was stopped; recalls on the report set (valid-root, one caption per image) of "
                 "each run's last.pt, scored by eval.py: mean over the seeds (min-max).\n"
                 "steps: optimizer steps in last.pt; pairs: steps x batch; stopped: how each run ended (terminated: "
                 "SIGTERM; killed: SIGKILL after the grace period; finished: its epochs ran out first); saved at s: "
                 "when last.pt was written, so budget - saved at = time trained but not scored; T: temperature "
                 "at last.pt (mean); s/run: wall time per run, on whatever else shared the machine.")
    else:
        about = ("Recalls on the report set (valid-root, one caption per image), each run's best.pt: mean over the "
                 "seeds (min-max).\nsteps: optimizer steps; pairs: image-caption pairs trained on; best epoch: the "
                 "epoch of best.pt / epochs run, counting from 0 as train.py does; T: temperature at best.pt "
                 "(mean); s/run: wall time per run, on whatever else shared the machine.")
    return "\n".join([text, "", about, *(f"{r['variant']}: {notes[r['variant']]}" for r in rows)])
