"""Train the image-text retrieval model with the symmetric InfoNCE loss.

    python train.py                                   # reads configs/train.yaml
    python train.py --config configs/demo.yaml        # the built-in demo: no downloads, CPU
    python train.py --batch-size 64 --epochs 3        # any config key can be overridden
    torchrun --nproc_per_node 4 train.py              # several processes; batch-size is the global batch

Reads top to bottom: config, data, model, loss, optimizer, resume, then the epoch loop around
`train_one_epoch`, with validation (the same code as eval.py), checkpoints and a JSON-lines log.
"""
import json
import math
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from config import ConfigError, Schema, format_config, load_config
from dataset import DataError, PairCollate, PairDataset, image_transform, make_loader, normalize
from eval import USER_ERRORS, evaluate
from gradcache import cached_step
from loss import ContrastiveLoss
from metrics import format_table
from model import build_model, load_tokenizer, text_length_limit
from plots import plot_curves
from runtime import amp_context, barrier, cleanup_distributed, init_distributed, seed_everything

SCHEMA = Schema({
    # run length and optimisation
    "epochs": (200, (int,), "passes over the training pairs"),
    "batch-size": (192, (int,), "global contrastive batch (all processes together)"),
    "micro-batch-size": (None, (int, type(None)), "encode in chunks of this many per process (GradCache); null = off"),
    "learning-rate": (5e-6, (float,), "peak AdamW learning rate"),
    "weight-decay": (0.05, (float,), "AdamW decay, not applied to biases, norms or the temperature"),
    "warmup-steps": (1000, (int,), "linear warmup steps before the cosine decay"),
    "grad-clip": (1.0, (float, type(None)), "max global gradient norm; null = no clipping"),
    "temperature": (0.07, (float,), "softmax temperature (initial value when learnable)"),
    "learnable-temperature": (False, (bool,), "learn the temperature (scale capped at 100)"),
    "use-amp": (True, (bool,), "CUDA mixed precision (ignored on the CPU)"),
    "amp-dtype": ("float16", (str,), "float16 (with a grad scaler) or bfloat16"),
    "grad-checkpointing": (False, (bool,), "recompute activations in backward to save memory"),
    "freeze-image": (False, (bool,), "keep the whole image tower fixed"),
    "freeze-text": (False, (bool,), "keep the whole text tower fixed"),
    "freeze-bn": (False, (bool,), "keep BatchNorm statistics and affine weights fixed"),
    # data
    "train-root": ("datasets/train", (str,), "training folder: captions.csv + images/"),
    "valid-root": ("datasets/valid", (str,), "validation folder, scored every epoch"),
    "image-size": (224, (int,), "square input side in pixels"),
    "max-length": (64, (int,), "tokens per caption before truncation"),
    "use-augment": (True, (bool,), "random resized crop + colour jitter"),
    "num-workers": ("auto", (int, str), "data-loading processes per training process, or auto"),
    "demo-data": (False, (bool,), "generate the synthetic demo data and text model when absent"),
    # model
    "image-model": ("resnet50", (str,), "torchvision ResNet name"),
    "text-model": ("pretrains/roberta", (str,), "Hugging Face folder or hub id"),
    "text-pooling": ("first", (str,), "text feature: first token's hidden state, or mean over tokens"),
    "load-pretrained": (True, (bool,), "start from ImageNet / text-model weights"),
    # checkpoints and run
    "load-checkpoint": (False, (bool,), "resume from load-path"),
    "load-path": ("checkpoints/last.pt", (str,), "checkpoint to resume from"),
    "best-path": ("checkpoints/best.pt", (str,), "best checkpoint by validation rsum"),
    "last-path": ("checkpoints/last.pt", (str,), "checkpoint written every epoch"),
    "device": ("auto", (str,), "auto, cpu or cuda"),
    "seed": (0, (int,), "random seed"),
})


class NonFiniteLoss(RuntimeError):
    pass


def log(rank, *args):
    if rank == 0:
        print(*args, flush=True)


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


