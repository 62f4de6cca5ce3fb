"""The feature queue and momentum towers over several training steps: gradient caching gives the plain step's
gradients and queue, two gloo processes give one process's loss, update and queue, and a save and resume
through torch.load(weights_only=True) continues exactly."""
import io

import pytest
import torch
import torch.nn.functional as F

from engine.momentum import MomentumTowers
from engine.step import cached_step, plain_step
from loss import ContrastiveLoss
from tests.helpers import B, NoScaler, assert_same, gloo_group, grads, spawn, tiny_batch, tiny_model

NO_AMP = torch.autocast("cpu", enabled=False)
QUEUE = 24  # one and a half batches: the ring wraps on the second push


def step_batch(text_dir, k):
    """Step k's batch: new images, and image ids shifted by 4, so half of them were in the previous batch."""
    batch = tiny_batch(text_dir)
    batch["images"] = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(100 + k))
    batch["image_ids"] = batch["image_ids"] + 4 * k
    return batch


def build(text_dir, momentum, rank=0, world_size=1, queue=QUEUE):
    model = tiny_model(text_dir, dropout=0.0)
    loss_fn = ContrastiveLoss(rank, world_size, queue_size=queue, dim=model.dim, hard_weight=0.5)
    towers = MomentumTowers(model, momentum) if momentum is not None else None
    # a small rate keeps the tiny model away from collapse over the steps compared (its gradients stay large);
    # momentum: optimizer state for the resume to restore too
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, loss_fn, towers, opt


