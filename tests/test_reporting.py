"""engine/reporting.py: the event files read back with TensorBoard's own reader, across a resume after kill -9;
W&B in offline mode read back from the file it writes; the one-line error without the package."""
import glob
import json
import multiprocessing
import os
import signal
import struct
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from engine import rundir
from engine.checkpoint import load_checkpoint
from engine.config import ConfigError
from engine.optim import param_groups
from engine.reporting import Reporter, parse_targets, recall_scalars, report_to_rule, step_scalars
from loss import make_loss
from tests.helpers import tiny_batch, tiny_model

STEPS_PER_EPOCH, EPOCHS, EVERY = 5, 3, 2
KILLED = 1000.0  # added to everything the killed run logs, so its orphaned points can be told apart


def metrics(epoch, offset):
    """An evaluation dict in engine.metrics' format whose numbers depend on the epoch."""
    r = {"R@1": 0.1 * epoch, "R@5": 0.2 * epoch, "R@10": 0.3 * epoch, "median_rank": 10.0 - epoch}
    return {"image_to_text": r, "text_to_image": dict(r), "rsum": 1.2 * epoch + offset}


def simulate(folder, offset=0.0, kill_at=None):
    """The training loop as train.py runs it with a reporter: steps, then per epoch the reporter's epoch call
    and rundir.save_epoch. Resumes from last.pt when there is one. `kill_at` is ("step", global step) or
    ("before-save", epoch): the process kills itself with SIGKILL there."""
    cfg = {"last-path": os.path.join(folder, "last.pt"), "best-path": os.path.join(folder, "best.pt"),
           "load-path": os.path.join(folder, "last.pt"), "seed": 0}
    start_epoch = start_step = 0
    if os.path.isfile(cfg["last-path"]):
        ckpt = load_checkpoint(cfg["last-path"])  # written by this test a moment ago
        start_epoch, start_step = ckpt["epoch"] + 1, ckpt["step"]
        rundir.repair(cfg, ckpt)
    reporter = Reporter(["tensorboard"], folder, every=EVERY, start_step=start_step)
    if not start_step:
        reporter.config(cfg)
    step = start_step
    for epoch in range(start_epoch, EPOCHS):
        for _ in range(STEPS_PER_EPOCH):
            step += 1
            if reporter.due(step):
                reporter.step(step, {"train/loss": 1.0 / step + offset})
            if kill_at == ("step", step):
                os.kill(os.getpid(), signal.SIGKILL)
        selection = metrics(epoch, offset)
        reporter.epoch(step, epoch, recall_scalars("select", selection))
        if kill_at == ("before-save", epoch):
            os.kill(os.getpid(), signal.SIGKILL)
        state = {"model": {}, "config": cfg, "epoch": epoch, "step": step, "best_epoch": epoch,
                 "log_line": {"epoch": epoch, "train": {"loss": 1.0 / step}, "select": selection}}
        rundir.save_epoch(cfg, state, True)
    reporter.final(step, metrics(EPOCHS, offset), cfg, table="the report table")
    reporter.close()


def killed_run(folder, kill_at):
    """simulate() in a process of its own that kills itself with SIGKILL at `kill_at`. It is forked from this one,
    which has imported torch and TensorBoard already: a fresh Python would spend seconds importing them again."""
    child = multiprocessing.get_context("fork").Process(target=forked_simulate, args=(str(folder), kill_at))
    child.start()
    child.join(timeout=300)
    assert child.exitcode == -signal.SIGKILL, child.exitcode  # its stderr is in this test's captured output


def forked_simulate(folder, kill_at):
    torch.set_num_threads(1)  # as a DataLoader worker does: the parent's OpenMP threads are not in the fork
    simulate(folder, KILLED, kill_at)


def read_events(folder):
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("kills, checkpoint_step", [([("step", 12)], 10), ([("before-save", 1)], 5),
                                                     ([("step", 7), ("step", 12)], 10)])
