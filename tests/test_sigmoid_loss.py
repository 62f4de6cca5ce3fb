"""SigLIP's sigmoid loss: its value on a hand-made batch, its gradients, and the same loss and updates whether
computed in one process, in two, or with gradient caching."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from engine.step import cached_step, plain_step
from loss import ContrastiveLoss, SigmoidLoss, make_loss
from tests.helpers import B, NoScaler, assert_same, gloo_group, grads, spawn_into, tiny_batch, tiny_model

NO_AMP = torch.autocast("cpu", enabled=False)


def softplus(x):
    return math.log1p(math.exp(x))


def hand_batch():
    """Three pairs; pairs 0 and 1 are two captions of image 5, pair 2 is image 8."""
    img = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    txt = torch.tensor([[0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    return img, txt, torch.tensor([5, 5, 8])


def test_loss_matches_hand_computed_value():
    img, txt, ids = hand_batch()
    out = SigmoidLoss(init_bias=-1.0)(img, txt, torch.tensor(2.0), ids)
    # sims = img @ txt.T = [[.8, .6, 0], [1, .96, .6], [.6, .8, 1]]; z = 2 * sims - 1:
    z = [[0.6, 0.2, -1.0], [1.0, 0.92, 0.2], [0.2, 0.6, 1.0]]
    y = [[1, 1, -1], [1, 1, -1], [-1, -1, 1]]  # (0, 1) and (1, 0) show image 5 too: positives
    # -log sigmoid(yz) = softplus(-yz), summed over all nine pairs and divided by the batch size
    want = sum(softplus(-y[i][j] * z[i][j]) for i in range(3) for j in range(3)) / 3
    assert out["loss"].item() == pytest.approx(want, abs=1e-6)
    # Row 1 scores caption 0 (also image 5) above its own caption 1: not a miss, as in ContrastiveLoss.
    assert out["acc_i2t"].item() == 1.0 and out["acc_t2i"].item() == 1.0
    alone = SigmoidLoss(init_bias=-1.0)(img, txt, torch.tensor(2.0), torch.tensor([0, 1, 2]))
    # Flipping the labels of (0, 1) and (1, 0) changes softplus(-z) into softplus(z), i.e. the loss by +z each.
    assert alone["loss"].item() - out["loss"].item() == pytest.approx((0.2 + 1.0) / 3, abs=1e-6)
    assert alone["acc_i2t"].item() == pytest.approx(2 / 3) and alone["acc_t2i"].item() == pytest.approx(2 / 3)
    no_ids = SigmoidLoss(init_bias=-1.0)(img, txt, torch.tensor(2.0))
    assert no_ids["loss"].item() == pytest.approx(alone["loss"].item(), abs=1e-7)


def test_gradients_reach_features_scale_and_bias():
    torch.manual_seed(0)
    n = 6
    img = F.normalize(torch.randn(n, 8), dim=-1).requires_grad_(True)
    txt = F.normalize(torch.randn(n, 8), dim=-1).requires_grad_(True)
    log_scale = torch.tensor(math.log(10.0), requires_grad=True)
    ids = torch.tensor([0, 1, 1, 2, 3, 3])
    loss_fn = SigmoidLoss(init_bias=-4.0)
    loss_fn(img, txt, log_scale.exp(), ids)["loss"].backward()
    # By hand: dL/dz_ij = -y_ij sigmoid(-y_ij z_ij) / N, and z = s * img @ txt.T + b.
    with torch.no_grad():
        sims = img @ txt.t()
        y = (ids[:, None] == ids[None, :]).float() * 2 - 1
        dz = -y * torch.sigmoid(-y * (10.0 * sims - 4.0)) / n  # (N, N)
        assert loss_fn.bias.grad.item() == pytest.approx(dz.sum().item(), abs=1e-6)
        assert log_scale.grad.item() == pytest.approx(10.0 * (dz * sims).sum().item(), abs=1e-5)
        assert torch.allclose(img.grad, 10.0 * dz @ txt, atol=1e-6)
        assert torch.allclose(txt.grad, 10.0 * dz.t() @ img, atol=1e-6)
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0 and loss_fn.bias.grad.abs() > 0


def test_make_loss_names_the_choices():
    assert type(make_loss("infonce", 1, 4)) is ContrastiveLoss and make_loss("infonce", 1, 4).world_size == 4
    sig = make_loss("sigmoid")
    assert type(sig) is SigmoidLoss and sig.bias.item() == -10.0
    assert [n for n, _ in sig.named_parameters()] == ["bias"]
    with pytest.raises(ValueError, match="unknown loss 'siglip'; use one of: infonce, sigmoid"):
        make_loss("siglip")


# ------------------------------------------------------------------ two processes against one

N_FEAT = 8
FEAT_IDS = torch.tensor([0, 1, 1, 2, 3, 4, 0, 5])  # image 0 has a caption on each process


def feature_batch():
    g = torch.Generator().manual_seed(3)
    return (F.normalize(torch.randn(N_FEAT, 16, generator=g), dim=-1),
            F.normalize(torch.randn(N_FEAT, 16, generator=g), dim=-1))


def feature_grads(img, txt, ids, rank=0, world_size=1):
    img, txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    scale = torch.tensor(5.0, requires_grad=True)
    loss_fn = SigmoidLoss(rank, world_size, init_bias=-3.0)
    out = loss_fn(img, txt, scale, ids)
    out["loss"].backward()
    return {"loss": out["loss"].detach(), "acc_i2t": out["acc_i2t"], "img": img.grad, "txt": txt.grad,
            "scale": scale.grad, "bias": loss_fn.bias.grad}


def test_two_processes_give_the_loss_and_gradients_of_one(two_processes):
    img, txt = feature_batch()
    one = feature_grads(img, txt, FEAT_IDS)
    ranks = [torch.load(two_processes / f"features.{r}") for r in range(2)]
    for r, got in enumerate(ranks):
        assert got["loss"].item() == pytest.approx(one["loss"].item(), abs=1e-6)
        assert got["acc_i2t"].item() == one["acc_i2t"].item()
        # Parameters outside DDP: every process already holds the whole batch's gradient.
        assert got["bias"].item() == pytest.approx(one["bias"].item(), abs=1e-6)
        assert got["scale"].item() == pytest.approx(one["scale"].item(), abs=1e-6)
        # Features: the gather's backward sums the slice's gradient over the 2 processes, twice the true one;
        # DDP's averaging of the model's gradients divides it back out.
        part = slice(r * N_FEAT // 2, (r + 1) * N_FEAT // 2)
        assert torch.allclose(got["img"], 2 * one["img"][part], atol=1e-6)
        assert torch.allclose(got["txt"], 2 * one["txt"][part], atol=1e-6)
    assert torch.equal(ranks[0]["bias"], ranks[1]["bias"])  # bit for bit: no all-reduce needed to agree
    assert one["bias"].abs() > 1e-3 and one["img"].abs().sum() > 1e-3


# ------------------------------------------------------------------ a training step on the tiny model

def sgd(model, loss_fn):
    # SGD: the update is linear in the gradient, so equal gradients give equal weights (see test_scaling).
    return torch.optim.SGD(list(model.parameters()) + list(loss_fn.parameters()), lr=0.5)


def test_gradcache_equals_full_batch_with_bias(tiny_data):
    batch = tiny_batch(tiny_data / "text")
    model = tiny_model(tiny_data / "text", dropout=0.0)
    plain_loss = SigmoidLoss()
    full = plain_step(model, plain_loss, batch, NO_AMP, NoScaler())
    g_full = grads(model)
    model.zero_grad()
    cached_loss = SigmoidLoss()
    cached = cached_step(model, cached_loss, batch, 4, NO_AMP, NoScaler())
    assert cached["loss"].item() == pytest.approx(full["loss"].item(), abs=1e-5)
    assert_same(g_full, grads(model))
    assert "log_scale" in g_full
    assert cached_loss.bias.grad.item() == pytest.approx(plain_loss.bias.grad.item(), abs=1e-6)
    assert plain_loss.bias.grad.abs() > 1e-3


def model_step(rank, world_size, text_dir, micro):
    """One step of the tiny model with the sigmoid loss on this process's half of the batch, through DDP."""
    model = tiny_model(text_dir, dropout=0.0)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    local = {k: v[rank * B // world_size:(rank + 1) * B // world_size] for k, v in tiny_batch(text_dir).items()}
    loss_fn = SigmoidLoss(rank, world_size)
    opt = sgd(model, loss_fn)
    if micro:
        out = cached_step(ddp, loss_fn, local, micro, NO_AMP, NoScaler())
    else:
        out = plain_step(ddp, loss_fn, local, NO_AMP, NoScaler())
    opt.step()  # the bias gradient as it is on this process: no all-reduce
    return out["loss"].item(), model.state_dict(), loss_fn.state_dict()


MICRO = (None, 4)


def worker(rank, world_size, port, text_dir, result_dir):
    """Everything the two-process tests compare, in one pair of processes (starting one costs seconds): the
    loss on fixed features, then a step of the tiny model without and with gradient caching."""
    with gloo_group(rank, world_size, port):
        img, txt = feature_batch()
        part = slice(rank * N_FEAT // world_size, (rank + 1) * N_FEAT // world_size)
        torch.save(feature_grads(img[part], txt[part], FEAT_IDS[part], rank, world_size),
                   os.path.join(result_dir, f"features.{rank}"))
        torch.set_num_threads(1)
        for micro in MICRO:
            torch.save(model_step(rank, world_size, text_dir, micro),
                       os.path.join(result_dir, f"model-{micro}.{rank}"))


@pytest.fixture(scope="module")
def two_processes(tiny_data, tmp_path_factory):
    """The folder of what `worker` saved, one file per rank and check."""
    return spawn_into(tmp_path_factory.mktemp("sigmoid-two-processes"), worker, tiny_data / "text")


@pytest.mark.parametrize("micro", MICRO)
def test_two_processes_update_model_and_bias_as_one(tiny_data, micro, two_processes):
    text_dir = tiny_data / "text"
    model = tiny_model(text_dir, dropout=0.0)
    loss_fn = SigmoidLoss()
    opt = sgd(model, loss_fn)
    out = plain_step(model, loss_fn, tiny_batch(text_dir), NO_AMP, NoScaler())
    opt.step()
    assert loss_fn.bias.item() != -10.0
    for r in range(2):
        loss, state, loss_state = torch.load(two_processes / f"model-{micro}.{r}")
        assert loss == pytest.approx(out["loss"].item(), abs=1e-5)
        assert loss_state["bias"].item() == pytest.approx(loss_fn.bias.item(), abs=1e-6)
        for k, v in model.state_dict().items():
            assert torch.allclose(v, state[k], atol=1e-5), k
