"""The optimizer and its schedule: AdamW with decay on weight matrices only, linear warmup then cosine decay.

The towers start pretrained, but the image projection starts from random weights and the temperature (and the
sigmoid loss's bias) are single numbers far from their final values: at the small rate that suits a pretrained
tower (the reference 5e-6) they would barely move. `projection-learning-rate` gives these "head" parameters
their own rate.
"""
import math

import torch

HEAD_PREFIXES = ("image.proj.", "log_scale")  # the model's parameters that start random or scalar


def param_groups(model, weight_decay, lr=None, head_lr=None, extra=()):
    """AdamW groups: decay on matrices and convolutions only (never on biases, norms or the temperature); with
    `head_lr`, the projection, the temperature and the parameters of the `extra` modules (a loss's own bias)
    get that rate instead of `lr`."""
    named = [(n, p) for n, p in model.named_parameters()]
    named += [(f"extra{i}.{n}", p) for i, m in enumerate(extra) for n, p in m.named_parameters()]
    groups = {}
    for name, p in named:
        if not p.requires_grad:
            continue
        head = head_lr is not None and (name.startswith(HEAD_PREFIXES) or name.startswith("extra"))
        decay = p.ndim >= 2
        groups.setdefault((head, decay), []).append(p)
    out = []
    for (head, decay), params in sorted(groups.items()):
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        rate = head_lr if head else lr
        if rate is not None:
            group["lr"] = rate
        out.append(group)
    return out


def warmup_cosine(warmup, total):
    """Learning-rate factor: linear from 0 to 1 over `warmup` steps, then cosine down to 0 at `total`."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def build_optimizer(model, cfg, total_steps, device, extra=()):
    """(optimizer, scheduler, scaler) for a run's config. `extra` modules (the loss) are optimised too. The grad
    scaler is on only for fp16 autocast on CUDA."""
    fused = device.type == "cuda"  # one kernel for the whole update instead of one per tensor
    groups = param_groups(model, cfg["weight-decay"], cfg["learning-rate"], cfg.get("projection-learning-rate"),
                          extra)
    optimizer = torch.optim.AdamW(groups, lr=cfg["learning-rate"], fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg["warmup-steps"], total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg["use-amp"] and device.type == "cuda"
                                  and cfg["amp-dtype"] == "float16")
    return optimizer, scheduler, scaler
