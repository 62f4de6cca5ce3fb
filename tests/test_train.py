import json
import os
import shutil

import pytest
import torch

import eval as eval_script
import train
from engine import epoch as epoch_module
from engine.checkpoint import load_checkpoint
from tests.helpers import DEMO_EVAL_CONFIG, tiny_train_args


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    history = train.main(tiny_train_args(tiny_data, out))
    return out, history


def test_training_writes_checkpoints_log_and_plot(trained):
    out, history = trained
    ckpt = load_checkpoint(str(out / "last.pt"))
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "scaler", "epoch", "step", "rng", "config",
                         "best_rsum"}
    assert ckpt["epoch"] == 1 and ckpt["step"] == 2 * (48 // 8)
    assert ckpt["config"]["image-size"] == 32 and ckpt["config"]["text-model"].endswith("text")
    lines = [json.loads(s) for s in open(out / "metrics.jsonl")]
    assert [r["epoch"] for r in lines] == [0, 1]
    assert all(r["train"]["steps"] == 6 and r["train"]["samples"] == 48 for r in lines)
    assert lines[1]["train"]["loss"] < lines[0]["train"]["loss"] + 1.0  # finite and not exploding
    best = load_checkpoint(str(out / "best.pt"))
    assert best["metrics"]["rsum"] == max(r["valid"]["rsum"] for r in lines)
    assert (out / "curves.png").stat().st_size > 1000
    assert not [p for p in os.listdir(out) if ".tmp" in p]  # atomic writes leave nothing behind


def test_eval_script_reproduces_train_time_validation(trained, tiny_data):
    out, _ = trained
    json_path = out / "eval.json"
    metrics = eval_script.main(["--config", DEMO_EVAL_CONFIG, "--model-path", str(out / "best.pt"),
                                "--valid-root", str(tiny_data / "valid"), "--num-workers", "0",
                                "--device", "cpu", "--output", str(json_path)])
    stored = load_checkpoint(str(out / "best.pt"))["metrics"]
    written = json.loads(json_path.read_text())
    for direction in ("image_to_text", "text_to_image"):
        assert set(written[direction]) >= {"R@1", "R@5", "R@10"}
        for k in ("R@1", "R@5", "R@10"):
            assert written[direction][k] == pytest.approx(stored[direction][k], abs=1e-9)
            assert 0.0 <= written[direction][k] <= 1.0
    assert written["num_images"] == 12 and written["num_captions"] == 12
    assert metrics["rsum"] == pytest.approx(stored["rsum"])


def test_resume_continues_exactly_where_it_stopped(tiny_data, tmp_path, monkeypatch):
    # augmentation on: the random crops and the batched colour jitter must replay exactly after a resume too
    straight = tmp_path / "straight"
    train.main(tiny_train_args(tiny_data, straight, "--epochs", "3", "--use-augment", "true"))

    # Same run, killed during the validation of its last epoch (after epoch 1 was saved) ...
    interrupted = tmp_path / "interrupted"
    real_evaluate, calls = train.evaluate, []

    def dying_evaluate(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(train, "evaluate", dying_evaluate)
    with pytest.raises(KeyboardInterrupt):
        train.main(tiny_train_args(tiny_data, interrupted, "--epochs", "3", "--use-augment", "true"))
    monkeypatch.setattr(train, "evaluate", real_evaluate)
    assert load_checkpoint(str(interrupted / "last.pt"))["epoch"] == 1
    # ... then resumed: the weights must equal those of the uninterrupted run.
    train.main(tiny_train_args(tiny_data, interrupted, "--epochs", "3", "--use-augment", "true",
                               "--load-checkpoint", "true",
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
        eval_script.main(["--config", DEMO_EVAL_CONFIG, "--model-path", str(tmp_path / "none.pt")])
    with pytest.raises(SystemExit, match="has 48 pairs, fewer than one batch \\(64\\)"):
        train.main(tiny_train_args(tiny_data, tmp_path, "--batch-size", "64"))