def test_a_resumed_run_after_kill_9_continues_the_same_curves(tmp_path, kills, checkpoint_step):
    for kill_at in kills:  # each run resumes the one before
        killed_run(tmp_path, kill_at)
    simulate(str(tmp_path))  # resumes from last.pt
    acc = read_events(tmp_path)
    assert {"train/loss", "epoch", "select/rsum", "select/i2t_R@1", "select/t2i_median_rank",
            "final/rsum"} <= set(acc.Tags()["scalars"])
    assert {"config/text_summary", "final/table/text_summary"} <= set(acc.Tags()["tensors"])
    hparams = acc.PluginTagToContent("hparams")
    experiment, start = HParamsPluginData(), HParamsPluginData()
    experiment.ParseFromString(hparams["_hparams_/experiment"])
    start.ParseFromString(hparams["_hparams_/session_start_info"])
    assert "final/rsum" in [m.name.tag for m in experiment.experiment.metric_infos]
    assert start.session_start_info.hparams["seed"].number_value == 0.0

    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(EVERY, EPOCHS * STEPS_PER_EPOCH + 1, EVERY))  # each step once
    for e in loss:  # up to the checkpoint from the killed run, after it from the resumed run only
        expected = 1.0 / e.step + (KILLED if e.step <= checkpoint_step else 0.0)
        assert e.value == pytest.approx(expected, rel=1e-6), e.step

    epoch_ends = [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]
    assert [(e.step, e.value) for e in acc.Scalars("epoch")] == [(s, float(i)) for i, s in enumerate(epoch_ends)]
    log = rundir.read_log(str(tmp_path / rundir.LOG_NAME))
    rsum = acc.Scalars("select/rsum")
    assert [e.step for e in rsum] == epoch_ends and len(log) == EPOCHS
    assert [e.value for e in rsum] == pytest.approx([line["select"]["rsum"] for line in log], rel=1e-6)
    assert [e.value for e in acc.Scalars("select/t2i_median_rank")] == [10.0, 9.0, 8.0]
    assert [(e.step, e.value) for e in acc.Scalars("final/rsum")] == [(15, pytest.approx(3.6))]
    config = acc.Tensors("config/text_summary")
    assert [e.step for e in config] == [0] and b"| seed | 0 |" in config[0].tensor_proto.string_val[0]


def test_a_fresh_run_removes_what_an_earlier_unsaved_run_left_at_its_first_save(tmp_path):
    killed_run(tmp_path, ("before-save", 0))  # killed before its first checkpoint: nothing to resume
    (left,) = tmp_path.glob("events.out.tfevents.*")
    reporter = Reporter(["tensorboard"], str(tmp_path))
    assert left.exists()  # a run that stops before its first save loses nothing
    reporter.step(2, {"train/loss": 0.5})
    reporter.epoch(5, 0, {})
    assert not left.exists()
    reporter.close()
    acc = read_events(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(2, 0.5)]
    assert [e.step for e in acc.Scalars("epoch")] == [5]


def test_step_scalars_read_the_optimizer_the_model_and_the_sigmoid_bias(tiny_data):
    model, loss_fn = tiny_model(tiny_data / "text", 0.0), make_loss("sigmoid", 0, 1)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05, lr=1e-3, head_lr=1e-2, extra=[loss_fn]))
    batch = tiny_batch(tiny_data / "text")
    out = loss_fn(*model(batch["images"], batch["input_ids"], batch["attention_mask"]), batch["image_ids"])
    out["loss"].backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    s = step_scalars(out, optimizer, model, loss_fn, grad_norm=norm, pairs_per_s=123.0, data_wait_share=0.25,
                     skipped_images=2, device="cpu")
    assert sorted(v for k, v in s.items() if k.startswith("train/lr/")) == [1e-3, 1e-3, 1e-2, 1e-2]
    assert s["train/loss"] == pytest.approx(out["loss"].item())
    assert s["train/logit_scale"] == pytest.approx(model.logit_scale().item())
    assert s["train/sigmoid_bias"] == -10.0 and s["train/grad_norm"] == pytest.approx(norm.item())
    assert (s["train/pairs_per_s"], s["train/data_wait_share"], s["train/skipped_images"]) == (123.0, 0.25, 2.0)
    assert "train/cuda_peak_memory_gib" not in s
    assert "train/sigmoid_bias" not in step_scalars(out, optimizer, model, make_loss("infonce", 0, 1))


