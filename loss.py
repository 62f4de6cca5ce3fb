"""Losses over a batch of image-caption pairs, optionally gathered across processes: symmetric InfoNCE, and
SigLIP's pairwise sigmoid loss."""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each process the summed gradient of its own slice.

    Every process computes the same global loss, so the slice's gradient summed over processes is
    world_size times the true one; DistributedDataParallel's averaging divides that back out, and the
    update equals a single process's on the whole batch.
    """

    @staticmethod
    def forward(ctx, x):  # (b, D) -> (world_size * b, D)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather(x, world_size):
    """Concatenate `x` from every process along dim 0, in rank order, keeping gradients; `x` when alone."""
    if world_size == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_ids(ids, world_size):
    if world_size == 1:
        return ids
    out = [torch.empty_like(ids) for _ in range(world_size)]
    dist.all_gather(out, ids)
    return torch.cat(out, dim=0)


def _other_positives(image_ids, world_size):
    """(N, N) bool: pair i's image also appears in pair j (j != i); None without ids (only the diagonal)."""
    if image_ids is None:
        return None
    ids = gather_ids(image_ids, world_size)  # (N,)
    same = ids[:, None] == ids[None, :]
    same.fill_diagonal_(False)
    return same


def _accuracy(logits):
    """Share of images (rows) and of captions (columns) whose true pair scores highest. `logits` must already
    have the other same-image entries at -inf, so a second caption of the image is not counted as a miss."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return (logits.argmax(dim=1) == target).float().mean(), (logits.argmax(dim=0) == target).float().mean()


class ContrastiveLoss(nn.Module):
    """Cross-entropy over rows (image -> text) plus cross-entropy over columns (text -> image).

    `image_ids` says which pairs share an image: two captions of one image in the same batch are not each
    other's negatives, so the other same-image entries of a row (or column) are left out of its softmax.
    """

    def __init__(self, rank=0, world_size=1):
        super().__init__()
        self.rank = rank
        self.world_size = world_size

    def forward(self, image_features, text_features, logit_scale, image_ids=None):
        img = gather(image_features, self.world_size)  # (N, D), N = global batch
        txt = gather(text_features, self.world_size)  # (N, D)
        logits = logit_scale * img @ txt.t()  # (N, N): row i = image i against every caption
        n = logits.shape[0]
        target = torch.arange(n, device=logits.device)
        others = _other_positives(image_ids, self.world_size)  # the true pair stays in its softmax
        if others is not None:
            logits = logits.masked_fill(others, float("-inf"))
        loss_i2t = F.cross_entropy(logits, target)
        loss_t2i = F.cross_entropy(logits.t(), target)
        with torch.no_grad():
            acc_i2t, acc_t2i = _accuracy(logits)
        return {"loss": loss_i2t + loss_t2i, "loss_i2t": loss_i2t.detach(), "loss_t2i": loss_t2i.detach(),
                "acc_i2t": acc_i2t, "acc_t2i": acc_t2i}


class SigmoidLoss(nn.Module):
    """SigLIP's loss (Zhai et al. 2023): every image-caption pair of the global batch is its own binary problem.

    Pair (i, j) is positive when image i and caption j show the same image (the diagonal, and other captions of
    the same image), negative otherwise; loss = -sum log sigmoid(label * (scale * sim + bias)) / N. There is
    no softmax, so no row or column normalisation couples the pairs.

    The module owns the learnable bias; the logit scale stays in the model. The paper starts from scale 10
    (temperature 0.1) and bias -10: with N - 1 negatives per positive, a strongly negative bias makes the first
    steps agree with the prior that almost every pair is negative, instead of spending them pushing it there.

    Every process computes the same global loss, so the bias gradient is the same on every process and is
    already the whole batch's: it must not be summed across processes.
    """

    def __init__(self, rank=0, world_size=1, init_bias=-10.0):
        super().__init__()
        self.rank = rank
        self.world_size = world_size
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))

    def forward(self, image_features, text_features, logit_scale, image_ids=None):
        img = gather(image_features, self.world_size)  # (N, D), N = global batch
        txt = gather(text_features, self.world_size)  # (N, D)
        # float32 from here: under fp16 autocast the sum runs over N^2 terms, and the bias is a 0-dim tensor,
        # which would not promote an fp16 matrix by itself.
        logits = (logit_scale * img @ txt.t()).float() + self.bias  # (N, N): row i = image i, every caption
        n = logits.shape[0]
        others = _other_positives(image_ids, self.world_size)
        positive = torch.eye(n, dtype=torch.bool, device=logits.device)
        if others is not None:
            positive = positive | others
        labels = positive.float() * 2 - 1  # (N, N): +1 same image, -1 otherwise
        loss = -F.logsigmoid(labels * logits).sum() / n
        with torch.no_grad():
            acc_i2t, acc_t2i = _accuracy(logits if others is None else logits.masked_fill(others, float("-inf")))
        return {"loss": loss, "acc_i2t": acc_i2t, "acc_t2i": acc_t2i}


LOSSES = {"infonce": ContrastiveLoss, "sigmoid": SigmoidLoss}


def make_loss(name, rank=0, world_size=1):
    """The loss a config names: `infonce` (symmetric InfoNCE) or `sigmoid` (SigLIP, with its own learnable bias)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss '{name}'; use one of: {', '.join(LOSSES)}")
    return LOSSES[name](rank, world_size)
