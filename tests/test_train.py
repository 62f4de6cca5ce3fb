import json
import os
import shutil

import pytest
import torch

import eval as eval_script
import train
from engine import epoch as epoch_module
from engine import loop
from engine.checkpoint import load_checkpoint
from tests.helpers import DEMO_EVAL_CONFIG, tiny_train_args


def test_training_writes_checkpoints_log_and_plot(trained):
    out, history = trained
    ckpt = load_checkpoint(str(out / "last.pt"))
    assert set(ckpt) >= {"model", "loss", "optimizer", "scheduler", "scaler", "epoch", "step", "rng", "config",
                         "best_rsum", "best_epoch", "select_files", "log_line"}
    # 4 of the 24 training images (with both their captions) are held out for selection and never trained on
    held = ckpt["select_files"]
    assert len(held) == 4 and held == sorted(held)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 2 * (40 // 8)
    assert os.path.isabs(ckpt["config"]["text-model"]) and ckpt["config"]["text-model"].endswith("text")
    lines = [json.loads(s) for s in open(out / "metrics.jsonl")]
    assert [r["epoch"] for r in lines] == [0, 1]
    assert all(r["train"]["steps"] == 5 and r["train"]["samples"] == 40 for r in lines)
    assert all(r["select"]["num_images"] == 4 and r["select"]["num_captions"] == 8 for r in lines)
    assert lines[1]["train"]["loss"] < lines[0]["train"]["loss"]  # seeded, so the same every run
    best = load_checkpoint(str(out / "best.pt"))
    assert best["metrics"]["rsum"] == max(r["select"]["rsum"] for r in lines)
    assert best["epoch"] == ckpt["best_epoch"] == max(lines, key=lambda r: r["select"]["rsum"])["epoch"]
    report = json.loads((out / "report.json").read_text())
    assert report["epoch"] == best["epoch"] and report["num_images"] == 12  # best.pt on valid-root
    assert history["report"]["rsum"] == report["rsum"]
    assert (out / "curves.png").stat().st_size > 1000
    assert not [p for p in os.listdir(out) if ".partial" in p]  # atomic writes leave nothing behind


def test_selection_images_are_never_trained_on(tiny_data, monkeypatch, tmp_path):
    seen = []
    real = train.PairDataset.__getitem__
    monkeypatch.setattr(train.PairDataset, "__getitem__", lambda self, i: seen.append(self.pairs[i][0]) or
                        real(self, i))
    train.main(tiny_train_args(tiny_data, tmp_path, "--epochs", "1"))
    held = set(load_checkpoint(str(tmp_path / "last.pt"))["select_files"])
    assert len(seen) == 40 and not held & set(seen)


def test_eval_script_reproduces_the_report(trained, tiny_data):
    out, _ = trained
    json_path = out / "eval.json"
    metrics = eval_script.main(["--config", DEMO_EVAL_CONFIG, "--model-path", str(out / "best.pt"),
                                "--valid-root", str(tiny_data / "valid"), "--num-workers", "0",
                                "--device", "cpu", "--output", str(json_path)])
    report = json.loads((out / "report.json").read_text())
    written = json.loads(json_path.read_text())
    for direction in ("image_to_text", "text_to_image"):
        for k in ("R@1", "R@5", "R@10", "median_rank", "mean_rank"):
            assert written[direction][k] == pytest.approx(report[direction][k], abs=1e-9)
    assert written["num_images"] == 12 and written["num_captions"] == 12
    assert metrics["rsum"] == pytest.approx(report["rsum"]) and "one_caption_per_image" not in written


def test_eval_prints_both_protocols_from_one_encoding_pass(trained, tiny_data, capsys, monkeypatch):
    out, _ = trained
    from dataset import choose_captions, read_captions
    from engine import evaluation
    calls = []
    real = evaluation.encode_image_files
    monkeypatch.setattr(evaluation, "encode_image_files", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    metrics = eval_script.main(["--config", DEMO_EVAL_CONFIG, "--model-path", str(out / "best.pt"),
                                "--valid-root", str(tiny_data / "train"), "--num-workers", "0",
                                "--output", str(out / "both.json")])
    assert calls == [24]  # each image encoded once for both tables
    assert metrics["num_captions"] == 48 and metrics["one_caption_per_image"]["num_captions"] == 24
    text = capsys.readouterr().out
    assert "all captions (2.00 captions per image)" in text and "one caption per image" in text
    # the kept caption of each image is the one prepare_data --captions-per-image 1 keeps
    pairs = read_captions(str(tiny_data / "train"))
    by_image = {}
    for name, caption in pairs:
        by_image.setdefault(name, []).append(caption)
    from types import SimpleNamespace
    rows = evaluation.one_caption_rows(SimpleNamespace(pairs=pairs))
    assert [pairs[r][1] for r in rows] == [choose_captions(n, c, 1, 0)[0] for n, c in sorted(by_image.items())]


def test_resume_continues_exactly_where_it_stopped(tiny_data, tmp_path, monkeypatch):
    # augmentation on: the random crops and the batched colour jitter must replay exactly after a resume too;
    # batches of 20 pairs: two steps an epoch are enough for a stop and resume at an epoch's end
    run = ("--epochs", "3", "--use-augment", "true", "--batch-size", "20")
    straight = tmp_path / "straight"
    train.main(tiny_train_args(tiny_data, straight, *run))

    # Same run, killed during the validation of its last epoch (after epoch 1 was saved) ...
    interrupted = tmp_path / "interrupted"
    real_evaluate, calls = loop.evaluate, []

    def dying_evaluate(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(loop, "evaluate", dying_evaluate)
    with pytest.raises(SystemExit) as stopped:  # Ctrl-C: one line and the shell's status 130
        train.main(tiny_train_args(tiny_data, interrupted, *run))
    assert stopped.value.code == 130
    monkeypatch.setattr(loop, "evaluate", real_evaluate)
    assert load_checkpoint(str(interrupted / "last.pt"))["epoch"] == 1
    # ... then resumed: the weights must equal those of the uninterrupted run.
    train.main(tiny_train_args(tiny_data, interrupted, *run, "--load-checkpoint", "true",
                               "--load-path", str(interrupted / "last.pt")))
    a = load_checkpoint(str(straight / "last.pt"))
    b = load_checkpoint(str(interrupted / "last.pt"))
    assert b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [json.loads(s)["epoch"] for s in open(interrupted / "metrics.jsonl")] == [0, 1, 2]


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(trained, tiny_data, tmp_path, monkeypatch):
    out, _ = trained
    run = tmp_path / "nan"
    run.mkdir()
    shutil.copy(out / "last.pt", run / "last.pt")
    before = (run / "last.pt").read_bytes()

    def nan_step(*a, **k):
        result = real_step(*a, **k)
        result["loss"] = result["loss"] * float("nan")
        return result

    real_step = epoch_module.plain_step
    monkeypatch.setattr(epoch_module, "plain_step", nan_step)
    with pytest.raises(SystemExit, match="loss became nan at epoch 2, step 0.*last good checkpoint is kept"):
        train.main(tiny_train_args(tiny_data, run, "--epochs", "4", "--load-checkpoint", "true",
                                   "--load-path", str(run / "last.pt")))
    assert (run / "last.pt").read_bytes() == before


def test_corrupt_validation_image_stops_eval_with_its_name(trained, tiny_data, tmp_path):
    out, _ = trained
    valid = tmp_path / "valid"
    shutil.copytree(tiny_data / "valid", valid)
    bad = sorted(os.listdir(valid / "images"))[3]
    (valid / "images" / bad).write_bytes(b"\xff\xd8\xff broken")
    with pytest.raises(SystemExit, match=f"cannot decode image .*{bad}"):
        eval_script.main(["--config", DEMO_EVAL_CONFIG, "--model-path", str(out / "best.pt"),
                          "--valid-root", str(valid), "--num-workers", "0", "--output", str(tmp_path / "e.json")])


def test_missing_checkpoint_and_batch_too_big_are_clear(tiny_data, tmp_path):
    with pytest.raises(SystemExit, match="checkpoint '.*none.pt' does not exist"):
        eval_script.main(["--config", DEMO_EVAL_CONFIG, "--model-path", str(tmp_path / "none.pt"),
                          "--output", str(tmp_path / "eval.json")])
    with pytest.raises(SystemExit, match=r"has 40 training pairs after holding out 4 images for selection, "
                                         r"fewer than one batch \(64\)"):
        train.main(tiny_train_args(tiny_data, tmp_path, "--batch-size", "64"))


def canned_metrics(rsum):
    side = {"R@1": rsum / 6, "R@5": rsum / 6, "R@10": rsum / 6, "median_rank": 1.0, "mean_rank": 1.0}
    return {"image_to_text": side, "text_to_image": side, "rsum": rsum, "num_images": 4, "num_captions": 8,
            "protocol": "canned"}


def test_patience_stops_after_epochs_without_a_better_selection_score(tiny_data, tmp_path, monkeypatch):
    scores = iter([1.0, 2.0, 1.5, 1.4, 1.3, 1.2])
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: canned_metrics(next(scores)))
    # one batch of all 40 pairs an epoch: the scores are canned, so what is trained does not matter here
    history = train.main(tiny_train_args(tiny_data, tmp_path, "--epochs", "5", "--patience", "2", "--batch-size",
                                         "40"))
    lines = [json.loads(s) for s in open(tmp_path / "metrics.jsonl")]
    assert [r["epoch"] for r in lines] == [0, 1, 2, 3]  # best at epoch 1, two epochs without better: stop
    assert load_checkpoint(str(tmp_path / "best.pt"))["epoch"] == 1
    assert history["report"]["epoch"] == 1


def test_holding_out_every_image_is_refused(tiny_data, tmp_path):
    with pytest.raises(SystemExit, match="select-images 24 would hold out all 24 images"):
        train.main(tiny_train_args(tiny_data, tmp_path, "--select-images", "24"))


def test_the_skip_warning_counts_bad_files_once_and_says_how_often_they_were_met(tiny_data, tmp_path, capsys):
    """Each training image has 2 caption rows: a bad file is met by both, and a row whose file fails goes on to
    the next row, which may hold the same file. The warning counts 2 files, and says how many skips there were."""
    from dataset import hold_out, read_captions
    root = tmp_path / "data"
    shutil.copytree(tiny_data / "train", root)
    pairs = read_captions(str(root))
    held = set(hold_out(sorted({n for n, _ in pairs}), 4, 0))  # as train.py holds out select-images 4, seed 0
    rows = [n for n, _ in pairs if n not in held]  # the training rows, in the dataset's order
    bad = sorted(set(rows))[:2]
    for name in bad:
        (root / "images" / name).write_bytes(b"not an image")
    # every row is trained on once (40 rows, 5 batches of 8): the skips of row i are the bad rows from i on
    skips = sum(next(k for k in range(len(rows)) if rows[(i + k) % len(rows)] not in bad) for i in range(len(rows)))
    assert skips > 2 * len(bad) - 1  # more skips than files: what the old warning counted
    train.main(tiny_train_args(tiny_data, tmp_path / "run", "--epochs", "1", "--train-root", str(root)))
    (entry,) = [json.loads(s) for s in open(tmp_path / "run" / "metrics.jsonl")]
    assert entry["train"]["skipped_files"] == 2 and entry["train"]["skipped_images"] == skips
    assert f"warning: 2 image file(s) failed to decode this epoch and were skipped ({skips} skips: one per caption " \
           "row that met a bad file)" in capsys.readouterr().out
