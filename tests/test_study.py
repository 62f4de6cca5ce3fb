"""bench/study.py on a microscopic setting: its table holds the run's own report.json numbers, a finished run is
skipped on the next call, and mistakes are one-line errors. At equal wall time (bench/study_time.py) every run is
stopped by the clock, scored by eval.py on the last.pt it saved, and its row holds the steps and pairs reached."""
import json
import os
import signal
import sys
import time

import pytest

import train
from bench import study, study_time
from bench.study_table import table_cells
from engine.checkpoint import load_checkpoint
from engine.config import load_config
from engine.errors import UserError


def tiny_study(data, output, *extra):
    """One variant, one seed, one epoch of 5 steps of 8 pairs on the tiny_data folders: seconds of training."""
    sets = {"train-root": data / "train", "valid-root": data / "valid", "text-model": data / "text",
            "select-images": 4, "epochs": 1, "batch-size": 8, "warmup-steps": 1, "num-workers": 0}
    return ["--variants", "learnable-temp", "--seeds", "3", "--output", str(output),
            *(a for k, v in sets.items() for a in ("--set", f"{k}={v}")), *extra]


def test_study_table_is_read_from_the_runs_and_a_finished_run_is_skipped(tiny_data, tmp_path, capsys):
    output = tmp_path / "study.json"
    table = study.main(tiny_study(tiny_data, output))
    folder = tmp_path / "learnable-temp-s3"
    report = json.loads((folder / "report.json").read_text())
    written = json.loads(output.read_text())
    assert written["complete"] and written["table"] == table
    (row,) = table
    assert row["variant"] == "learnable-temp" and row["seeds"] == [3]
    for name, direction, k in study.METRICS:
        assert row[name]["values"] == [report[direction][k]]
        assert row[name]["mean"] == row[name]["min"] == row[name]["max"] == report[direction][k]
    assert row["rsum"] == report["rsum"] and row["best_epoch"] == [report["epoch"]] == [0]
    # 24 images less 4 held out, 2 captions each: 40 training pairs, 5 batches of 8, as the log counts them
    (line,) = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert row["steps"] == [line["train"]["steps"]] == [5] and row["pairs"] == [line["train"]["samples"]] == [40]
    assert 0 < row["temperature"] < 1  # learned from 0.07, one tiny step away from it
    row_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("learnable-temp "))
    assert row_line.split()[2:6] == [f"{report[d][k]:.3f}" for _, d, k in study.METRICS]

    # the same study again: nothing is trained, the same numbers come back
    stamp = (folder / "report.json").stat().st_mtime_ns, (folder / "train.log").stat().st_mtime_ns
    assert study.main(tiny_study(tiny_data, output)) == table
    assert "finished before" in capsys.readouterr().out
    assert ((folder / "report.json").stat().st_mtime_ns, (folder / "train.log").stat().st_mtime_ns) == stamp

    # other settings over a finished run: an error, not a silent mix of two setups
    with pytest.raises(SystemExit) as e:
        study.main(tiny_study(tiny_data, output, "--set", "learning-rate=1e-3"))
    assert "other settings" in str(e.value) and "--rerun" in str(e.value)


def test_a_finished_run_is_stale_when_a_value_changes_not_when_a_default_is_written_down():
    record = {"base": {"epochs": 2, "loss": "infonce"}, "settings": ["--seed", "0"]}
    assert study.same_setup(record, {"base": {"epochs": 2, "loss": "infonce", "compile": False},
                                     "settings": ["--seed", "0"]})
    assert not study.same_setup(record, {"base": {"epochs": 3, "loss": "infonce"}, "settings": ["--seed", "0"]})
    assert not study.same_setup(record, {"base": {"epochs": 2}, "settings": ["--seed", "0"]})
    assert not study.same_setup(record, {"base": record["base"], "settings": ["--seed", "1"]})


def test_study_argument_mistakes_are_one_line_errors(tmp_path):
    for argv, words in ((["--variants", "infonce-fixed,nope"], "unknown variant 'nope'"),
                        (["--seeds", "0,x"], "--seeds takes"),
                        (["--set", "epochs"], "--set takes KEY=VALUE"),
                        (["--budget-seconds", "0"], "--budget-seconds must be more than 0"),
                        (["--budget-seconds", "60", "--grace-seconds", "-1"], "--grace-seconds must be 0 or more")):
        with pytest.raises(SystemExit) as e:
            study.main([*argv, "--output", str(tmp_path / "s.json")])
        message = str(e.value)
        assert message.startswith("error: ") and words in message and "\n" not in message
    assert not os.listdir(tmp_path)  # nothing was written or run