def test_report_to_accepts_the_documented_forms_and_names_the_key_otherwise():
    assert parse_targets("tensorboard") == ["tensorboard"]
    assert parse_targets("tensorboard, wandb,tensorboard") == ["tensorboard", "wandb"]
    assert parse_targets("none") == [] and report_to_rule("wandb") is None
    for bad in ("tensorbord", "", "none,wandb", "tensorboard,"):
        with pytest.raises(ConfigError, match="'report-to'"):
            parse_targets(bad)
    reporter = Reporter([], "unused-folder")  # report-to none: nothing is written, nothing is due
    assert not reporter.due(10) and not os.path.exists("unused-folder")
    reporter.close()


def test_wandb_asked_for_without_the_package_is_one_line_saying_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets when it is not installed
    with pytest.raises(ConfigError, match="pip install wandb") as e:
        Reporter(["tensorboard", "wandb"], str(tmp_path / "run"))
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def wandb_records(path):
    """The records of a W&B offline run file: a 7-byte header, then 32 KiB blocks of chunks, each a 7-byte
    header (crc32, little-endian length, type: 1 whole, 2 first, 3 middle, 4 last) and its bytes."""
    from wandb.proto import wandb_internal_pb2
    data, block, pos, part, records = open(path, "rb").read(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, size, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part, pos = part + data[pos + 7:pos + 7 + size], pos + 7 + size
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


def test_wandb_offline_records_the_steps_the_config_and_the_final_scores(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    reporter = Reporter(["wandb"], str(tmp_path), every=EVERY)
    reporter.config({"batch-size": 8, "select-root": None})
    for step in range(1, 7):
        if reporter.due(step):
            reporter.step(step, {"train/loss": 1.0 / step})
    reporter.epoch(6, 0, recall_scalars("select", metrics(1, 0.0)))
    reporter.final(6, metrics(2, 0.0), {"batch-size": 8})
    run_id = json.loads((tmp_path / "wandb-run.json").read_text())["id"]
    reporter.close()
    files = glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    assert len(files) == 1
    for _ in range(600):  # W&B's service process may still be writing the file when finish() returns
        records = wandb_records(files[0])
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.1)
    history, config = [], {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    assert [row["_step"] for row in history] == [2, 4, 6]
    assert [row["train/loss"] for row in history] == [0.5, 0.25, pytest.approx(1 / 6)]
    assert history[-1]["epoch"] == 0 and history[-1]["select/rsum"] == pytest.approx(1.2)
    assert history[-1]["final/rsum"] == pytest.approx(2.4)
    assert config["batch-size"] == 8 and config["select-root"] is None


def test_train_py_logs_live_curves_that_a_stop_and_resume_within_an_epoch_continue(tiny_data, tmp_path,
                                                                                     monkeypatch):
    """train.py end to end: 2 epochs of 5 steps, a point every 2 steps; SIGTERM during step 7 (epoch 1), then the
    same command resumes from the save within epoch 1. Each step appears once, and the curves match the log."""
    import train
    from engine import epoch as epoch_module
    from tests.helpers import tiny_train_args

    args = tiny_train_args(tiny_data, tmp_path, "--report-to", "tensorboard", "--report-every", "2",
                           "--load-checkpoint", "auto")
    real, calls = epoch_module.plain_step, []

    def plain_step(*a, **k):
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)
    monkeypatch.setattr(epoch_module, "plain_step", plain_step)
    with pytest.raises(SystemExit):
        train.main(args)
    assert load_checkpoint(str(tmp_path / "last.pt"))["step"] == 7
    monkeypatch.undo()
    train.main(args)

    acc = read_events(tmp_path)
    assert {"train/loss", "train/grad_norm", "train/pairs_per_s", "train/data_wait_share", "train/lr/group0",
            "train/logit_scale", "select/rsum", "epoch", "final/rsum"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6, 8, 10]  # none twice, none missing
    assert [e.step for e in acc.Scalars("train/grad_norm")] == [2, 4, 6, 8, 10]
    log = rundir.read_log(str(tmp_path / rundir.LOG_NAME))
    rsum = acc.Scalars("select/rsum")
    assert [e.step for e in rsum] == [5, 10]
    assert [e.value for e in rsum] == pytest.approx([line["select"]["rsum"] for line in log], rel=1e-6)
    assert [(e.step, e.value) for e in acc.Scalars("final/rsum")] == \
        [(10, pytest.approx(json.loads((tmp_path / "report.json").read_text())["rsum"], rel=1e-6))]
    assert [e.step for e in acc.Tensors("config/text_summary")] == [0]  # once, by the first start
