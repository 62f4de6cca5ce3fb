"""tools/runs.py over real tiny training runs: two finished, one stopped early by patience, one interrupted (a
finished run's folder without its report, its log torn mid-line), one running (its lock held), a run from an
older version and a folder that is not a run."""
import csv
import fcntl
import io
import json
import os
import shutil

import pytest

import train
from engine import rundir
from tests.helpers import tiny_train_args
from tools import runs


@pytest.fixture(scope="module")
def folders(tiny_data, trained, tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    shutil.copytree(trained[0], base / "a")  # a run with tiny_train_args' defaults, as test_train reads it
    train.main(tiny_train_args(tiny_data, base / "b", "--learning-rate", "1e-3"))
    # nothing can improve at a vanishing rate with BatchNorm frozen: patience 1 stops after epoch 1 of 3
    train.main(tiny_train_args(tiny_data, base / "stopped", "--epochs", "3", "--patience", "1", "--freeze-bn", "true",
                               "--learning-rate", "1e-30", "--weight-decay", "0.0"))
    shutil.copytree(base / "a", base / "interrupted")
    (base / "interrupted" / "report.json").unlink()
    with open(base / "interrupted" / rundir.LOG_NAME, "a", encoding="utf-8") as f:
        f.write('{"epoch": 2, "train": {"lo')  # a kill in the middle of an append
    shutil.copytree(base / "a", base / "running")
    old = base / "old"  # an older version's log: no speeds, no best flags, no checkpoint beside it
    old.mkdir()
    (old / rundir.LOG_NAME).write_text('{"epoch": 0, "train": {"loss": 1.0}}\n', encoding="utf-8")
    (base / "notes").mkdir()
    (base / "notes" / "README.md").write_text("not a run\n", encoding="utf-8")
    return base


def log_of(folder):
    return rundir.read_log(str(folder / rundir.LOG_NAME))


def report_of(folder):
    return json.loads((folder / "report.json").read_text(encoding="utf-8"))


def test_the_table_reads_every_kind_of_folder(folders, capsys):
    names = ["a", "b", "stopped", "interrupted", "running", "old", "notes", "absent"]
    lock = os.open(folders / "running" / rundir.LOCK_NAME, os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as train.py holds it while it runs
    try:
        rows = runs.main([str(folders / n) for n in names] + ["--format", "json"])
    finally:
        os.close(lock)
    by = {os.path.basename(r["run"]): r for r in rows}
    assert [by[n]["status"] for n in names] == ["finished", "finished", "stopped early", "interrupted", "running",
                                                "interrupted", "not a run", "not a run"]
    for name in ("a", "b"):
        log, report = log_of(folders / name), report_of(folders / name)
        best = [e for e in log if e["best"]][-1]
        assert (by[name]["epochs"], by[name]["planned"], by[name]["missing"]) == (2, 2, [])
        assert (by[name]["best_epoch"], by[name]["select_rsum"]) == (best["epoch"], best["select"]["rsum"])
        assert by[name]["report_i2t_R@1"] == report["image_to_text"]["R@1"]
        assert by[name]["report_t2i_R@1"] == report["text_to_image"]["R@1"]
        assert by[name]["pairs_per_s"] == pytest.approx(sum(e["train"]["samples_per_s"] for e in log) / 2)
        assert by[name]["seconds"] == pytest.approx(sum(e["train"]["samples"] / e["train"]["samples_per_s"]
                                                        for e in log))
    stopped = by["stopped"]
    assert (stopped["epochs"], stopped["planned"], stopped["best_epoch"]) == (2, 3, 0)
    assert "1 unreadable line(s) of metrics.jsonl" in by["interrupted"]["missing"] and \
        "report.json" in by["interrupted"]["missing"] and by["interrupted"]["epochs"] == 2
    assert {"last.pt", "best.pt", "report.json", "config", "best epoch in the log", "speed in the log"} <= \
        set(by["old"]["missing"]) and by["old"]["epochs"] == 1
    assert by["notes"]["missing"] == ["metrics.jsonl", "last.pt", "report.json"]
    assert by["absent"]["missing"] == ["not a folder"]
    # printed: the config keys that differ between the runs, never the paths that name each run's own files
    printed = {os.path.basename(r["run"]): r for r in json.loads(capsys.readouterr().out)}
    assert printed.keys() == by.keys() and printed["a"]["select_rsum"] == by["a"]["select_rsum"]
    assert set(printed["a"]["config"]) == {"learning-rate", "epochs", "patience", "freeze-bn", "weight-decay"}
    assert (printed["a"]["config"]["learning-rate"], printed["b"]["config"]["learning-rate"]) == (2e-3, 1e-3)
    assert printed["old"]["config"] == {k: None for k in printed["a"]["config"]}


def test_table_csv_and_markdown_hold_the_same_cells(folders, capsys):
    argv = [str(folders / n) for n in ("a", "b", "notes")]
    runs.main(argv + ["--format", "csv"])
    table = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    header = table[0]
    assert header[:3] == ["run", "status", "learning-rate"] and len(table) == 4
    assert [row[1] for row in table[1:]] == ["finished", "finished", "not a run"]
    assert [row[2] for row in table[1:]] == ["0.002000", "0.001000", "-"]
    rsum = header.index("select rsum")
    best = [e for e in log_of(folders / "a") if e["best"]][-1]
    assert table[1][rsum] == f"{best['select']['rsum']:.3f}" and table[3][rsum] == "-"
    runs.main(argv + ["--format", "markdown"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "|" + "---|" * len(header) and len(lines) == 5
    assert [c.strip() for c in lines[2].strip("|").split("|")] == table[1]
    runs.main(argv)
    text = capsys.readouterr().out.splitlines()
    assert text[0].split()[:3] == ["run", "status", "learning-rate"] and text[3].split()[1:4] == ["not", "a", "run"]


def test_an_equal_time_run_is_read_with_the_score_of_its_last_pt(folders, tmp_path):
    """bench.study --budget-seconds stops a run on the clock and scores its last.pt into scored.json: the table
    says so and shows that score, where a plain run without report.json would be "interrupted"."""
    timed = tmp_path / "timed"
    shutil.copytree(folders / "a", timed)
    (timed / "report.json").unlink()
    scored = {"image_to_text": {"R@1": 0.125}, "text_to_image": {"R@1": 0.375}, "rsum": 1.0,
              "written_by": "eval.py"}
    (timed / runs.STUDY_SCORE).write_text(json.dumps(scored), encoding="utf-8")
    record = {"seconds": 90.5, "stopped": "terminated", "returncode": -15}
    (timed / runs.STUDY_RECORD).write_text(json.dumps(record), encoding="utf-8")
    row = runs.read_run(str(timed))
    assert (row["status"], row["report_i2t_R@1"], row["report_t2i_R@1"]) == ("time budget", 0.125, 0.375)
    assert row["seconds"] == 90.5 and row["missing"] == [] and row["epochs"] == 2
    # the same folder without the study's clock record is an interrupted run, its eval scores not taken as a report
    (timed / runs.STUDY_RECORD).unlink()
    row = runs.read_run(str(timed))
    assert (row["status"], row["report_i2t_R@1"]) == ("interrupted", None) and "report.json" in row["missing"]
