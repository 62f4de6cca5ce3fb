"""The Slurm script's two-node launch rehearsed on one machine, and streaming training from shards end to end.

Two torchrun launchers (one process each, as two nodes would run) meet through a c10d rendezvous on 127.0.0.1
and train with gloo on the CPU. They must train as one process with the same global batch does: the same loss
in metrics.jsonl and the same weights in last.pt. The comparison is made meaningful by
  - no randomness that depends on the rank: frozen BatchNorm (a process normalises its own half otherwise),
    a text model without dropout, no augmentation;
  - one step that sees the whole epoch, so the order of the pairs (different with 1 and 2 processes) only
    changes rounding: the loss is a mean over rows and columns of the batch's logits;
  - AdamW's first step moves every weight by lr * g / (|g| + eps), i.e. by about +-lr whatever |g| is: rounding
    noise in g changes a step by far less than lr unless it flips the sign of a g that is itself noise. So the
    steps (final - initial weights) are compared to lr / 10, and a handful of flips are allowed (see
    assert_same_training).
"""
import json
import os
import shlex
import shutil
import signal
import string
import subprocess
import sys
import tarfile
import time
import uuid
from collections import Counter

import pytest
import torch

import train
from dataset import PairCollate, image_transform
from engine import loop, rundir
from engine import shards as shards_module
from engine.checkpoint import load_checkpoint
from engine.rundir import read_log
from engine.runtime import rng_state, seed_everything, set_rng_state
from model import build_model, load_tokenizer
from tests.helpers import ROOT, free_port, tiny_train_args
from tools.shards import write_shards

LR = 1e-4  # the rate of the one compared step (warmup-steps 1): far above float32 rounding of the weights
PATTERN = "{000000..000003}.tar"  # 24 images at 6 per shard: 4 shards of 12 pairs, 2 per process
PAIRS = 48  # all training pairs (24 images x 2 captions): one global batch from shards
LAUNCH_TIMEOUT = 240  # seconds for both launchers together; a run takes 15-40 s on 2 busy cores


