"""A run's files are safe from the next run: resuming checks that the checkpoint fits, --overwrite replaces
nothing until the new run has an epoch to put in its place, two runs never write the same files at once, and
output paths that cannot work are one-line errors before anything is read."""
import json
import multiprocessing
import os
import shutil
import time
import warnings

import pytest
import torch

import train
from engine import loop, rundir
from engine.checkpoint import load_checkpoint
from engine.config import ConfigError
from tests.helpers import one_line_exit, tiny_train_args
from tools import demo

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "report.json", "curves.png")


def snapshot(folder):
    return {name: (folder / name).read_bytes() for name in RUN_FILES}


@pytest.fixture(scope="module")
def finished(tiny_data, tmp_path_factory):
    """A one-epoch run with all five of its files."""
    out = tmp_path_factory.mktemp("finished")
    train.main(tiny_train_args(tiny_data, out, "--epochs", "1"))
    return out


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run that a test may resume, overwrite or break."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def resume_args(tiny_data, out, *extra):
    return tiny_train_args(tiny_data, out, "--epochs", "2", "--load-checkpoint", "true",
                           "--load-path", str(out / "last.pt"), *extra)


# ---------------------------------------------------------------------- resuming: the checkpoint must fit
def test_resuming_with_a_text_model_of_another_vocabulary_is_refused(tiny_data, run, tmp_path):
    other = tmp_path / "other-text"  # as many tokens as the run's own model (389), but other ones
    captions = [c.upper() for _, c in train.read_captions(str(tiny_data / "train"))]
    demo.write_text_model(str(other), captions, hidden=32, layers=1)
    before = snapshot(run)
    with pytest.raises(SystemExit) as e:
        train.main(resume_args(tiny_data, run, "--text-model", str(other)))
    message = one_line_exit(e)
    assert "text-model" in message and str(other) in message and str(tiny_data / "text") in message
    assert snapshot(run) == before  # nothing trained, nothing written


@pytest.mark.parametrize("key, value, stored", [
    ("image-model", "resnet34", "resnet18"),
    ("text-pooling", "first", "mean"),
    ("learnable-temperature", "true", "false"),
    ("temperature", "0.05", "0.07"),
    ("freeze-text", "true", "false"),
])
def test_resuming_with_another_model_is_a_one_line_error_naming_the_key(tiny_data, run, key, value, stored):
    before = snapshot(run)
    with pytest.raises(SystemExit) as e:
        train.main(resume_args(tiny_data, run, f"--{key}", value))
    message = one_line_exit(e)
    assert f"{key} {stored}" in message and f"{key} {value}" in message and f"--{key} {stored}" in message
    assert snapshot(run) == before


def test_a_moved_text_model_and_other_optimisation_keys_resume_with_a_note(tiny_data, run, tmp_path, capsys):
    moved = tmp_path / "moved-text"
    shutil.copytree(tiny_data / "text", moved)
    old_rate = load_checkpoint(str(run / "last.pt"))["optimizer"]["param_groups"][0]["initial_lr"]
    capsys.readouterr()
    train.main(resume_args(tiny_data, run, "--text-model", str(moved), "--batch-size", "4",
                           "--learning-rate", "0.5"))
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "batch-size 4 (was 8)" in line]
    assert len(notes) == 1 and "learning-rate 0.5 (was 0.002; the checkpoint's optimizer keeps its own)" in notes[0]
    ckpt = load_checkpoint(str(run / "last.pt"))
    assert ckpt["epoch"] == 1 and ckpt["log_line"]["train"]["steps"] == 40 // 4
    assert ckpt["optimizer"]["param_groups"][0]["initial_lr"] == old_rate  # as the note says


