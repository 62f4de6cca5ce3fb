"""Long runs on shared clusters: saves within an epoch, the clean stop on SIGTERM, exact resume from the middle of
an epoch (1 process and 2 gloo processes), and one error line for a run of several processes.

Every comparison is bit for bit: the folder loader's order and crops follow (seed, epoch, position) alone
(engine.sampler), a checkpoint within an epoch holds every process's RNG state and the epoch's running sums, so
a stopped and resumed run computes exactly what an unbroken one does.
"""
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from engine import epoch as epoch_module
from engine import rundir
from engine.checkpoint import load_checkpoint
from engine.errors import STOPPED_EXIT
from engine.preempt import DUPLICATE_S
from tests.helpers import ROOT, free_port, tiny_train_args

# 40 training pairs at batch 8: 5 steps an epoch, 10 in all; crops and colour jitter on, so RNG states matter
RUN = ("--epochs", "2", "--use-augment", "true")
STEPS = 5


def weights(folder):
    return load_checkpoint(str(folder / "last.pt"))["model"]


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def losses(folder):
    return [(e["epoch"], e["train"]["loss"], e["train"]["steps"]) for e in rundir.read_log(folder / "metrics.jsonl")]


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory):
    """An unbroken run of RUN, in this process, for each worker count asked."""
    made = {}

    def run(workers):
        if workers not in made:
            out = tmp_path_factory.mktemp(f"straight{workers}")
            train.main(tiny_train_args(tiny_data, out, *RUN, "--num-workers", str(workers)))
            made[workers] = out
        return made[workers]
    return run


def signal_at_step(monkeypatch, step, sig=signal.SIGTERM):
    """Send this process `sig` during optimizer step `step` (1-based, counted over the whole run)."""
    real, calls = epoch_module.plain_step, []

    def plain_step(*a, **k):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), sig)
        return real(*a, **k)
    monkeypatch.setattr(epoch_module, "plain_step", plain_step)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stop_within_an_epoch_then_the_same_command_ends_as_an_unbroken_run(tiny_data, straight, tmp_path,
                                                                               monkeypatch, capsys, workers):
    args = tiny_train_args(tiny_data, tmp_path, *RUN, "--num-workers", str(workers), "--load-checkpoint", "auto")
    signal_at_step(monkeypatch, STEPS + 2, signal.SIGUSR1 if workers else signal.SIGTERM)  # epoch 1, step 2
    with pytest.raises(SystemExit) as stopped:
        train.main(args)
    assert stopped.value.code == STOPPED_EXIT
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("stopped")]
    assert line.startswith(f"stopped by {'SIGUSR1' if workers else 'SIGTERM'} at epoch 1, step 2 of {STEPS} "
                           f"(optimizer step {STEPS + 2})") and "--load-checkpoint auto" in line
    ckpt = load_checkpoint(str(tmp_path / "last.pt"))
    assert ckpt["epoch"] == 0 and ckpt["step"] == STEPS + 2
    assert ckpt["partial"]["epoch"] == 1 and ckpt["partial"]["steps"] == 2 and ckpt["partial"]["samples"] == 16
    # the save within epoch 1 leaves the selection's files to the epoch's end: best.pt and the log are epoch 0's
    assert load_checkpoint(str(tmp_path / "best.pt"))["epoch"] == 0
    assert [e for e, _, _ in losses(tmp_path)] == [0]
    monkeypatch.undo()

    train.main(args)  # the same command again
    assert "resumed from" in capsys.readouterr().out
    assert_same_weights(tmp_path, straight(workers))
    # the epoch's mean loss sums the steps before and after the stop, in the same order
    assert losses(tmp_path) == losses(straight(workers))


def test_saves_every_n_steps_leave_best_and_log_alone_and_resume_exactly(tiny_data, straight, tmp_path,
                                                                          monkeypatch):
    saved, real = [], rundir.save_within_epoch

    def save_within_epoch(cfg, state, replacing=()):
        real(cfg, state, replacing)
        log = rundir.read_log(tmp_path / "run" / "metrics.jsonl")
        saved.append((state["step"], state["partial"]["epoch"], state["partial"]["steps"], len(log)))
        if state["step"] == 6:  # what a run killed after this save leaves on disk
            shutil.copytree(tmp_path / "run", tmp_path / "killed", ignore=shutil.ignore_patterns(".train.lock"))
    monkeypatch.setattr(rundir, "save_within_epoch", save_within_epoch)
    train.main(tiny_train_args(tiny_data, tmp_path / "run", *RUN, "--save-every-steps", "3"))
    # steps 3, 6, 9 (step 10 ends epoch 1, saved as every epoch is); the log has only whole epochs
    assert saved == [(3, 0, 3, 0), (6, 1, 1, 1), (9, 1, 4, 1)]
    assert losses(tmp_path / "run") == losses(straight(0))
    monkeypatch.undo()
    train.main(tiny_train_args(tiny_data, tmp_path / "killed", *RUN, "--load-checkpoint", "auto"))
    assert_same_weights(tmp_path / "killed", straight(0))
    assert losses(tmp_path / "killed") == losses(straight(0))


