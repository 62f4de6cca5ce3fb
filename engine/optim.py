"""The optimizer and its schedule: AdamW with decay on weight matrices only, linear warmup then cosine decay."""
import math

import torch


def param_groups(model, weight_decay):
    """Weight decay on matrices and convolutions only; never on biases, norms or the temperature."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup, total):
    """Learning-rate factor: linear from 0 to 1 over `warmup` steps, then cosine down to 0 at `total`."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def build_optimizer(model, cfg, total_steps, device):
    """(optimizer, scheduler, scaler) for a run's config. The grad scaler is on only for fp16 autocast on CUDA."""
    fused = device.type == "cuda"  # one kernel for the whole update instead of one per tensor
    optimizer = torch.optim.AdamW(param_groups(model, cfg["weight-decay"]), lr=cfg["learning-rate"], fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg["warmup-steps"], total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg["use-amp"] and device.type == "cuda"
                                  and cfg["amp-dtype"] == "float16")
    return optimizer, scheduler, scaler
