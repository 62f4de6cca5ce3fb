"""Symmetric InfoNCE over a batch of image-caption pairs, optionally gathered across processes."""
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
        if image_ids is not None:
            ids = gather_ids(image_ids, self.world_size)  # (N,)
            same = ids[:, None] == ids[None, :]
            same.fill_diagonal_(False)  # the true pair stays in
            logits = logits.masked_fill(same, float("-inf"))
        loss_i2t = F.cross_entropy(logits, target)
        loss_t2i = F.cross_entropy(logits.t(), target)
        with torch.no_grad():
            acc_i2t = (logits.argmax(dim=1) == target).float().mean()
            acc_t2i = (logits.argmax(dim=0) == target).float().mean()
        return {"loss": loss_i2t + loss_t2i, "loss_i2t": loss_i2t.detach(), "loss_t2i": loss_t2i.detach(),
                "acc_i2t": acc_i2t, "acc_t2i": acc_t2i}
