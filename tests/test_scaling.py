"""Gradient caching, gradient checkpointing and multi-process training give the gradients of the plain step."""
import os
import subprocess
import sys

import pytest
import torch

from engine import step as step_module
from engine.step import cached_step, plain_step
from loss import ContrastiveLoss
from tests.helpers import (
    ROOT,
    B,
    NoScaler,
    assert_same,
    free_port,
    gloo_group,
    grads,
    spawn_into,
    tiny_batch,
    tiny_model,
    tiny_train_args,
)


def chunked_reference(model, batch, micro):
    """The full-batch loss on features encoded chunk by chunk *with* graphs: same dropout draws as GradCache."""
    parts = [model(*(batch[k][s:s + micro] for k in ("images", "input_ids", "attention_mask")))
             for s in range(0, B, micro)]
    img, txt = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    out = ContrastiveLoss()(img, txt, parts[-1][2], batch["image_ids"])
    out["loss"].backward()
    return out


def test_gradcache_equals_full_batch_without_dropout(tiny_data):
    batch = tiny_batch(tiny_data / "text")
    model = tiny_model(tiny_data / "text", dropout=0.0)
    full = plain_step(model, ContrastiveLoss(), batch, torch.autocast("cpu", enabled=False), NoScaler())
    g_full = grads(model)
    model.zero_grad()
    cached = cached_step(model, ContrastiveLoss(), batch, 4, torch.autocast("cpu", enabled=False), NoScaler())
    assert cached["loss"].item() == pytest.approx(full["loss"].item(), abs=1e-5)
    assert_same(g_full, grads(model))
    assert "log_scale" in g_full  # the learnable temperature gets its gradient through the model too


def test_gradcache_replays_dropout_masks(tiny_data, monkeypatch):
    batch = tiny_batch(tiny_data / "text")
    model = tiny_model(tiny_data / "text", dropout=0.3)
    torch.manual_seed(5)
    ref = chunked_reference(model, batch, 4)
    g_ref = grads(model)
    model.zero_grad()
    torch.manual_seed(5)
    cached = cached_step(model, ContrastiveLoss(), batch, 4, torch.autocast("cpu", enabled=False), NoScaler())
    assert cached["loss"].item() == pytest.approx(ref["loss"].item(), abs=1e-5)
    assert_same(g_ref, grads(model))
    # The same step with the replay switched off: pass 2 draws new masks and the gradients differ.
    model.zero_grad()
    monkeypatch.setattr(step_module, "set_rng_state", lambda state: None)
    torch.manual_seed(5)
    cached_step(model, ContrastiveLoss(), batch, 4, torch.autocast("cpu", enabled=False), NoScaler())
    assert not all(torch.allclose(g_ref[n], p.grad, atol=1e-5) for n, p in model.named_parameters()
                   if p.grad is not None)


def test_gradcache_updates_batchnorm_statistics_once_per_chunk(tiny_data):
    batch = tiny_batch(tiny_data / "text")
    model = tiny_model(tiny_data / "text", dropout=0.0)
    model.frozen["batchnorm"] = False
    model.train()
    bn = model.image.trunk.bn1
    cached_step(model, ContrastiveLoss(), batch, 4, torch.autocast("cpu", enabled=False), NoScaler())
    assert bn.num_batches_tracked.item() == B // 4  # four chunks, counted once each (not eight)


def test_grad_checkpointing_gives_the_same_gradients(tiny_data):
    batch = tiny_batch(tiny_data / "text")
    model = tiny_model(tiny_data / "text", dropout=0.0)
    plain_step(model, ContrastiveLoss(), batch, torch.autocast("cpu", enabled=False), NoScaler())
    g_plain = grads(model)
    model.zero_grad()
    model.set_grad_checkpointing(True)
    plain_step(model, ContrastiveLoss(), batch, torch.autocast("cpu", enabled=False), NoScaler())
    assert_same(g_plain, grads(model))


def ddp_step(rank, world_size, text_dir, micro):
    """One SGD step of the tiny model on this process's half of the batch, through DDP."""
    model = tiny_model(text_dir, dropout=0.0)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    batch = tiny_batch(text_dir)
    local = {k: v[rank * B // world_size:(rank + 1) * B // world_size] for k, v in batch.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_fn = ContrastiveLoss(rank, world_size)
    amp = torch.autocast("cpu", enabled=False)
    if micro:
        out = cached_step(ddp, loss_fn, local, micro, amp, NoScaler())
    else:
        out = plain_step(ddp, loss_fn, local, amp, NoScaler())
    opt.step()
    return out["loss"].item(), model.state_dict()


MICRO = (None, 4)


def ddp_worker(rank, world_size, port, text_dir, result_dir):
    """The step without and with gradient caching, in one pair of processes (starting one costs seconds)."""
    with gloo_group(rank, world_size, port):
        torch.set_num_threads(1)
        for micro in MICRO:
            result = ddp_step(rank, world_size, text_dir, micro)
            if rank == 0:
                torch.save(result, os.path.join(result_dir, f"rank0-{micro}.pt"))


@pytest.fixture(scope="module")
def two_processes(tiny_data, tmp_path_factory):
    """The folder of rank 0's loss and weights after the step, one file per micro-batch setting."""
    return spawn_into(tmp_path_factory.mktemp("scaling-two-processes"), ddp_worker, tiny_data / "text")


@pytest.mark.parametrize("micro", MICRO)
def test_two_processes_match_one_process(tiny_data, micro, two_processes):
    text_dir = tiny_data / "text"
    model = tiny_model(text_dir, dropout=0.0)
    # SGD: the update is linear in the gradient. (Adam's first step divides by |g|, so rounding noise in
    # near-zero gradients would show up as lr-sized differences.)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = plain_step(model, ContrastiveLoss(), tiny_batch(text_dir), torch.autocast("cpu", enabled=False),
                     NoScaler())
    opt.step()
    loss, state = torch.load(two_processes / f"rank0-{micro}.pt")
    assert loss == pytest.approx(out["loss"].item(), abs=1e-5)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, state[k], atol=1e-5), k


def test_torchrun_two_processes_train_and_resume(tiny_data, tmp_path):
    """End to end: 2 CPU processes (gloo) train, write a checkpoint, and resume from it."""
    def torchrun(*extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), os.path.join(ROOT, "train.py"),
               *tiny_train_args(tiny_data, tmp_path, "--epochs", "1", *extra)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)

    first = torchrun("--epochs", "1")
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("epoch 0: loss") == 1  # rank 0 alone prints
    ckpt = torch.load(tmp_path / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 0 and len(ckpt["rng"]) == 2 and ckpt["step"] == 40 // 8  # 4 images held out
    second = torchrun("--epochs", "2", "--load-checkpoint", "true", "--load-path", str(tmp_path / "last.pt"))
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout
    assert torch.load(tmp_path / "last.pt", weights_only=False)["epoch"] == 1
    odd = torchrun("--batch-size", "7")
    assert odd.returncode != 0 and "batch-size 7 does not divide over 2 processes" in odd.stderr