# keys the negatives work adds to train.py (docs/pending/study.md): variants that use them are checked without them
# until that branch is merged, and in full after it
PLANNED_KEYS = {"queue-size", "queue-warmup", "queue-momentum", "hard-negative-weight", "hard-negative-margin"}


def test_study_configs_are_valid_and_every_variant_keeps_the_optimizer_steps():
    base_path = os.path.join(study.STUDY_DIR, "base.yaml")
    base = study.load_yaml(base_path)
    assert set(base) == set(train.SCHEMA.entries)  # the base documents every key, as the shipped configs do
    # steps per run = epochs x (training pairs // batch), on the data the study writes (3 captions per image)
    pairs = (study.TRAIN_IMAGES - base["select-images"]) * 3
    steps = {}
    for variant in study.variant_names():
        description, keys = study.read_variant(variant)
        assert description and keys
        with open(os.path.join(study.STUDY_DIR, variant + ".yaml"), encoding="utf-8") as f:
            assert all("#" in line for line in f if line.strip())  # every key has its comment
        pending = set(keys) - set(train.SCHEMA.entries)
        assert pending <= PLANNED_KEYS, f"{variant}: unknown keys {pending - PLANNED_KEYS}"
        known = {k: v for k, v in keys.items() if k not in pending}
        # the command line the study gives train.py, through train.py's own config loader
        cfg = load_config(train.SCHEMA, ["--config", base_path, *study.run_settings(known, [], 0)], "", "")
        assert all(cfg[k] == v for k, v in known.items())
        steps[variant] = cfg["epochs"] * (pairs // cfg["batch-size"])
    assert set(steps.values()) == {base["epochs"] * (pairs // base["batch-size"])} == {48}, steps
    assert study.variant_names()[0] == study.BASELINE
    # the equal-time variants are all there
    assert {"batch-256", "sigmoid", "hard-negatives", "queue-256", "queue-1024", "queue-256-momentum",
            "queue-1024-momentum"} <= set(study.variant_names())


def test_a_later_setting_replaces_an_earlier_key_instead_of_repeating_it():
    variant = {"batch-size": 256, "epochs": 8}
    assert study.run_settings(variant, ["epochs=3"], 0) == ["--batch-size=256", "--epochs=3", "--seed", "0"]
    assert study.run_settings(variant, ["loss=sigmoid"], 1, {"epochs": 100_000}) == \
        ["--batch-size=256", "--loss=sigmoid", "--epochs=100000", "--seed", "1"]


# ---------------------------------------------------------------- equal wall time

BUDGET, GRACE = 25.0, 20.0


def tiny_timed_study(data, output, budget=BUDGET):
    """The baseline, one seed, batches of 8 pairs on the tiny_data folders, for `budget` seconds; its epochs are
    left to the equal-time mode, which sets them so high that only the clock ends the run (budget None: equal
    steps, one epoch)."""
    sets = {"train-root": data / "train", "valid-root": data / "valid", "text-model": data / "text",
            "select-images": 4, "batch-size": 8, "warmup-steps": 1, "num-workers": 0}
    mode = ["--budget-seconds", str(budget), "--grace-seconds", str(GRACE)] if budget else ["--set", "epochs=1"]
    return ["--variants", "infonce-fixed", "--seeds", "3", "--output", str(output),
            *(a for k, v in sets.items() for a in ("--set", f"{k}={v}")), *mode]


def test_equal_time_runs_stop_at_the_budget_and_are_scored_from_what_they_saved(tiny_data, tmp_path, capsys):
    output = tmp_path / "study.json"
    argv = tiny_timed_study(tiny_data, output)
    (row,) = study.main(argv + ["--format", "markdown"])
    folder = tmp_path / "infonce-fixed-s3"
    record = json.loads((folder / study.RUN_FILE).read_text())
    written = json.loads(output.read_text())
    assert written["complete"] and written["scored"] == "last.pt" and written["budget_seconds"] == BUDGET
    # the clock stopped it: nothing else ends a run of 100000 epochs, and the stop came within the grace period
    assert "--epochs=100000" in record["argv"] and record["stopped"] in ("terminated", "killed")
    assert record["returncode"] != 0 and BUDGET <= record["seconds"] <= BUDGET + GRACE + 5

    # scored: eval.py's metrics of last.pt, which is what the row holds
    scored = json.loads((folder / study_time.SCORE_NAME).read_text())
    assert scored["written_by"] == "eval.py" and scored["checkpoint"] == str(folder / "last.pt")
    for name, direction, k in study.METRICS:
        assert row[name]["values"] == [scored[direction][k]]
    last = load_checkpoint(str(folder / "last.pt"))
    log = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    # 40 training pairs in 5 batches of 8 per epoch; killed between epochs, last.pt is the last finished one
    # (a clean stop on SIGTERM may save a part epoch more, never less). The log can lag last.pt by the epoch
    # whose line a kill cut off (engine/rundir.py writes last.pt first): so steps are read from last.pt
    assert row["steps"] == [last["step"]] and row["pairs"] == [8 * last["step"]]
    assert last["step"] >= 5 * len(log) >= 5 and last["epoch"] - log[-1]["epoch"] in (0, 1)
    assert 0 < row["saved_at"][0] <= record["seconds"]
    markdown = capsys.readouterr().out
    (line,) = [x for x in markdown.splitlines() if x.startswith("| infonce-fixed |")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[6:9] == [str(last["step"]), str(8 * last["step"]), record["stopped"]]

    # the same study again: the finished run is read back, not trained again
    stamp = (folder / "last.pt").stat().st_mtime_ns
    assert study.main(argv) == [row]
    assert "finished before" in capsys.readouterr().out and (folder / "last.pt").stat().st_mtime_ns == stamp
    # equal steps in the same folder: other settings, an error rather than a mix
    with pytest.raises(SystemExit) as e:
        study.main(tiny_timed_study(tiny_data, output, budget=None))
    assert "other settings" in str(e.value)


def test_a_budget_too_short_for_one_epoch_never_scores_an_older_last_pt(tiny_data, tmp_path):
    output = tmp_path / "study.json"
    folder = tmp_path / "infonce-fixed-s3"
    folder.mkdir()
    (folder / "last.pt").write_bytes(b"an earlier run's checkpoint")
    os.utime(folder / "last.pt", (1, 1))
    with pytest.raises(SystemExit) as e:
        study.main(tiny_timed_study(tiny_data, output, budget=1))  # train.py is still importing torch
    message = str(e.value)
    assert "saved no checkpoint within its time budget" in message and "--budget-seconds" in message
    assert "\n" not in message and not (folder / study_time.SCORE_NAME).exists()
    assert (folder / "last.pt").read_bytes() == b"an earlier run's checkpoint"


def test_a_run_that_ignores_sigterm_is_killed_with_its_whole_group(tmp_path):
    child = tmp_path / "child.pid"
    # a shell, not Python: it ignores SIGTERM within milliseconds of its start, however busy the machine is
    script = f"trap '' TERM; sleep 60 & echo $! > {child}; wait"
    result = study_time.run_for(["sh", "-c", script], str(tmp_path), str(tmp_path / "log"), 3, 1)
    assert result["stopped"] == "killed" and result["returncode"] == -signal.SIGKILL
    assert 4 <= result["seconds"] < 30, result
    pid = int(child.read_text())
    assert dies_within(pid, 10), f"the group's child {pid} still runs 10 s after the group was killed"


def dies_within(pid, seconds):
    """Whether process `pid` is gone, or a zombie where nothing reaps orphans (PID 1 of a container), within
    `seconds`. SIGKILL is delivered at once but acted on when the process next runs: on a busy machine the child
    can still read as running for a moment after killpg returns."""
    stat = f"/proc/{pid}/stat"
    deadline = time.monotonic() + seconds
    while True:
        try:
            with open(stat) as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def test_a_run_that_ends_before_its_budget_is_kept_when_it_succeeded_and_an_error_when_it_failed(tmp_path):
    ok = study_time.run_for([sys.executable, "-c", "print('done')"], str(tmp_path), str(tmp_path / "log"), 60, 1)
    assert (ok["stopped"], ok["returncode"]) == ("finished", 0) and ok["seconds"] < 60
    assert (tmp_path / "log").read_text() == "done\n"
    bad = study_time.run_for([sys.executable, "-c", "raise SystemExit(3)"], str(tmp_path), str(tmp_path / "log"),
                             60, 1)
    with pytest.raises(UserError, match=r"failed \(exit 3\) before its time budget: boom"):
        study_time.check_stop(bad, str(tmp_path), "boom")


def test_the_equal_time_table_shows_steps_pairs_and_their_spread():
    def run(seed, steps, r1):
        return {"variant": "queue-256", "seed": seed, "seconds": 90.0, "temperature": 0.07, "rsum": 1.0,
                "report": {name: r1 for name, *_ in study.METRICS}, "steps": steps, "pairs": 64 * steps,
                "saved_at": 88.0, "stopped": "terminated"}
    rows = study.summarise([run(0, 20, 0.5), run(1, 30, 0.7)])
    header, line = table_cells(rows)
    cells = dict(zip(header, line, strict=True))
    assert cells["I2T R@1"] == "0.600 (0.500-0.700)" and cells["steps"] == "25 (20-30)"
    assert cells["pairs"] == "1600 (1280-1920)" and cells["stopped"] == "terminated,terminated"
    assert cells["saved at s"] == "88" and cells["seeds"] == "0,1" and "best epoch" not in cells
