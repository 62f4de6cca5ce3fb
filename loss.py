"""Symmetric InfoNCE over a batch of image-caption pairs, optionally gathered across processes."""
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
import torch.nn.functional as F


def gather(x, world_size):
    """Concatenate `x` from every process along dim 0, in rank order; the input itself when alone.

    The autograd-aware all_gather sends each process's share of the gradient back to the process that
    produced the features, so every process may compute the loss over the global batch.
    """
    if world_size == 1:
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


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
