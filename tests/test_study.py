"""bench/study.py on a microscopic setting: its table holds the run's own report.json numbers, a finished run is
skipped on the next call, and mistakes are one-line errors."""
import json
import os

import pytest

import train
from bench import study
from engine.config import load_config


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
                        (["--set", "epochs"], "--set takes KEY=VALUE")):
        with pytest.raises(SystemExit) as e:
            study.main([*argv, "--output", str(tmp_path / "s.json")])
        message = str(e.value)
        assert message.startswith("error: ") and words in message and "\n" not in message
    assert not os.listdir(tmp_path)  # nothing was written or run


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
        # the command line the study gives train.py, through train.py's own config loader
        cfg = load_config(train.SCHEMA, ["--config", base_path, *study.run_settings(keys, [], 0)], "", "")
        assert all(cfg[k] == v for k, v in keys.items())
        steps[variant] = cfg["epochs"] * (pairs // cfg["batch-size"])
    assert set(steps.values()) == {base["epochs"] * (pairs // base["batch-size"])} == {48}, steps
    assert study.variant_names()[0] == study.BASELINE
