"""One optimisation step's forward and backward: the plain step, and the gradient-cached step beside it.

Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limits"): the
contrastive loss couples every pair in the batch, but its gradient with respect to the *features* is cheap to
hold. So one step is: encode the batch in chunks without building graphs, compute the loss on all features,
back-propagate to the features only, then re-encode each chunk with a graph and push the cached feature
gradient through it. Peak memory is that of one chunk; the parameter gradients are those of the whole batch.
"""
import contextlib

import torch

from engine.runtime import rng_state, set_rng_state
from model import batchnorm_layers


def plain_step(model, loss_fn, batch, amp, scaler):
    """Forward the whole batch, compute the loss, back-propagate (scaled for fp16). Returns the loss dict."""
    with amp:
        img, txt, scale = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        out = loss_fn(img, txt, scale, batch["image_ids"])
    scaler.scale(out["loss"]).backward()
    return out


def cached_step(model, loss_fn, batch, micro, amp, scaler):
    """Forward and backward of one batch in chunks of `micro` pairs; returns the loss dict of the whole batch.

    `model` may be wrapped in DistributedDataParallel: gradients are then synchronised once, on the last chunk.
    """
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
    for b, saved in zip(bn, bn_saved):
        b.copy_(saved)
    after_pass1 = rng_state()

    img = torch.cat(img_parts).detach().requires_grad_(True)  # (B, D)
    txt = torch.cat(txt_parts).detach().requires_grad_(True)  # (B, D)
    learn_scale = any(p.requires_grad for n, p in model.named_parameters() if n.endswith("log_scale"))
    scale = scale.detach().requires_grad_(learn_scale)
    with amp:
        out = loss_fn(img, txt, scale, batch["image_ids"])
    scaler.scale(out["loss"]).backward()  # also gives the loss's own parameters (if any) their gradient
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
