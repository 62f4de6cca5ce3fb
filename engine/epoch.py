"""One pass over the training data: `train_one_epoch` and the handful of objects it works with."""
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

from dataset import normalize
from engine.errors import UserError
from engine.step import cached_step, plain_step


class NonFiniteLoss(UserError, RuntimeError):
    pass


@dataclass
class Trainer:
    """What one optimisation step needs. `model` may be DDP-wrapped; `augment` (uint8 batch -> uint8 batch, on
    the device) runs before normalisation when set."""
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    amp: Any  # an autocast context, or a null context
    device: torch.device
    micro_batch: Optional[int] = None
    grad_clip: Optional[float] = None
    augment: Optional[Callable] = None


def train_one_epoch(t, loader, epoch, show_progress=True):
    """Train on every batch of `loader`; returns the epoch's mean loss and accuracies, speed and data-wait share.

    `data_wait_share` is the fraction of the epoch's wall time spent waiting for the loader: near 0 means the
    model is the bottleneck, a large share means more loader workers (or pre-resized images) would help.
    """
    t.model.train()
    totals = {"loss": 0.0, "acc_i2t": 0.0, "acc_t2i": 0.0}
    steps = samples = skipped = 0
    waiting = 0.0
    start = tick = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not show_progress, dynamic_ncols=True)
    for batch in bar:
        waiting += time.perf_counter() - tick
        skipped += batch.pop("skipped")
        batch = {k: v.to(t.device, non_blocking=True) for k, v in batch.items()}
        images = batch["images"].contiguous(memory_format=torch.channels_last)  # uint8 (B, 3, H, W)
        if t.augment is not None:
            images = t.augment(images)
        batch["images"] = normalize(images)  # uint8 -> the model's float input
        t.optimizer.zero_grad(set_to_none=True)
        if t.micro_batch and t.micro_batch < batch["images"].shape[0]:
            out = cached_step(t.model, t.loss_fn, batch, t.micro_batch, t.amp, t.scaler)
        else:
            out = plain_step(t.model, t.loss_fn, batch, t.amp, t.scaler)
        loss = out["loss"].item()  # also the step's synchronisation point on CUDA
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"loss became {loss} at epoch {epoch}, step {steps}; stopped without saving, the "
                                f"last good checkpoint is kept. Lower learning-rate or turn off use-amp.")
        if t.grad_clip:
            t.scaler.unscale_(t.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in t.optimizer.param_groups for p in g["params"]], t.grad_clip)
        t.scaler.step(t.optimizer)
        t.scaler.update()
        t.scheduler.step()
        steps += 1
        samples += batch["images"].shape[0] * t.loss_fn.world_size
        for k in totals:
            totals[k] += float(out[k].detach())
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{t.scheduler.get_last_lr()[0]:.2e}",
                        samples_s=f"{samples / (time.perf_counter() - start):.1f}")
        tick = time.perf_counter()
    seconds = time.perf_counter() - start
    stats = {k: v / max(steps, 1) for k, v in totals.items()}
    stats.update(steps=steps, samples=samples, skipped_images=skipped, lr=t.scheduler.get_last_lr()[0],
                 samples_per_s=samples / max(seconds, 1e-9), data_wait_share=waiting / max(seconds, 1e-9))
    return stats
