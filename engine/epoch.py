"""One pass over the training data: `train_one_epoch` and the handful of objects it works with."""
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

from dataset import normalize
from engine.errors import UserError
from engine.reporting import step_scalars
from engine.runtime import set_rng_state
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
    momentum: Optional[torch.nn.Module] = None  # engine.momentum.MomentumTowers filling the loss's feature queue


def train_one_epoch(t, loader, epoch, show_progress=True, progress=None, after_step=None, reporter=None,
                    first_step=0):
    """Train on every batch of `loader`; returns the epoch's mean loss and accuracies, speed and data-wait share.

    `data_wait_share` is the fraction of the epoch's wall time spent waiting for the loader: near 0 means the
    model is the bottleneck, a large share means more loader workers (or pre-resized images) would help.

    Mid-epoch resume: `progress` is the dict `after_step` was given at the save point (sums so far and this
    process's RNG state); `loader` must already start after its batches (EpochSampler / ShardLoader resume_at).
    The RNG state is put back once the loader's iterator exists, since creating it draws from the RNG.
    `after_step(progress)` runs after every optimizer step; when it returns true the epoch ends there, and the
    stats say `stopped`.

    `reporter` (engine.reporting) gets the step's scalars every `report-every` optimizer steps, numbered from
    `first_step` (the global step before this epoch's first): speed and data wait over the steps since the last
    report, and the gradient norm before clipping.
    """
    t.model.train()
    p = {"steps": 0, "samples": 0, "skipped": 0, "skipped_files": [], "seconds": 0.0, "waiting": 0.0,
         "totals": {"loss": 0.0, "acc_i2t": 0.0, "acc_t2i": 0.0}}
    p.update({k: v for k, v in (progress or {}).items() if k in p})
    p["totals"] = dict(p["totals"])
    stopped = False
    window = {"samples": 0, "seconds": 0.0, "waiting": 0.0}  # since the last report
    params = [w for g in t.optimizer.param_groups for w in g["params"]]
    start = tick = time.perf_counter()
    batches = iter(loader)  # here, not lazily in tqdm's loop: the RNG state goes back after this
    if progress is not None and progress.get("rng") is not None:
        set_rng_state(progress["rng"])
    bar = tqdm(batches, desc=f"epoch {epoch}", disable=not show_progress, dynamic_ncols=True,
               initial=p["steps"], total=len(loader))
    for batch in bar:
        p["waiting"] += time.perf_counter() - tick
        window["waiting"] += time.perf_counter() - tick
        p["skipped"] += batch.pop("skipped")
        if batch.get("skipped_files"):  # the same bad file comes back once per caption row: count it once
            p["skipped_files"] = sorted(set(p["skipped_files"]).union(batch["skipped_files"]))
        batch.pop("skipped_files", None)
        batch = {k: v.to(t.device, non_blocking=True) for k, v in batch.items()}
        images = batch["images"].contiguous(memory_format=torch.channels_last)  # uint8 (B, 3, H, W)
        if t.augment is not None:
            images = t.augment(images)
        batch["images"] = normalize(images)  # uint8 -> the model's float input
        t.optimizer.zero_grad(set_to_none=True)
        if t.micro_batch and t.micro_batch < batch["images"].shape[0]:
            out = cached_step(t.model, t.loss_fn, batch, t.micro_batch, t.amp, t.scaler, momentum=t.momentum)
        else:
            out = plain_step(t.model, t.loss_fn, batch, t.amp, t.scaler, momentum=t.momentum)
        loss = out["loss"].item()  # also the step's synchronisation point on CUDA
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"loss became {loss} at epoch {epoch}, step {p['steps']}; stopped without saving, "
                                f"the last good checkpoint is kept. Lower learning-rate or turn off use-amp.")
        due = reporter is not None and reporter.due(first_step + p["steps"] + 1)
        norm = None
        if t.grad_clip or due:  # the norm is measured on unscaled gradients, before clipping; inf clips nothing
            t.scaler.unscale_(t.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip or float("inf"))
        t.scaler.step(t.optimizer)
        t.scaler.update()
        t.scheduler.step()
        p["steps"] += 1
        p["samples"] += batch["images"].shape[0] * t.loss_fn.world_size
        for k in p["totals"]:
            p["totals"][k] += float(out[k].detach())
        now = time.perf_counter()
        window["samples"] += batch["images"].shape[0] * t.loss_fn.world_size
        window["seconds"] += now - start
        p["seconds"], start = p["seconds"] + now - start, now
        if due:
            seconds = max(window["seconds"], 1e-9)
            reporter.step(first_step + p["steps"], step_scalars(
                out, t.optimizer, getattr(t.model, "module", t.model), t.loss_fn, norm, window["samples"] / seconds,
                window["waiting"] / seconds, p["skipped"], t.device))
            window = {"samples": 0, "seconds": 0.0, "waiting": 0.0}
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{t.scheduler.get_last_lr()[0]:.2e}",
                        samples_s=f"{p['samples'] / max(p['seconds'], 1e-9):.1f}")
        if after_step is not None and after_step(p):
            stopped = True
            break
        tick = start = time.perf_counter()
    bar.close()
    p["seconds"] += time.perf_counter() - start
    stats = {k: v / max(p["steps"], 1) for k, v in p["totals"].items()}
    stats.update(steps=p["steps"], samples=p["samples"], skipped_images=p["skipped"],
                 skipped_file_names=p["skipped_files"],
                 lr=t.scheduler.get_last_lr()[0], samples_per_s=p["samples"] / max(p["seconds"], 1e-9),
                 data_wait_share=p["waiting"] / max(p["seconds"], 1e-9), seconds=p["seconds"], stopped=stopped)
    return stats