@pytest.fixture(scope="module")
def data(tiny_data, tmp_path_factory):
    """tiny_data plus text0/ (its text model without dropout) and shards/ (its training pairs in 4 shards)."""
    base = tmp_path_factory.mktemp("multinode")
    shutil.copytree(tiny_data / "text", base / "text0")
    config = json.loads((base / "text0" / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (base / "text0" / "config.json").write_text(json.dumps(config))
    write_shards(str(tiny_data / "train"), str(base / "shards"), 6, progress=False)
    return {"tiny": tiny_data, "text0": base / "text0", "shards": str(base / "shards" / PATTERN),
            "valid": str(tiny_data / "valid")}


def compared_args(data, out, *extra):
    """One epoch of one step with frozen BatchNorm and no dropout (see the module docstring)."""
    return tiny_train_args(data["tiny"], out, "--text-model", str(data["text0"]), "--epochs", "1",
                           "--freeze-bn", "true", "--learning-rate", f"{LR:.1e}", "--warmup-steps", "1", *extra)


def source_args(data, source):
    if source == "folder":  # 24 images minus 4 held out for selection: 40 pairs
        return ["--batch-size", "40"]
    return ["--batch-size", str(PAIRS), "--train-shards", data["shards"], "--select-root", data["valid"]]


SBATCH = os.path.join(ROOT, "docs", "slurm", "train-multinode.sbatch")


def slurm_torchrun(script, train_args, **values):
    """The torchrun command of a Slurm script (srun's task), its variables replaced by `values` and "$@" by
    `train_args`: the very line a cluster runs, as argv for this machine's Python."""
    with open(script, encoding="utf-8") as f:
        text = f.read().replace("\\\n", " ")  # join continued lines
    (line,) = [ln for ln in text.splitlines() if "torchrun " in ln and not ln.lstrip().startswith("#")]
    tokens = shlex.split(line.split("torchrun ", 1)[1].rstrip(" &"))
    argv = [sys.executable, "-m", "torch.distributed.run"]
    for token in tokens:
        if token == "$@":
            argv += train_args
        elif token == "train.py":
            argv.append(os.path.join(ROOT, "train.py"))
        else:
            argv.append(string.Template(token).substitute(values))
    return argv


def test_the_slurm_scripts_parse_and_launch_what_the_rehearsal_runs():
    for script in ("train-1node.sbatch", "train-multinode.sbatch"):
        path = os.path.join(ROOT, "docs", "slurm", script)
        assert subprocess.run(["bash", "-n", path]).returncode == 0, script
        with open(path, encoding="utf-8") as f:
            text = f.read()
        # the stop on the time limit, the requeue and the resume that make a requeued job continue
        for needed in ("#SBATCH --signal=B:USR1@", "#SBATCH --requeue", "trap stop USR1", "kill -TERM",
                       "scontrol requeue", "--load-checkpoint auto"):
            assert needed in text, (script, needed)
    argv = slurm_torchrun(SBATCH, ["--epochs", "1"], NNODES="2", GPUS_PER_NODE="1", RDZV_HOST="127.0.0.1",
                          RDZV_PORT="1234", RDZV_ID="x")
    assert argv[3:] == ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                        "127.0.0.1:1234", "--rdzv_id", "x", os.path.join(ROOT, "train.py"), "--load-checkpoint",
                        "auto", "--epochs", "1"]


def launch_two_nodes(train_args, logs, timeout=LAUNCH_TIMEOUT):
    """Run the Slurm script's torchrun line (docs/slurm/train-multinode.sbatch) as two launchers on 127.0.0.1, one
    process each, as two nodes would; [(stdout, stderr)] of each node.

    A launcher that fails takes the other down with it (the other would wait at the rendezvous or in a
    collective until its own timeouts), and so does the overall timeout; stderr tails go into the assertion.
    """
    port, rdzv_id = free_port(), f"rehearsal-{uuid.uuid4().hex[:12]}"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two processes on two shared cores
    procs, files = [], []
    cmd = slurm_torchrun(SBATCH, train_args, NNODES="2", GPUS_PER_NODE="1", RDZV_HOST="127.0.0.1",
                         RDZV_PORT=str(port), RDZV_ID=rdzv_id)
    for node in range(2):
        out, err = open(logs / f"node{node}.out", "w+"), open(logs / f"node{node}.err", "w+")
        files.append((out, err))
        # own session: the launcher and the worker it starts are killed together
        procs.append(subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env=env, start_new_session=True))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        why = f"killed at the {timeout} s timeout" if time.monotonic() >= deadline else "killed: the other failed"
        killed = [p.poll() is None for p in procs]
        for p in procs:  # SIGTERM first: torchrun passes it on to its workers, which run in sessions of their own
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    texts = []
    for handles in files:
        for f in handles:
            f.seek(0)
        texts.append(tuple(f.read() for f in handles))
        for f in handles:
            f.close()
    report = "\n".join(f"--- node {n}: exit {p.returncode}{f' ({why})' if was_killed else ''}; "
                       f"{stderr_summary(err)}" for n, (p, was_killed, (_, err)) in
                       enumerate(zip(procs, killed, texts, strict=True)))
    assert all(p.returncode == 0 for p in procs), report
    return texts


def stderr_summary(err):
    """train.py's own one-line errors (torchrun's failure report pushes them out of the tail), then the tail."""
    own = [line for line in err.splitlines() if line.startswith("error: ")]
    return "\n".join(own + ["stderr tail:", err[-2000:]])


def initial_weights(cfg):
    """The weights train.py starts from: build_model right after seeding with the run's seed (rank 0's)."""
    saved = rng_state()
    seed_everything(cfg["seed"])
    weights = build_model(cfg).state_dict()
    set_rng_state(saved)
    return weights


def assert_same_training(one, two):
    """Run folders `one` (1 process) and `two` (2 processes) trained the same one step."""
    (first,), (second,) = read_log(one / "metrics.jsonl"), read_log(two / "metrics.jsonl")
    assert first["train"]["steps"] == second["train"]["steps"] == 1
    assert first["train"]["samples"] == second["train"]["samples"]
    # summed in another order and gathered: float32 rounding, ~1e-7 of a loss of ~8
    assert second["train"]["loss"] == pytest.approx(first["train"]["loss"], rel=1e-5, abs=0)
    a = torch.load(one / "last.pt", weights_only=False)["model"]
    b = torch.load(two / "last.pt", weights_only=False)["model"]
    start = initial_weights(torch.load(one / "last.pt", weights_only=False)["config"])
    moved = differ = 0
    for name, w in a.items():
        if not w.is_floating_point():
            assert torch.equal(w, b[name]), name
            continue
        step_one, step_two = w - start[name], b[name] - start[name]
        moved += (step_one.abs() > LR / 2).sum().item()
        differ += ((step_one - step_two).abs() > LR / 10).sum().item()
    assert moved > 1_000_000  # the step really moved the weights: the comparison is not of two copies of `start`
    # A step whose sign is decided by rounding (a gradient that cancels to noise) may flip: 1 in 10^5 allowed.
    # (Seen: none of ~3.3M. With BatchNorm learning, each process normalising its own half, 1.6M of 4.3M differ
    # and the loss is 2% off: the check has teeth.)
    assert differ <= moved // 100_000, f"{differ} of {moved} weight steps differ by more than lr / 10"


