"""More negatives than the batch holds: the feature queue, its momentum towers and VSE++'s hard-negative hinge.
Values against hand computations; the queue and the towers against one process, against the plain step under
gradient caching, and across a save and a resume."""
import math

import pytest
import torch
import torch.nn.functional as F

from engine.momentum import MomentumTowers
from loss import ContrastiveLoss, FeatureQueue, make_loss
from tests.helpers import B, tiny_batch, tiny_model

NO_AMP = torch.autocast("cpu", enabled=False)


def lse(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------ values by hand

def test_queue_adds_negatives_but_never_the_same_image():
    img = [[1.0, 0.0], [0.0, 1.0]]
    txt = [[0.8, 0.6], [0.6, 0.8]]
    ids = [7, 8]
    q_img = [[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]]
    q_txt = [[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]]
    q_ids = [7, 9, 8]  # queued pair 0 shows image 7 (batch pair 0's), queued pair 2 image 8 (batch pair 1's)
    loss_fn = ContrastiveLoss(queue_size=4, dim=2)
    loss_fn.queue.push(torch.tensor(q_img), torch.tensor(q_txt), torch.tensor(q_ids))
    s = 3.0
    i2t = t2i = 0.0
    for i in range(2):
        # image i against both batch captions and the queued captions of other images; caption i likewise
        rows = [s * dot(img[i], t) for t in txt] + [s * dot(img[i], q_txt[k]) for k in range(3) if q_ids[k] != ids[i]]
        cols = [s * dot(txt[i], m) for m in img] + [s * dot(txt[i], q_img[k]) for k in range(3) if q_ids[k] != ids[i]]
        i2t += (lse(rows) - s * dot(img[i], txt[i])) / 2
        t2i += (lse(cols) - s * dot(img[i], txt[i])) / 2
    out = loss_fn(torch.tensor(img), torch.tensor(txt), torch.tensor(s), torch.tensor(ids))
    assert out["loss_i2t"].item() == pytest.approx(i2t, abs=1e-6)
    assert out["loss_t2i"].item() == pytest.approx(t2i, abs=1e-6)
    # image 1 scores queued caption 1 (image 9) at 1.0, above its own caption's .8: a miss; caption 1 likewise
    # queued image 0 (image 7). Caption 0 would miss too (queued image 0 scores .96 against .8), but that one
    # shows its own image 7 and is left out.
    assert out["acc_i2t"].item() == 0.5 and out["acc_t2i"].item() == 0.5
    plain = ContrastiveLoss()(torch.tensor(img), torch.tensor(txt), torch.tensor(s), torch.tensor(ids))
    assert out["loss"].item() > plain["loss"].item() + 0.5  # the queue did add negatives


def test_queue_keeps_the_last_pairs_and_waits_for_its_warmup():
    q = FeatureQueue(size=3, dim=1, warmup=2)
    for step in range(3):  # pairs 0-1, 2-3, 4-5
        feats = torch.tensor([[2.0 * step], [2.0 * step + 1]])
        q.push(feats, -feats, torch.tensor([2 * step, 2 * step + 1]))
        if step == 0:
            assert q.negatives() is None  # one push of a warm-up of two
    images, texts, ids = q.negatives()
    # a ring of 3 slots after 6 pairs: slots hold pairs 3, 4, 5 in the order they were overwritten
    assert images.flatten().tolist() == [3.0, 4.0, 5.0] and texts.flatten().tolist() == [-3.0, -4.0, -5.0]
    assert ids.tolist() == [3, 4, 5] and int(q.head) == 0 and int(q.filled) == 3 and int(q.pushes) == 3
    q.push(torch.arange(5.0)[:, None], torch.zeros(5, 1), torch.arange(5))  # longer than the queue: its tail stays
    assert q.negatives()[0].flatten().tolist() == [2.0, 3.0, 4.0]


def test_a_warming_queue_gives_exactly_the_plain_loss():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    ids = torch.tensor([0, 0, 1, 2])
    loss_fn = ContrastiveLoss(queue_size=8, dim=8, queue_warmup=5)
    loss_fn.enqueue(torch.randn(4, 8), torch.randn(4, 8), torch.tensor([3, 4, 5, 6]))
    warming = loss_fn(img, txt, torch.tensor(10.0), ids)
    plain = ContrastiveLoss()(img, txt, torch.tensor(10.0), ids)
    for k in plain:
        assert torch.equal(warming[k], plain[k]), k


def hinge_batch():
    """Three pairs; pairs 0 and 1 are two captions of image 5, pair 2 is image 8 (sims in the comments below)."""
    img = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    txt = torch.tensor([[0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    return img, txt, torch.tensor([5, 5, 8])


def test_max_violation_hinge_matches_hand_computation():
    img, txt, ids = hinge_batch()
    # sims = img @ txt.T = [[.8, .6, 0], [1, .96, .6], [.6, .8, 1]]; true pairs .8, .96, 1; margin .5.
    # image 0: its negative is caption 2 only (caption 1 shows image 5 too): [.5 - .8 + 0]+ = 0
    # image 1: caption 2: [.5 - .96 + .6]+ = .14;  image 2: hardest of captions 0, 1: [.5 - 1 + .8]+ = .3
    # caption 0: image 2: [.5 - .8 + .6]+ = .3;  caption 1: image 2: [.5 - .96 + .8]+ = .34
    # caption 2: hardest of images 0, 1: [.5 - 1 + .6]+ = .1
    want = (0 + 0.14 + 0.3) / 3 + (0.3 + 0.34 + 0.1) / 3
    out = ContrastiveLoss(hard_weight=2.0, hard_margin=0.5)(img, txt, torch.tensor(4.0), ids)
    plain = ContrastiveLoss()(img, txt, torch.tensor(4.0), ids)
    assert out["loss_hard"].item() == pytest.approx(want, abs=1e-6)
    assert out["loss"].item() == pytest.approx(plain["loss"].item() + 2.0 * want, abs=1e-6)
    # without ids caption 1 is a negative of image 0 ([.5 - .8 + .6]+ = .3) and image 1 one of caption 0
    # ([.5 - .8 + 1]+ = .7); image 1's hardest becomes caption 0 ([.5 - .96 + 1]+ = .54), caption 1's image 0 (.14)
    no_ids = ContrastiveLoss(hard_weight=2.0, hard_margin=0.5)(img, txt, torch.tensor(4.0))
    assert no_ids["loss_hard"].item() == pytest.approx((0.3 + 0.54 + 0.3) / 3 + (0.7 + 0.34 + 0.1) / 3, abs=1e-6)


def hinge_gradients(hard_weight):
    img, txt, ids = hinge_batch()
    img, txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    loss_fn = ContrastiveLoss(queue_size=2, dim=2, hard_weight=hard_weight, hard_margin=0.5)
    # queued pair 0 shows image 9 (a negative of every pair), queued pair 1 image 5 (a negative of pair 2 only)
    loss_fn.queue.push(torch.tensor([[0.6, 0.8], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]),
                       torch.tensor([9, 5]))
    out = loss_fn(img, txt, torch.tensor(4.0), ids)
    out["loss"].backward()
    return out, img.grad, txt.grad


def test_hinge_reaches_into_the_queue_and_pushes_only_the_hardest_negatives():
    out, g_img, g_txt = hinge_gradients(1.0)
    # image 0: queued caption [1, 0] scores 1 (caption 2: 0): [.5 - .8 + 1]+ = .7
    # image 1: queued caption .8 beats caption 2's .6: [.5 - .96 + .8]+ = .34; image 2: caption 1 (.8): .3
    # caption 0: queued image [.6, .8] scores .96 (image 2: .6): .66; caption 1: queued image 1.0: .54;
    # caption 2: queued image .8 (image 1: .6): .3. Queued pair 1 (image 5) is hardest for nobody.
    assert out["loss_hard"].item() == pytest.approx((0.7 + 0.34 + 0.3) / 3 + (0.66 + 0.54 + 0.3) / 3, abs=1e-6)
    # The hinge's own gradient (that of hard_weight 1 less that of 0): each term moves its true pair and its
    # single hardest negative, e.g. image 0 gets (queued caption - caption 0) from its row and -caption 0 from
    # caption 0's column; queued features are constants.
    _, p_img, p_txt = hinge_gradients(0.0)
    want_img = torch.tensor([[-0.6, -1.2], [-0.2, -1.6], [0.6, -1.2]]) / 3
    want_txt = torch.tensor([[-1.4, 0.8], [-1.0, 0.6], [0.6, -1.2]]) / 3
    assert torch.allclose(g_img - p_img, want_img, atol=1e-6)
    assert torch.allclose(g_txt - p_txt, want_txt, atol=1e-6)


def test_make_loss_passes_the_options_and_refuses_them_for_sigmoid():
    loss_fn = make_loss("infonce", 0, 1, queue_size=6, dim=4, queue_warmup=2, hard_weight=0.5, hard_margin=0.1)
    assert loss_fn.queue.images.shape == (6, 4) and loss_fn.queue.warmup == 2 and loss_fn.hard_weight == 0.5
    assert make_loss("infonce").queue is None and make_loss("infonce").state_dict() == {}  # old checkpoints fit
    with pytest.raises(ValueError, match="queue_size work with loss infonce only"):
        make_loss("sigmoid", queue_size=6, dim=4, hard_margin=0.2)
    with pytest.raises(ValueError, match="size >= 1, the feature width"):
        make_loss("infonce", queue_size=6)  # no dim


def test_momentum_towers_move_by_the_average_and_stay_in_eval_mode(tiny_data):
    model = tiny_model(tiny_data / "text", dropout=0.1)
    towers = MomentumTowers(model, 0.75)
    assert not any(p.requires_grad for p in towers.parameters())
    before = {k: v.clone() for k, v in towers.towers.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
        model.image.trunk.bn1.running_mean.fill_(3.0)
    towers.train()  # as an epoch loop's model.train() might: the copies stay in eval mode
    towers.update(model)
    now = towers.towers.state_dict()
    w = "image.proj.weight"
    assert torch.allclose(now[w], before[w] + 0.0025, atol=1e-7)  # 0.75 * old + 0.25 * (old + 0.01)
    assert torch.equal(now["image.trunk.bn1.running_mean"], torch.full_like(now["image.trunk.bn1.running_mean"], 3))
    assert not towers.training and not any(m.training for m in towers.modules())
    batch = tiny_batch(tiny_data / "text")
    whole, chunked = towers.encode(batch, NO_AMP), towers.encode(batch, NO_AMP, micro=4)
    assert whole[0].shape == (B, model.dim) and torch.allclose(whole[0], chunked[0], atol=1e-5)
    assert torch.equal(whole[1], towers.encode(batch, NO_AMP)[1])  # no dropout: the same features twice