def plain_step(model, loss_fn, batch, amp):
    with amp:
        img, txt, scale = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        out = loss_fn(img, txt, scale, batch["image_ids"])
    return out


def train_one_epoch(model, loader, loss_fn, optimizer, scheduler, scaler, device, cfg, epoch, rank, amp):
    model.train()
    micro = cfg["micro-batch-size"]
    totals = {"loss": 0.0, "acc_i2t": 0.0, "acc_t2i": 0.0}
    steps = samples = skipped = 0
    start = time.time()
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=rank != 0, dynamic_ncols=True)
    for batch in bar:
        skipped += batch.pop("skipped")
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        batch["images"] = normalize(batch["images"].contiguous(memory_format=torch.channels_last))  # uint8 -> float
        optimizer.zero_grad(set_to_none=True)
        if micro and micro < batch["images"].shape[0]:
            out = cached_step(model, loss_fn, batch, micro, amp, scaler)
        else:
            out = plain_step(model, loss_fn, batch, amp)
            scaler.scale(out["loss"]).backward()
        loss = out["loss"].item()
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"loss became {loss} at epoch {epoch}, step {steps}")
        if cfg["grad-clip"]:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad-clip"])
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        steps += 1
        samples += batch["images"].shape[0] * loss_fn.world_size
        for k in totals:
            totals[k] += float(out[k].detach())
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                        samples_s=f"{samples / (time.time() - start):.1f}")
    stats = {k: v / max(steps, 1) for k, v in totals.items()}
    stats.update(steps=steps, samples=samples, skipped_images=skipped, lr=scheduler.get_last_lr()[0],
                 samples_per_s=samples / (time.time() - start))
    return stats