def two_rank_loader(real):
    """A stand-in for shard_loader in a 1-process train.py: its one batch per epoch is the union of what ranks
    0 and 1 of a 2-process run read (the real shard_loader's, called as train.py calls it, with world size 2)."""
    class Loader:
        def __init__(self, pattern, transform, collate, batch_size, workers, rank, world_size, samples, seed,
                     **kw):
            assert world_size == 1
            self.read = lambda r: real(pattern, transform, lambda items: {"items": list(items), "skipped": 0},
                                       batch_size // 2, workers, r, 2, samples, seed, epoch=self.epoch, **kw)
            self.collate, self.epoch = collate, 0

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __len__(self):
            return 1

        def __iter__(self):
            (zero,), (one,) = list(self.read(0)), list(self.read(1))  # one local batch each
            yield self.collate(zero["items"] + one["items"])  # padded to the longest caption of both halves

    return Loader


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_two_node_launch_trains_as_one_process_with_the_same_global_batch(data, source, tmp_path, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    if source == "shards":
        # With shards a process's pairs depend on its share of the shards (and the shuffle buffer draws them
        # with repeats, see test_an_epoch_of_shards_is_one_pass_over_its_pairs), so the 1-process reference
        # gets the very pairs the two ranks read.
        monkeypatch.setattr(train, "shard_loader", two_rank_loader(shards_module.shard_loader))
    train.main(compared_args(data, one, *source_args(data, source)))
    nodes = launch_two_nodes(compared_args(data, two, *source_args(data, source)), tmp_path)
    # the rendezvous, not --node_rank, decides which launcher holds rank 0: one of the two prints and writes
    assert sorted(out.count("epoch 0: loss") for out, _ in nodes) == [0, 1]
    assert_same_training(one, two)


# ---------------------------------------------------------------------------------------------- streaming

def streaming_args(data, out, *extra):
    """2 steps an epoch; the text model keeps its dropout, so a resume must restore the RNG too."""
    return tiny_train_args(data["tiny"], out, "--train-shards", data["shards"], "--select-root", data["valid"],
                           "--batch-size", "24", *extra)


def snapshot_before_epoch(epoch_to_copy, source, target):
    """train_one_epoch that first copies the run folder as it stands when `epoch_to_copy` starts: what a run
    killed during that epoch leaves on disk (every file is written at an epoch's end)."""
    real = loop.train_one_epoch

    def train_one_epoch(trainer, loader, epoch, **kw):
        if epoch == epoch_to_copy:
            shutil.copytree(source, target)
        return real(trainer, loader, epoch, **kw)
    return train_one_epoch


def test_streaming_training_resumes_as_an_uninterrupted_run(data, tmp_path, capsys, monkeypatch):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    monkeypatch.setattr(loop, "train_one_epoch", snapshot_before_epoch(2, whole, cut))
    train.main(streaming_args(data, whole, "--epochs", "3"))
    monkeypatch.undo()
    ckpt = torch.load(cut / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 2 * PAIRS // 24 and len(read_log(cut / "metrics.jsonl")) == 2
    capsys.readouterr()
    train.main(streaming_args(data, cut, "--epochs", "3", "--load-checkpoint", "true",
                              "--load-path", str(cut / "last.pt")))
    assert "resumed from" in capsys.readouterr().out
    resumed, straight = read_log(cut / "metrics.jsonl"), read_log(whole / "metrics.jsonl")
    assert [e["epoch"] for e in resumed] == [e["epoch"] for e in straight] == [0, 1, 2]
    # epoch 2 re-reads its shards with the seeds of epoch 2, and the RNG (dropout) continues from the checkpoint
    assert [e["train"]["loss"] for e in resumed] == [e["train"]["loss"] for e in straight]
    a = torch.load(cut / "last.pt", weights_only=False)
    b = torch.load(whole / "last.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] == 3 * PAIRS // 24
    for name, w in a["model"].items():
        assert torch.equal(w, b["model"][name]), name


def test_streaming_resumes_from_the_middle_of_an_epoch_as_an_unbroken_run(data, tmp_path, monkeypatch):
    """The stream keeps no position: the resumed epoch is read again from its start and the batches already
    trained on are dropped (engine.shards, "Resume"), which gives the very batches of an unbroken run."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train.main(streaming_args(data, whole, "--epochs", "2"))
    real = rundir.save_within_epoch

    def save_within_epoch(cfg, state, replacing=()):
        real(cfg, state, replacing)
        if state["step"] == 3:  # epoch 1, after its first of 2 steps: what a run killed then leaves
            shutil.copytree(tmp_path / "run", cut, ignore=shutil.ignore_patterns(".train.lock"))
    monkeypatch.setattr(rundir, "save_within_epoch", save_within_epoch)
    train.main(streaming_args(data, tmp_path / "run", "--epochs", "2", "--save-every-steps", "3"))
    monkeypatch.undo()
    assert load_checkpoint(str(cut / "last.pt"))["partial"]["steps"] == 1
    train.main(streaming_args(data, cut, "--epochs", "2", "--load-checkpoint", "auto"))
    assert [e["train"]["loss"] for e in read_log(cut / "metrics.jsonl")] == \
        [e["train"]["loss"] for e in read_log(whole / "metrics.jsonl")]
    a, b = load_checkpoint(str(cut / "last.pt"))["model"], load_checkpoint(str(whole / "last.pt"))["model"]
    for name, w in a.items():
        assert torch.equal(w, b[name]), name


def test_a_shard_pattern_matching_nothing_is_a_one_line_error(data, tmp_path):
    missing = str(tmp_path / "nowhere" / PATTERN)
    with pytest.raises(SystemExit) as stop:
        train.main(streaming_args(data, tmp_path, "--train-shards", missing))
    assert str(stop.value).startswith(f"error: no shard file matches '{missing}'")
    assert "\n" not in str(stop.value)
    assert not (tmp_path / "last.pt").exists()


def test_a_corrupt_shard_member_is_skipped_and_counted(data, tmp_path, capsys):
    folder = tmp_path / "shards"
    shutil.copytree(os.path.dirname(data["shards"]), folder)
    with tarfile.open(folder / "000001.tar") as tar:
        image = next(m for m in tar.getmembers() if not m.name.endswith(".json"))
    with open(folder / "000001.tar", "r+b") as f:  # the tar stays well-formed; the image's bytes are garbage
        f.seek(image.offset_data)
        f.write(b"\0" * image.size)
    train.main(streaming_args(data, tmp_path / "run", "--train-shards", str(folder / PATTERN), "--epochs", "1"))
    (entry,) = read_log(tmp_path / "run" / "metrics.jsonl")
    assert entry["train"]["steps"] == PAIRS // 24  # the epoch completed
    # counted each time the stream passes the member (24 times here): the shard is read round after round
    assert entry["train"]["skipped_images"] >= 1
    assert f"warning: {entry['train']['skipped_images']} undecodable image(s) skipped this epoch (counted each " \
        "time the stream reads one)" in capsys.readouterr().out
    assert entry["train"]["skipped_files"] == 0  # a stream names no files


def test_an_epoch_of_shards_is_one_pass_over_its_pairs(data):
    """With samples_per_epoch (train.py always sets it) each round's shuffle buffers drain at its end, so an epoch
    of one process is every pair once (before that fix, buffers drew across rounds: 34 distinct pairs of 48)."""
    tokenizer = load_tokenizer(str(data["text0"]))
    loader = shards_module.shard_loader(data["shards"], image_transform(32), PairCollate(tokenizer, 32), PAIRS,
                                        samples_per_epoch=PAIRS, min_size=32)  # as train.py with 1 process
    (batch,) = list(loader)
    pairs = Counter(zip(batch["image_ids"].tolist(), map(tuple, batch["input_ids"].tolist()), strict=True))
    assert len(pairs) == PAIRS and set(pairs.values()) == {1}


def test_a_checkpoint_that_holds_every_gpus_rng_state_restores_this_processs(monkeypatch):
    # checkpoints written before each process saved only its own GPU's state hold a list of them
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: restored.append(s))
    saved = rng_state()
    states = [torch.full((4,), k, dtype=torch.uint8) for k in range(3)]
    set_rng_state({**saved, "cuda": states})
    set_rng_state({**saved, "cuda": states[2]})  # as saved now: this process's GPU only
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)  # resumed on a machine with more GPUs
    set_rng_state({**saved, "cuda": states})
    assert [s.tolist() for s in restored] == [[1] * 4, [2] * 4, [0] * 4]