def test_load_checkpoint_auto_starts_fresh_without_last_pt(tiny_data, tmp_path, capsys):
    train.main(tiny_train_args(tiny_data, tmp_path, "--epochs", "1", "--load-checkpoint", "auto"))
    assert "no " + str(tmp_path / "last.pt") + " yet: starting fresh" in capsys.readouterr().out
    assert load_checkpoint(str(tmp_path / "last.pt"))["epoch"] == 0


def two_process_rank(rank, world_size, port, args, signal_step, die=False):
    """One of two gloo processes running train.main(args); rank 1 alone gets SIGTERM at step `signal_step`
    (or, with `die`, ends there outright with status 3, as a crashed process does)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if signal_step and rank == 1:
        real, calls = epoch_module.plain_step, []

        def plain_step(*a, **k):
            calls.append(1)
            if len(calls) == signal_step:
                if die:
                    os._exit(3)
                os.kill(os.getpid(), signal.SIGTERM)
            return real(*a, **k)
        epoch_module.plain_step = plain_step
    train.main(args)


def two_processes(args, signal_step=0, die=False):
    ctx = torch.multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=two_process_rank, args=(r, 2, port, args, signal_step, die)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    return [p.exitcode for p in procs]


@pytest.fixture(scope="module")
def whole_two(tiny_data, tmp_path_factory):
    """An unbroken run of RUN in two gloo processes: what every stopped two-process run below must end as."""
    whole = tmp_path_factory.mktemp("whole-two")
    assert two_processes(tiny_train_args(tiny_data, whole, *RUN)) == [0, 0]
    return whole


def test_two_processes_stop_at_the_same_step_and_resume_bit_identically(tiny_data, whole_two, tmp_path):
    """Only rank 1 is signalled: both agree to stop after the same step, rank 0 saves once, the resume is exact."""
    whole, cut = whole_two, tmp_path / "cut"
    args = tiny_train_args(tiny_data, cut, *RUN, "--load-checkpoint", "auto")
    # each process takes 4 of the global batch of 8: 5 steps an epoch, as with one process
    assert two_processes(args, signal_step=STEPS + 2) == [STOPPED_EXIT, STOPPED_EXIT]
    ckpt = load_checkpoint(str(cut / "last.pt"))
    assert ckpt["partial"]["epoch"] == 1 and ckpt["partial"]["steps"] == 2 and len(ckpt["rng"]) == 2
    assert two_processes(args) == [0, 0]
    assert_same_weights(cut, whole)
    assert losses(cut) == losses(whole)


# ------------------------------------------------------------------------- the stop itself, in a process of its own
STOPPER = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
from engine.preempt import StopSignals
with StopSignals({timeout}) as s:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)
    print(s.requested, flush=True)
    if {again}:
        time.sleep({gap})
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
"""


@pytest.mark.parametrize("again", [True, False])
def test_a_second_signal_or_the_timeout_exits_at_once(again):
    script = STOPPER.format(root=ROOT, timeout=60 if again else 0.5, again=again, gap=DUPLICATE_S + 0.5)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 128 + signal.SIGTERM and done.stdout == "SIGTERM\n"
    assert done.stderr.startswith("stopped at once: " + ("a second SIGTERM" if again else
                                                         "the stop did not finish within 0.5 s"))


# ------------------------------------------------------------------- real processes: python train.py and torchrun
def command(tiny_data, out, processes):
    args = tiny_train_args(tiny_data, out, *RUN, "--load-checkpoint", "auto")
    if processes == 1:
        return [sys.executable, os.path.join(ROOT, "train.py"), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            os.path.join(ROOT, "train.py"), *args]


def start(cmd, logs):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    err = open(logs, "w+")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=env,
                            start_new_session=True), err