def run(argv):
    # ---------------------------------------------------------------- config and processes
    cfg = load_config(SCHEMA, argv, "configs/train.yaml", "Train an image-text retrieval model.")
    rank, world_size, device = init_distributed(cfg["device"])
    log(rank, "config:\n" + format_config(cfg))
    if cfg["batch-size"] % world_size:
        raise ConfigError(f"batch-size {cfg['batch-size']} does not divide over {world_size} processes; "
                          f"use a multiple of {world_size}")
    local_batch = cfg["batch-size"] // world_size
    if cfg["micro-batch-size"] is not None and cfg["micro-batch-size"] < 1:
        raise ConfigError("micro-batch-size must be a positive number of pairs, or null")
    if cfg["amp-dtype"] not in ("float16", "bfloat16"):
        raise ConfigError(f"amp-dtype must be float16 or bfloat16, got '{cfg['amp-dtype']}'")
    if cfg["use-amp"] and device.type != "cuda":
        log(rank, "note: use-amp is ignored on the CPU (bf16 autocast is slower than fp32 on AVX2 CPUs)")
    amp = amp_context(device, cfg["use-amp"], cfg["amp-dtype"])
    seed_everything(cfg["seed"] + rank)

    # ---------------------------------------------------------------- data
    if cfg["demo-data"] and rank == 0:
        from demo import make_demo
        make_demo(cfg["train-root"], cfg["valid-root"], cfg["text-model"], seed=cfg["seed"])
    barrier()
    tokenizer = load_tokenizer(cfg["text-model"])
    train_set = PairDataset(cfg["train-root"], image_transform(cfg["image-size"], cfg["use-augment"]),
                            strict=False, min_size=cfg["image-size"])
    PairDataset(cfg["valid-root"], transform=None)  # check the validation folder before hours of training
    if len(train_set) < cfg["batch-size"]:
        raise DataError(f"{cfg['train-root']} has {len(train_set)} pairs, fewer than one batch "
                        f"({cfg['batch-size']}); lower batch-size")
    sampler = DistributedSampler(train_set, world_size, rank, shuffle=True, seed=cfg["seed"], drop_last=True) \
        if world_size > 1 else None
    # ---------------------------------------------------------------- model
    model = build_model(cfg)
    model.freeze(cfg["freeze-image"], cfg["freeze-text"], cfg["freeze-bn"])
    if cfg["grad-checkpointing"]:
        model.set_grad_checkpointing(True)
    model.to(device).to(memory_format=torch.channels_last)
    max_length = min(cfg["max-length"], text_length_limit(model.text.model.config))
    if max_length < cfg["max-length"]:
        log(rank, f"note: max-length lowered to {max_length}, the most {cfg['text-model']} can take")
    loader = make_loader(train_set, local_batch, cfg["num-workers"], device, shuffle=True, sampler=sampler,
                         collate_fn=PairCollate(tokenizer, max_length), drop_last=True)
    unwrapped = model
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    # ---------------------------------------------------------------- loss and optimizer
    loss_fn = ContrastiveLoss(rank, world_size)
    optimizer = torch.optim.AdamW(param_groups(unwrapped, cfg["weight-decay"]), lr=cfg["learning-rate"])
    total_steps = cfg["epochs"] * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg["warmup-steps"], total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg["use-amp"] and device.type == "cuda"
                                  and cfg["amp-dtype"] == "float16")
    # ---------------------------------------------------------------- resume
    start_epoch, best = 0, -1.0
    if cfg["load-checkpoint"]:
        ckpt = load_checkpoint(cfg["load-path"], map_location=device)
        unwrapped.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        start_epoch, best = ckpt["epoch"] + 1, ckpt["best_rsum"]
        log(rank, f"resumed from {cfg['load-path']} at epoch {start_epoch}")
    # ---------------------------------------------------------------- epoch loop
    log_path = os.path.join(os.path.dirname(os.path.abspath(cfg["last-path"])), "metrics.jsonl")
    history = None
    for epoch in range(start_epoch, cfg["epochs"]):
        if sampler is not None:
            sampler.set_epoch(epoch)
        stats = train_one_epoch(model, loader, loss_fn, optimizer, scheduler, scaler, device, cfg, epoch,
                                rank, amp)
        if stats["skipped_images"]:
            log(rank, f"warning: {stats['skipped_images']} image(s) failed to decode this epoch and were skipped")
        if rank == 0:
            metrics = evaluate(unwrapped, tokenizer, cfg["valid-root"], cfg["image-size"], max_length,
                               local_batch, cfg["num-workers"], device, amp)
        rngs = gather_rng_states(world_size)  # after validation, which draws from the RNG too
        if rank == 0:
            print(format_table(metrics), flush=True)
            improved = metrics["rsum"] > best
            best = max(best, metrics["rsum"])
            state = {"model": unwrapped.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                     "step": (epoch + 1) * len(loader), "best_rsum": best, "rng": rngs, "config": cfg,
                     "metrics": metrics}
            save_checkpoint(cfg["last-path"], **state)
            if improved:
                save_checkpoint(cfg["best-path"], **state)
            history = {"epoch": epoch, "train": stats, "valid": metrics, "best": improved}
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(history) + "\n")
            print(f"epoch {epoch}: loss {stats['loss']:.4f}, rsum {metrics['rsum']:.4f}"
                  f"{' (best)' if improved else ''}, {stats['samples_per_s']:.1f} samples/s", flush=True)
        barrier()
    if rank == 0 and os.path.isfile(log_path):
        plot = plot_curves(log_path, os.path.join(os.path.dirname(log_path), "curves.png"))
        print(f"log: {log_path}; curves: {plot}")
    return history


def gather_rng_states(world_size):
    """Every process's RNG state, so a resumed multi-process run continues each stream where it stopped."""
    if world_size == 1:
        return [rng_state()]
    out = [None] * world_size
    torch.distributed.all_gather_object(out, rng_state())
    return out


def main(argv=None):
    try:
        return run(argv)
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")
    except NonFiniteLoss as e:
        sys.exit(f"error: {e}; stopped without saving, the last good checkpoint is kept. "
                 f"Lower learning-rate or turn off use-amp.")
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