def test_resuming_with_nothing_left_to_train_says_so_and_writes_the_report(tiny_data, run, capsys):
    report = json.loads((run / "report.json").read_text())
    (run / "report.json").unlink()  # as a run killed while scoring best.pt at its end leaves it
    before = {name: (run / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.jsonl")}
    capsys.readouterr()
    history = train.main(tiny_train_args(tiny_data, run, "--epochs", "1", "--load-checkpoint", "true",
                                         "--load-path", str(run / "last.pt")))
    out = capsys.readouterr().out
    assert "has trained 1 epoch(s) and epochs is 1: nothing left to train" in out
    assert "epoch 1:" not in out
    assert {name: (run / name).read_bytes() for name in before} == before
    assert json.loads((run / "report.json").read_text())["rsum"] == report["rsum"]
    assert history["epoch"] == 0 and history["report"]["rsum"] == report["rsum"]


def test_nothing_left_to_train_without_a_best_pt_skips_the_report_with_a_note(tiny_data, run, tmp_path, capsys):
    moved = tmp_path / "moved"
    moved.mkdir()
    ckpt = load_checkpoint(str(run / "last.pt"))
    ckpt["best_epoch"] = None  # its best came from another epoch, and stayed behind with the old run's files
    torch.save(ckpt, moved / "last.pt")
    history = train.main(tiny_train_args(tiny_data, moved, "--epochs", "1", "--load-checkpoint", "true",
                                         "--load-path", str(moved / "last.pt")))
    assert f"no {moved / 'best.pt'} in this run's files; the report on valid-root is skipped" in capsys.readouterr().out
    assert history["report"] is None and not (moved / "report.json").exists()


def test_resuming_one_run_into_the_files_of_another_is_refused(tiny_data, run, finished, tmp_path):
    before = snapshot(run)
    with pytest.raises(SystemExit) as e:  # resume `finished` but write into `run`, whose files are another run's
        train.main(tiny_train_args(tiny_data, run, "--epochs", "2", "--load-checkpoint", "true",
                                   "--load-path", str(finished / "last.pt")))
    assert f"this run resumes from {finished / 'last.pt'}, not from them" in one_line_exit(e)
    assert snapshot(run) == before


# ---------------------------------------------------------------------- --overwrite: the old run stays until replaced
def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(tiny_data, run, tmp_path):
    before = snapshot(run)
    with pytest.raises(SystemExit) as e:
        train.main(tiny_train_args(tiny_data, run, "--overwrite", "true", "--train-root", str(tmp_path / "none")))
    assert "captions.csv not found" in one_line_exit(e)
    assert snapshot(run) == before


def test_overwrite_keeps_the_old_run_when_the_new_one_stops_in_its_first_epoch(tiny_data, run, monkeypatch):
    before = snapshot(run)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_one_epoch", interrupted)
    with pytest.raises(SystemExit) as e:
        train.main(tiny_train_args(tiny_data, run, "--overwrite", "true", "--seed", "3"))
    assert e.value.code == 130 and snapshot(run) == before


def test_overwrite_replaces_every_file_of_the_old_run(tiny_data, run, monkeypatch):
    (run / "metrics.jsonl").write_text('{"epoch": 0}\n{"epoch": 1}\n{"epoch": 2}\n')
    (run / "curves.png").write_bytes(b"old")
    monkeypatch.setattr(loop, "plot_curves", lambda log, out: out)  # the new run draws no curves
    train.main(tiny_train_args(tiny_data, run, "--epochs", "1", "--overwrite", "true", "--seed", "3"))
    assert [e["epoch"] for e in rundir.read_log(str(run / "metrics.jsonl"))] == [0]
    assert not (run / "curves.png").exists()  # the old run's curves are gone with it
    assert load_checkpoint(str(run / "best.pt"))["config"]["seed"] == 3


def test_a_lone_report_of_another_run_is_refused_too(tiny_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        train.main(tiny_train_args(tiny_data, out))
    assert f"{out / 'report.json'} already exists from another run" in one_line_exit(e)
    assert (out / "report.json").read_text() == "{}"


# ---------------------------------------------------------------------- one run at a time on the same files
def hold_lock(last, holding):
    """A training run's lock on the files of `last`, held until this process is killed."""
    with rundir.locked({"last-path": last}):
        holding.set()
        time.sleep(600)


def test_a_second_run_on_the_same_files_fails_at_once_naming_the_first(tiny_data, tmp_path, monkeypatch):
    last = str(tmp_path / "last.pt")
    # a process of its own, forked from this one, which has imported torch already (a fresh Python takes seconds)
    fork = multiprocessing.get_context("fork")
    holding = fork.Event()
    holder = fork.Process(target=hold_lock, args=(last, holding))
    holder.start()
    try:
        assert holding.wait(timeout=120)
        with pytest.raises(SystemExit) as e:
            train.main(tiny_train_args(tiny_data, tmp_path, "--epochs", "1"))
        assert f"another training run (pid {holder.pid}) is writing to {tmp_path}" in one_line_exit(e)
        assert not (tmp_path / "last.pt").exists()
    finally:
        holder.kill()  # SIGKILL, as a crashed run is killed: its lock must not block the next
        holder.join()

    # the next run starts, and holds the lock itself while it trains (taking it again from its epoch is refused,
    # naming this process), and releases it when it ends
    real, tries = loop.train_one_epoch, []

    def train_one_epoch(*a, **k):
        with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
            with rundir.locked({"last-path": last}):
                pass
        tries.append(1)
        return real(*a, **k)

    monkeypatch.setattr(loop, "train_one_epoch", train_one_epoch)
    train.main(tiny_train_args(tiny_data, tmp_path, "--epochs", "1"))
    assert tries == [1]
    assert [e["epoch"] for e in rundir.read_log(str(tmp_path / "metrics.jsonl"))] == [0]
    with rundir.locked({"last-path": last}):  # released when the run ended
        pass


# ---------------------------------------------------------------------- output paths that cannot work
def test_last_path_equal_to_best_path_is_refused(tiny_data, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(tiny_train_args(tiny_data, tmp_path / "new", "--best-path", str(tmp_path / "new" / "last.pt")))
    assert "last-path and best-path are the same file" in one_line_exit(e)
    assert not (tmp_path / "new").exists()  # a refused run creates nothing, not even its folder or lock


@pytest.mark.parametrize("folder", ["last.pt", "best.pt", "metrics.jsonl"])
@pytest.mark.parametrize("overwrite", ["false", "true"])
def test_an_output_path_that_is_a_folder_is_refused(tiny_data, tmp_path, folder, overwrite):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        train.main(tiny_train_args(tiny_data, tmp_path, "--overwrite", overwrite))
    assert f"{tmp_path / folder} is a folder" in one_line_exit(e)
    assert (tmp_path / folder / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------------- data warnings: once each
def test_a_data_warning_about_train_root_is_given_once(tiny_data, tmp_path):
    data = tmp_path / "train"
    shutil.copytree(tiny_data / "train", data)
    with open(data / "captions.csv", encoding="utf-8") as f:
        second_row = f.read().splitlines()[1]
    with open(data / "captions.csv", "a", encoding="utf-8") as f:
        f.write(second_row + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.main(tiny_train_args(tiny_data, tmp_path / "run", "--train-root", str(data)))
    dropped = [w for w in caught if "exact duplicate row" in str(w.message)]
    assert len(dropped) == 1 and "dropped 1 exact duplicate row" in str(dropped[0].message)
    # the selection split is scored from the rows read once: still 4 images, 8 captions
    log = rundir.read_log(str(tmp_path / "run" / "metrics.jsonl"))
    assert [e["select"]["num_captions"] for e in log] == [8, 8]


def test_a_stored_selection_split_spelled_otherwise_still_holds_its_images_out(tiny_data, run):
    ckpt = load_checkpoint(str(run / "last.pt"))
    held_out = ckpt["select_files"]
    assert len(held_out) == 4
    ckpt["select_files"] = ["./" + name for name in held_out]  # as a checkpoint stored names before normalising
    torch.save(ckpt, run / "last.pt")
    train.main(resume_args(tiny_data, run))
    resumed = load_checkpoint(str(run / "last.pt"))
    assert resumed["epoch"] == 1 and resumed["select_files"] == held_out
    assert resumed["log_line"]["select"]["num_images"] == 4  # scored on the held-out images ...
    assert resumed["log_line"]["train"]["steps"] == (48 - 4 * 2) // 8  # ... and none of their 8 pairs trained on
