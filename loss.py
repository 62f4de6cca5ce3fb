"""Losses over a batch of image-caption pairs, optionally gathered across processes: symmetric InfoNCE (with an
optional queue of earlier steps' features as extra negatives and an optional hard-negative hinge), and SigLIP's
pairwise sigmoid loss."""
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


def gather_nograd(x, world_size):
    """Concatenate `x` from every process along dim 0, in rank order, as a constant (ids, queued features)."""
    if world_size == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def _other_positives(ids):
    """(N, N) bool: pair i's image also appears in pair j (j != i); None without ids (only the diagonal).
    `ids` are the global batch's image ids, already gathered."""
    if ids is None:
        return None
    same = ids[:, None] == ids[None, :]
    same.fill_diagonal_(False)
    return same


def _accuracy(logits):
    """Share of images (rows) and of captions (columns) whose true pair scores highest. `logits` must already
    have the other same-image entries at -inf, so a second caption of the image is not counted as a miss."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return (logits.argmax(dim=1) == target).float().mean(), (logits.argmax(dim=0) == target).float().mean()


class FeatureQueue(nn.Module):
    """The image and caption features of the last `size` pairs of earlier steps, with their image ids: extra
    negatives for InfoNCE (the memory bank of MoCo, He et al. 2020, and ALBEF, Li et al. 2021; without momentum
    towers it is XBM's cross-batch memory, Wang et al. 2020).

    Buffers only, so it travels in the loss's state_dict: the checkpoint saves it and a resume continues with the
    same negatives. What is pushed is the global batch gathered in rank order, so every process holds the same
    queue, and it is the queue one process would hold with the whole batch.
    """

    def __init__(self, size, dim, warmup=0):
        super().__init__()
        if size < 1 or dim is None or dim < 1 or warmup < 0:
            raise ValueError(f"a feature queue needs size >= 1, the feature width and warmup >= 0 (got size {size}, "
                             f"dim {dim}, warmup {warmup})")
        self.size, self.warmup = size, warmup
        self.register_buffer("images", torch.zeros(size, dim))  # (K, D)
        self.register_buffer("texts", torch.zeros(size, dim))  # (K, D)
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))  # (K,): -1 = no image id known
        self.register_buffer("head", torch.zeros((), dtype=torch.long))  # the next slot to write
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))  # slots [0, filled) hold features
        self.register_buffer("pushes", torch.zeros((), dtype=torch.long))  # steps pushed: the warm-up's clock

    def negatives(self):
        """(images (Q, D), texts (Q, D), ids (Q,)) to use this step; None while warming up or empty."""
        filled = int(self.filled)
        if filled == 0 or int(self.pushes) < self.warmup:
            return None
        return self.images[:filled], self.texts[:filled], self.ids[:filled]

    @torch.no_grad()
    def push(self, images, texts, ids):  # (N, D), (N, D), (N,): one step's global batch
        keep = min(images.shape[0], self.size)  # a batch longer than the queue leaves its last `size` pairs
        slots = (self.head + torch.arange(keep, device=self.head.device)) % self.size  # (keep,)
        self.images.index_copy_(0, slots, images[-keep:].to(self.images.dtype))
        self.texts.index_copy_(0, slots, texts[-keep:].to(self.texts.dtype))
        self.ids.index_copy_(0, slots, ids[-keep:].to(self.ids.dtype))
        self.head.copy_((self.head + keep) % self.size)
        self.filled.copy_((self.filled + keep).clamp(max=self.size))
        self.pushes.add_(1)


def _max_violation(img, txt, cand_img, cand_txt, not_neg, margin):
    """VSE++'s max-violation hinge (Faghri et al. 2018, "VSE++: Improving Visual-Semantic Embeddings with Hard
    Negatives", eq. 5): for each pair, only its hardest negative caption and hardest negative image count,
    max_c' [margin - s(i, c) + s(i, c')]+ + max_i' [margin - s(i, c) + s(i', c)]+ on cosine similarities.
    Averaged over the batch (the paper sums) so its weight does not depend on the batch size. `not_neg` (N, M)
    marks the candidates that are not negatives of pair i (its own and same-image ones), in both directions:
    caption i and image i belong to the same image."""
    pos = (img * txt).sum(dim=-1, keepdim=True)  # (N, 1): s(i, c) of the true pairs
    neg_i2t = (img @ cand_txt.t()).masked_fill(not_neg, float("-inf"))  # (N, N + Q)
    neg_t2i = (txt @ cand_img.t()).masked_fill(not_neg, float("-inf"))  # (N, N + Q)
    # relu(-inf) = 0: a pair with no negative at all adds nothing
    hinge_i2t = F.relu(margin - pos + neg_i2t).max(dim=1).values  # (N,)
    hinge_t2i = F.relu(margin - pos + neg_t2i).max(dim=1).values  # (N,)
    return hinge_i2t.mean() + hinge_t2i.mean()


class ContrastiveLoss(nn.Module):
    """Cross-entropy over rows (image -> text) plus cross-entropy over columns (text -> image).

    `image_ids` says which pairs share an image: two captions of one image in the same batch are not each
    other's negatives, so the other same-image entries of a row (or column) are left out of its softmax.

    With `queue_size`, each image's softmax also runs over the queued captions of earlier steps, and each
    caption's over the queued images (constants: no gradient reaches old features); queued pairs of the same
    image are left out as well. The step pushes each batch after its backward (`enqueue`). With `hard_weight`,
    VSE++'s max-violation hinge over the same negatives is added (see `_max_violation`).
    """

    def __init__(self, rank=0, world_size=1, queue_size=0, dim=None, queue_warmup=0, hard_weight=0.0,
                 hard_margin=0.2):
        super().__init__()
        self.rank = rank
        self.world_size = world_size
        self.queue = FeatureQueue(queue_size, dim, queue_warmup) if queue_size else None
        self.hard_weight, self.hard_margin = hard_weight, hard_margin

    def forward(self, image_features, text_features, logit_scale, image_ids=None):
        img = gather(image_features, self.world_size)  # (N, D), N = global batch
        txt = gather(text_features, self.world_size)  # (N, D)
        ids = None if image_ids is None else gather_nograd(image_ids, self.world_size)  # (N,)
        logits = logit_scale * img @ txt.t()  # (N, N): row i = image i against every caption
        n = logits.shape[0]
        target = torch.arange(n, device=logits.device)
        others = _other_positives(ids)  # the true pair stays in its softmax
        if others is not None:
            logits = logits.masked_fill(others, float("-inf"))
        logits_i2t, logits_t2i = logits, logits.t()  # rows: images over captions; captions over images
        queued = self.queue.negatives() if self.queue is not None else None
        cand_img, cand_txt = img, txt  # what each row is compared with: the batch, then the queue
        not_neg = torch.eye(n, dtype=torch.bool, device=logits.device)  # (N, N + Q): positives, never negatives
        not_neg = not_neg if others is None else not_neg | others
        if queued is not None:
            q_img, q_txt, q_ids = queued[0].to(img.dtype), queued[1].to(txt.dtype), queued[2]  # (Q, D), (Q,)
            same = ids[:, None] == q_ids[None, :] if ids is not None else \
                torch.zeros(n, q_ids.shape[0], dtype=torch.bool, device=logits.device)  # (N, Q)
            logits_i2t = torch.cat([logits_i2t, (logit_scale * img @ q_txt.t()).masked_fill(same, float("-inf"))], 1)
            logits_t2i = torch.cat([logits_t2i, (logit_scale * txt @ q_img.t()).masked_fill(same, float("-inf"))], 1)
            cand_img, cand_txt = torch.cat([img, q_img]), torch.cat([txt, q_txt])  # (N + Q, D)
            not_neg = torch.cat([not_neg, same], 1)
        loss_i2t = F.cross_entropy(logits_i2t, target)
        loss_t2i = F.cross_entropy(logits_t2i, target)
        out = {"loss": loss_i2t + loss_t2i, "loss_i2t": loss_i2t.detach(), "loss_t2i": loss_t2i.detach()}
        if self.hard_weight:
            hard = _max_violation(img, txt, cand_img, cand_txt, not_neg, self.hard_margin)
            out["loss"] = out["loss"] + self.hard_weight * hard
            out["loss_hard"] = hard.detach()
        with torch.no_grad():  # a second caption of the same image scores -inf, so it is never counted as a miss
            out["acc_i2t"] = (logits_i2t.argmax(dim=1) == target).float().mean()
            out["acc_t2i"] = (logits_t2i.argmax(dim=1) == target).float().mean()
        return out

    @torch.no_grad()
    def enqueue(self, image_features, text_features, image_ids=None):
        """Push this process's part of the step's features (B, D) and ids (B,); every process's part is gathered
        first, so all processes keep the same queue."""
        img = gather_nograd(image_features.detach().float(), self.world_size)  # (N, D)
        txt = gather_nograd(text_features.detach().float(), self.world_size)  # (N, D)
        if image_ids is None:
            image_ids = torch.full((image_features.shape[0],), -1, dtype=torch.long, device=img.device)
        self.queue.push(img, txt, gather_nograd(image_ids, self.world_size))


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
        others = _other_positives(None if image_ids is None else gather_nograd(image_ids, self.world_size))
        positive = torch.eye(n, dtype=torch.bool, device=logits.device)
        if others is not None:
            positive = positive | others
        labels = positive.float() * 2 - 1  # (N, N): +1 same image, -1 otherwise
        loss = -F.logsigmoid(labels * logits).sum() / n
        with torch.no_grad():
            acc_i2t, acc_t2i = _accuracy(logits if others is None else logits.masked_fill(others, float("-inf")))
        return {"loss": loss, "acc_i2t": acc_i2t, "acc_t2i": acc_t2i}


LOSSES = {"infonce": ContrastiveLoss, "sigmoid": SigmoidLoss}


def make_loss(name, rank=0, world_size=1, **options):
    """The loss a config names: `infonce` (symmetric InfoNCE) or `sigmoid` (SigLIP, with its own learnable bias).

    `options` are InfoNCE's extras (queue_size, dim, queue_warmup, hard_weight, hard_margin); the sigmoid loss
    takes none of them. Options left at zero build exactly the plain loss."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss '{name}'; use one of: {', '.join(LOSSES)}")
    if name == "sigmoid":
        used = sorted(k for k, v in options.items() if v and k not in ("dim", "hard_margin"))
        if used:
            raise ValueError(f"{', '.join(used)} work with loss infonce only; set them to 0 or use loss infonce")
        return SigmoidLoss(rank, world_size)
    return ContrastiveLoss(rank, world_size, **options)