def finish(proc, err, timeout=300):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    err.seek(0)
    text = err.read()
    err.close()
    return proc.returncode, text


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_at_a_random_moment_then_the_same_command_gives_the_unbroken_runs_weights(tiny_data, tmp_path,
                                                                                           processes, request):
    cut = tmp_path / "cut"
    proc, err = start(command(tiny_data, cut, processes), tmp_path / "cut.err")
    # a random moment of the first epoch: wait for its progress bar, then a random share of an epoch's time
    deadline = time.monotonic() + 240
    while "epoch 0:" not in (tmp_path / "cut.err").read_text() and proc.poll() is None and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    delay = random.Random().uniform(0, 3)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGTERM) if processes == 1 else proc.send_signal(signal.SIGTERM)
    rc, text = finish(proc, err)
    stopped = [ln for ln in text.splitlines() if ln.startswith("stopped by")]
    assert rc in (0, STOPPED_EXIT, 1), text[-3000:]  # torchrun reports its stopped workers as failed: 1
    assert len(stopped) <= 1, text[-3000:]  # one line for the run, never one per process
    if processes == 1:  # the unbroken run, started now: it trains alongside the resumed one, one core each
        whole = tmp_path / "whole"
        unbroken = start(command(tiny_data, whole, processes), tmp_path / "whole.err")
    else:  # the same training in two gloo processes, started by spawn instead of torchrun: shared, not run again
        whole = request.getfixturevalue("whole_two")
    for attempt in range(3):  # the requeued job: the same command until it finishes
        rc, text = finish(*start(command(tiny_data, cut, processes), tmp_path / f"again{attempt}.err"))
        if rc == 0:
            break
    if processes == 1:  # waited for before any check can fail, so that none leaves it running
        whole_rc, whole_err = finish(*unbroken)
        assert whole_rc == 0, whole_err[-3000:]
    assert rc == 0, f"SIGTERM after {delay:.2f} s: {text[-3000:]}"
    assert_same_weights(cut, whole), f"SIGTERM after {delay:.2f} s"
    assert losses(cut) == losses(whole)


def test_a_user_error_on_rank_0_ends_both_ranks_with_one_line(tiny_data, tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0}\n')  # another run's log: rank 0 refuses to start
    cmd = command(tiny_data, tmp_path, 2)
    cmd.remove("auto"), cmd.remove("--load-checkpoint")
    rc, text = finish(*start(cmd, tmp_path / "err"), timeout=120)  # killed at 120 s: rc -9
    errors = [ln for ln in text.splitlines() if ln.startswith("error: ")]
    assert rc == 1 and len(errors) == 1 and "already exists from another run" in errors[0], text[-3000:]
    assert "train.py\", line" not in text, text[-3000:]  # no traceback from any rank


QUEUE = ("--queue-size", "16", "--queue-momentum", "0.9", "--hard-negative-weight", "0.5", "--queue-warmup", "2")


def test_the_feature_queue_momentum_towers_and_hard_negatives_train_and_resume_exactly(tiny_data, tmp_path,
                                                                                       monkeypatch):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train.main(tiny_train_args(tiny_data, whole, *RUN, *QUEUE))
    ckpt = load_checkpoint(str(whole / "last.pt"))
    assert int(ckpt["loss"]["queue.pushes"]) == 2 * STEPS and int(ckpt["loss"]["queue.filled"]) == 16
    assert (ckpt["loss"]["queue.ids"] >= 0).all()  # every slot holds a queued pair
    # the momentum copies moved away from the trained towers (0.9 of the way behind them each step)
    model = ckpt["model"]
    moved = [n for n, w in model.items()
             if w.is_floating_point() and not torch.equal(ckpt["momentum"]["towers." + n], w)]
    assert len(moved) > 10
    assert all(math.isfinite(loss) for _, loss, _ in losses(whole))

    args = tiny_train_args(tiny_data, cut, *RUN, *QUEUE, "--load-checkpoint", "auto")
    signal_at_step(monkeypatch, STEPS + 2)
    with pytest.raises(SystemExit):
        train.main(args)
    monkeypatch.undo()
    assert int(load_checkpoint(str(cut / "last.pt"))["loss"]["queue.pushes"]) == STEPS + 2
    train.main(args)
    assert_same_weights(cut, whole)
    assert losses(cut) == losses(whole)
    a, b = load_checkpoint(str(cut / "last.pt")), ckpt
    for name in b["momentum"]:
        assert torch.equal(a["momentum"][name], b["momentum"][name]), name
    for name in b["loss"]:
        assert torch.equal(a["loss"][name], b["loss"][name]), name


def test_a_resume_that_adds_momentum_towers_is_refused_in_one_line(tiny_data, tmp_path):
    train.main(tiny_train_args(tiny_data, tmp_path, "--epochs", "1", "--queue-size", "16"))
    with pytest.raises(SystemExit) as e:
        train.main(tiny_train_args(tiny_data, tmp_path, "--epochs", "2", "--queue-size", "16", "--queue-momentum",
                                   "0.9", "--load-checkpoint", "true", "--load-path", str(tmp_path / "last.pt")))
    assert str(e.value.code).startswith("error: ") and "queue-momentum null" in str(e.value.code)


def test_a_process_that_dies_outright_ends_the_other_with_one_line(tiny_data, tmp_path, capfd):
    assert two_processes(tiny_train_args(tiny_data, tmp_path, *RUN), signal_step=3, die=True) == [1, 3]
    err = capfd.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: another process of this run stopped or stopped "
                                                     "answering"), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
