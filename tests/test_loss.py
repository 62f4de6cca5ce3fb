import math

import pytest
import torch
import torch.nn.functional as F

from loss import ContrastiveLoss


def logsumexp(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def test_loss_matches_hand_computed_value():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = F.normalize(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), dim=-1)
    scale = torch.tensor(2.0)
    # logits = 2 * img @ txt.T = [[sqrt2, 0], [sqrt2, 2]]
    r = math.sqrt(2)
    rows = (logsumexp([r, 0]) - r) / 2 + (logsumexp([r, 2]) - 2) / 2
    cols = (logsumexp([r, r]) - r) / 2 + (logsumexp([0, 2]) - 2) / 2
    out = ContrastiveLoss()(img, txt, scale)
    assert out["loss"].item() == pytest.approx(rows + cols, abs=1e-6)
    assert out["loss_i2t"].item() == pytest.approx(rows, abs=1e-6)
    assert out["acc_i2t"].item() == 1.0  # row 0: sqrt2 > 0; row 1: 2 > sqrt2
    assert out["acc_t2i"].item() == 1.0  # column 0 ties (argmax takes the first, row 0); column 1: 2 > 0


def test_same_image_captions_are_not_negatives():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(3, 4), dim=-1)
    txt = F.normalize(torch.randn(3, 4), dim=-1)
    scale = torch.tensor(5.0)
    logits = (scale * img @ txt.t()).tolist()
    ids = torch.tensor([7, 7, 9])  # pairs 0 and 1 share an image
    # Row i's softmax leaves out the other same-image column; likewise for columns.
    allowed = {0: [0, 2], 1: [1, 2], 2: [0, 1, 2]}
    rows = sum(logsumexp([logits[i][j] for j in allowed[i]]) - logits[i][i] for i in range(3)) / 3
    cols = sum(logsumexp([logits[j][i] for j in allowed[i]]) - logits[i][i] for i in range(3)) / 3
    masked = ContrastiveLoss()(img, txt, scale, ids)["loss"].item()
    assert masked == pytest.approx(rows + cols, abs=1e-5)
    unmasked = ContrastiveLoss()(img, txt, scale, torch.tensor([0, 1, 2]))["loss"].item()
    assert unmasked == pytest.approx(ContrastiveLoss()(img, txt, scale)["loss"].item(), abs=1e-6)
    assert masked < unmasked  # fewer negatives in the denominators


def test_loss_gradient_flows_to_both_towers_and_scale():
    img = torch.randn(4, 8, requires_grad=True)
    txt = torch.randn(4, 8, requires_grad=True)
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    out = ContrastiveLoss()(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), log_scale.exp())
    out["loss"].backward()
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0 and log_scale.grad.abs() > 0