def run(model, loss_fn, towers, opt, text_dir, steps, micro=None, ddp=None, rank=0, world_size=1):
    """Train `steps` (a range of step numbers); returns each step's loss and gradients."""
    history = []
    for k in steps:
        batch = step_batch(text_dir, k)
        part = slice(rank * B // world_size, (rank + 1) * B // world_size)
        batch = {n: v[part] for n, v in batch.items()}
        opt.zero_grad()
        net = ddp or model
        if micro:
            out = cached_step(net, loss_fn, batch, micro, NO_AMP, NoScaler(), momentum=towers)
        else:
            out = plain_step(net, loss_fn, batch, NO_AMP, NoScaler(), momentum=towers)
        history.append((out["loss"].item(), grads(model)))
        opt.step()
    return history


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_gradcache_gives_the_plain_steps_gradients_and_queue(tiny_data, momentum):
    text_dir = tiny_data / "text"
    plain, cached = build(text_dir, momentum), build(text_dir, momentum)
    h_plain = run(*plain, text_dir, range(3))
    h_cached = run(*cached, text_dir, range(3), micro=4)
    for (loss_p, g_p), (loss_c, g_c) in zip(h_plain, h_cached, strict=True):
        assert loss_c == pytest.approx(loss_p, abs=1e-5)
        assert_same(g_p, g_c)
    for k, v in plain[1].state_dict().items():
        assert torch.allclose(v, cached[1].state_dict()[k], atol=1e-5), k
    assert int(plain[1].queue.filled) == QUEUE and int(plain[1].queue.pushes) == 3
    if momentum is not None:
        for k, v in plain[2].state_dict().items():
            assert torch.allclose(v, cached[2].state_dict()[k], atol=1e-5), k
    # the queue changed the loss: the same steps without it score otherwise from the second step on
    no_queue = build(text_dir, None, queue=0)
    h_none = run(*no_queue, text_dir, range(3))
    assert h_none[0][0] == pytest.approx(h_plain[0][0], abs=1e-6)  # step 0: the queue is still empty
    assert abs(h_none[1][0] - h_plain[1][0]) > 1e-3


@pytest.fixture(scope="module")
def two_steps(tiny_data):
    """(model, loss, momentum towers, optimizer) after steps 0 and 1 with momentum 0.9, in this process: what three
    tests below start from or compare with. They only read it (a change would show as a mismatch there)."""
    text_dir = tiny_data / "text"
    trained = build(text_dir, 0.9)
    losses = [h[0] for h in run(*trained, text_dir, range(2))]
    return trained, losses


def test_momentum_queue_holds_the_average_towers_features(tiny_data, two_steps):
    text_dir = tiny_data / "text"
    (model, loss_fn, towers, _), _ = two_steps
    # step 1 moved the towers (towards the weights step 0 left) and queued their features of batch 1, after
    # batch 0's 16 pairs: slots 16-23 and, wrapped, 0-7
    img, txt = towers.encode(step_batch(text_dir, 1), NO_AMP)
    q = loss_fn.queue
    assert torch.equal(q.images[16:], img[:8]) and torch.equal(q.images[:8], img[8:])
    assert torch.equal(q.texts[16:], txt[:8]) and q.ids[:8].tolist() == [8, 8, 9, 9, 10, 10, 11, 11]
    trained = model.encode_image(step_batch(text_dir, 1)["images"][:8])
    assert not torch.allclose(trained, q.images[16:], atol=1e-3)  # not the trained towers' features


def save_and_load(module):
    """A module's state through a file, read back as torch.load(weights_only=True) reads a checkpoint."""
    f = io.BytesIO()
    torch.save(module.state_dict(), f)
    f.seek(0)
    return torch.load(f, weights_only=True)


def test_resume_continues_exactly(tiny_data, two_steps):
    text_dir = tiny_data / "text"
    straight = build(text_dir, 0.9)
    h_straight = run(*straight, text_dir, range(4))
    first, _ = two_steps  # steps 0 and 1
    saved = [save_and_load(m) for m in first]  # model, loss (with its queue), momentum towers, optimizer
    resumed = build(text_dir, 0.9)
    with torch.no_grad():  # fresh objects that differ from the saved ones until loaded
        next(resumed[0].parameters()).add_(1.0)
    for obj, state in zip(resumed, saved, strict=True):
        obj.load_state_dict(state)
    h_resumed = run(*resumed, text_dir, range(2, 4))
    assert [h[0] for h in h_resumed] == [h[0] for h in h_straight[2:]]
    for a, b in zip(straight[:3], resumed[:3], strict=True):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert int(resumed[1].queue.pushes) == 4


# ------------------------------------------------------------------ two processes against one

def feature_steps(rank=0, world_size=1):
    """Three steps of loss, backward and push on fixed features; the loss, feature gradients and queue."""
    g = torch.Generator().manual_seed(3)
    loss_fn = ContrastiveLoss(rank, world_size, queue_size=10, dim=16, hard_weight=0.5)
    part = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
    out = []
    for k in range(3):
        img = F.normalize(torch.randn(8, 16, generator=g), dim=-1)[part].requires_grad_(True)
        txt = F.normalize(torch.randn(8, 16, generator=g), dim=-1)[part].requires_grad_(True)
        ids = torch.tensor([0, 1, 1, 2, 3, 4, 0, 5])[part] + 3 * k  # image 0 + 3k on both processes
        res = loss_fn(img, txt, torch.tensor(5.0), ids)
        res["loss"].backward()
        loss_fn.enqueue(img, txt, ids)
        out.append({"loss": res["loss"].item(), "acc": res["acc_t2i"].item(), "img": img.grad, "txt": txt.grad})
    return out, loss_fn.state_dict()


def check_feature_steps(result_path):
    one, one_queue = feature_steps()
    for r in range(2):
        steps, queue = torch.load(f"{result_path}.features.{r}", weights_only=True)
        part = slice(r * 4, (r + 1) * 4)
        for got, want in zip(steps, one, strict=True):
            assert got["loss"] == pytest.approx(want["loss"], abs=1e-6) and got["acc"] == want["acc"]
            # the gather's backward sums over the 2 processes; DDP's averaging divides it back out
            assert torch.allclose(got["img"], 2 * want["img"][part], atol=1e-6)
            assert torch.allclose(got["txt"], 2 * want["txt"][part], atol=1e-6)
        for k, v in one_queue.items():
            assert torch.equal(v, queue[k]), k  # the gathered batch, in rank order: bit for bit
    assert one[2]["loss"] != one[0]["loss"] and int(one_queue["queue.filled"]) == 10


def model_worker(rank, world_size, port, text_dir, result_path):
    with gloo_group(rank, world_size, port):
        torch.set_num_threads(1)
        torch.save(feature_steps(rank, world_size), f"{result_path}.features.{rank}")
        model, loss_fn, towers, opt = build(text_dir, 0.9, rank, world_size)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        history = run(model, loss_fn, towers, opt, text_dir, range(2), micro=4, ddp=ddp, rank=rank,
                      world_size=world_size)
        torch.save(([h[0] for h in history], model.state_dict(), loss_fn.state_dict(), towers.state_dict()),
                   f"{result_path}.{rank}")


def test_two_processes_keep_one_processs_queue_loss_and_update(tiny_data, two_steps, tmp_path):
    """One pair of processes for two checks: the loss on fixed features, then training with gradient caching."""
    text_dir = tiny_data / "text"
    one, losses = two_steps
    spawn(model_worker, text_dir, tmp_path / "result")
    check_feature_steps(tmp_path / "result")
    for r in range(2):
        got_losses, state, loss_state, tower_state = torch.load(f"{tmp_path / 'result'}.{r}", weights_only=True)
        assert got_losses == pytest.approx(losses, abs=1e-5)
        for mine, theirs in ((one[0].state_dict(), state), (one[1].state_dict(), loss_state),
                             (one[2].state_dict(), tower_state)):
            for k, v in mine.items():
                assert torch.allclose(v, theirs[k], atol=1e-5), k
