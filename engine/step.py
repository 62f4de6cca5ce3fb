"""One optimisation step's forward and backward: the plain step, and the gradient-cached step beside it.

Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limits"): the
contrastive loss couples every pair in the batch, but its gradient with respect to the *features* is cheap to
hold. So one step is: encode the batch in chunks without building graphs, compute the loss on all features,
back-propagate to the features only, then re-encode each chunk with a graph and push the cached feature
gradient through it. Peak memory is that of one chunk; the parameter gradients are those of the whole batch.

When the loss keeps a feature queue (loss.FeatureQueue), both steps push the batch into it after the backward,
so the batch is never its own queued negative: the features the trained towers gave, or, with `momentum`
(engine.momentum.MomentumTowers), those of the momentum copies, which move first and then encode the batch.
"""
import contextlib

import torch

from engine.runtime import rng_state, set_rng_state
from model import batchnorm_layers


def _momentum_features(model, loss_fn, momentum, batch, amp, micro=None):
    """The momentum copies' features of the batch, after moving them towards `model`; None without them."""
    if momentum is None:
        return None
    if getattr(loss_fn, "queue", None) is None:
        raise ValueError("momentum towers only fill a feature queue; give the loss a queue-size")
    momentum.update(model)
    return momentum.encode(batch, amp, micro)


def _enqueue(loss_fn, features, image_ids):
    if getattr(loss_fn, "queue", None) is not None:
        loss_fn.enqueue(*features, image_ids)


def plain_step(model, loss_fn, batch, amp, scaler, momentum=None):
    """Forward the whole batch, compute the loss, back-propagate (scaled for fp16). Returns the loss dict."""
    keys = _momentum_features(model, loss_fn, momentum, batch, amp)
    with amp:
        img, txt, scale = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        out = loss_fn(img, txt, scale, batch["image_ids"])
    scaler.scale(out["loss"]).backward()
    _enqueue(loss_fn, keys or (img, txt), batch["image_ids"])
    return out


def cached_step(model, loss_fn, batch, micro, amp, scaler, momentum=None):
    """Forward and backward of one batch in chunks of `micro` pairs; returns the loss dict of the whole batch.

    `model` may be wrapped in DistributedDataParallel: gradients are then synchronised once, on the last chunk.
    """
    keys = _momentum_features(model, loss_fn, momentum, batch, amp, micro)  # eval mode: no RNG drawn, no BN moved
    images, ids, mask = batch["images"], batch["input_ids"], batch["attention_mask"]
    spans = [slice(s, s + micro) for s in range(0, images.shape[0], micro)]
    # Pass 1 must not move BatchNorm running statistics: pass 2 will, once per chunk.
    bn = [b for m in batchnorm_layers(model) for b in m.buffers()]
    bn_saved = [b.clone() for b in bn]
    rng, img_parts, txt_parts = [], [], []
    with torch.no_grad():
        for s in spans:
            rng.append(rng_state())  # so pass 2 draws the same dropout masks
            with amp:
                img, txt, scale = model(images[s], ids[s], mask[s])
            img_parts.append(img)
            txt_parts.append(txt)
    for b, saved in zip(bn, bn_saved, strict=True):
        b.copy_(saved)
    after_pass1 = rng_state()

    img = torch.cat(img_parts).detach().requires_grad_(True)  # (B, D)
    txt = torch.cat(txt_parts).detach().requires_grad_(True)  # (B, D)
    learn_scale = any(p.requires_grad for n, p in model.named_parameters() if n.endswith("log_scale"))
    scale = scale.detach().requires_grad_(learn_scale)
    with amp:
        out = loss_fn(img, txt, scale, batch["image_ids"])
    scaler.scale(out["loss"]).backward()  # also gives the loss's own parameters (if any) their gradient
    _enqueue(loss_fn, keys or (img, txt), batch["image_ids"])
    g_img, g_txt = img.grad, txt.grad
    g_scale = scale.grad / len(spans) if learn_scale else None

    sync_off = getattr(model, "no_sync", contextlib.nullcontext)
    for k, s in enumerate(spans):
        set_rng_state(rng[k])
        with sync_off() if k < len(spans) - 1 else contextlib.nullcontext():
            with amp:
                img_k, txt_k, scale_k = model(images[s], ids[s], mask[s])
            # A surrogate whose gradient with respect to the chunk's features is the cached one.
            surrogate = (img_k.float() * g_img[s].float()).sum() + (txt_k.float() * g_txt[s].float()).sum()
            if g_scale is not None:  # the temperature's share, routed through the model's own forward
                surrogate = surrogate + (scale_k.float() * g_scale.float()).sum()
            surrogate.backward()
    set_rng_state(after_pass1)
    return out
