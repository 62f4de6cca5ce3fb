"""Train the image-text retrieval model with the symmetric InfoNCE loss.

    python train.py                                   # reads configs/train.yaml
    python train.py --config configs/demo.yaml        # the built-in demo: no downloads, CPU
    python train.py --batch-size 64 --epochs 3        # any config key can be overridden
    torchrun --nproc_per_node 4 train.py              # several processes; batch-size is the global batch

Reads top to bottom: config, data, model, loss, optimizer, resume, then the epoch loop around
`engine.epoch.train_one_epoch`, with validation (the same code as eval.py), checkpoints and a JSON-lines log.
"""
import os

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from dataset import DataError, PairCollate, PairDataset, image_transform, make_loader
from engine.augment import color_jitter
from engine import rundir
from engine.checkpoint import load_checkpoint
from engine.config import ConfigError, Schema, at_least, format_config, load_config, one_of, positive
from engine.epoch import Trainer, train_one_epoch
from engine.errors import run_entry
from engine.evaluation import Encoding, evaluate
from engine.images import ImageLimits
from engine.metrics import format_table
from engine.optim import build_optimizer
from engine.plots import plot_curves
from engine.runtime import (amp_context, barrier, cleanup_distributed, gather_rng_states, init_distributed,
                            seed_everything, set_rng_state)
from loss import ContrastiveLoss
from model import build_model, load_tokenizer, text_length_limit

SCHEMA = Schema({
    # run length and optimisation
    "epochs": (200, (int,), "passes over the training pairs",
               lambda v: None if v > 0 else "must be at least 1 (with 0 nothing would be trained)"),
    "batch-size": (192, (int,), "global contrastive batch (all processes together)", positive),
    "micro-batch-size": (None, (int, type(None)), "encode in chunks of this many per process (GradCache); null = off",
                         positive),
    "learning-rate": (5e-6, (float,), "peak AdamW learning rate", positive),
    "weight-decay": (0.05, (float,), "AdamW decay, not applied to biases, norms or the temperature", at_least(0)),
    "warmup-steps": (1000, (int,), "linear warmup steps before the cosine decay", at_least(0)),
    "grad-clip": (1.0, (float, type(None)), "max global gradient norm; null = no clipping", positive),
    "temperature": (0.07, (float,), "softmax temperature (initial value when learnable)", positive),
    "learnable-temperature": (False, (bool,), "learn the temperature (scale capped at 100)"),
    "use-amp": (True, (bool,), "CUDA mixed precision (ignored on the CPU)"),
    "amp-dtype": ("float16", (str,), "float16 (with a grad scaler) or bfloat16", one_of("float16", "bfloat16")),
    "grad-checkpointing": (False, (bool,), "recompute activations in backward to save memory"),
    "freeze-image": (False, (bool,), "keep the whole image tower fixed"),
    "freeze-text": (False, (bool,), "keep the whole text tower fixed"),
    "freeze-bn": (False, (bool,), "keep BatchNorm statistics and affine weights fixed"),
    # data
    "train-root": ("datasets/train", (str,), "training folder: captions.csv + images/"),
    "valid-root": ("datasets/valid", (str,), "validation folder, scored every epoch"),
    "image-size": (224, (int,), "square input side in pixels", at_least(32)),
    "max-length": (64, (int,), "tokens per caption before truncation", at_least(2)),
    "use-augment": (True, (bool,), "random resized crop + colour jitter"),
    "num-workers": ("auto", (int, str), "data-loading processes per training process, or auto"),
    "max-image-pixels": (40_000_000, (int,), "largest image accepted, in decoded pixels (bigger: skipped or an error)",
                         positive),
    "max-aspect-ratio": (20.0, (float,), "longest side / shortest side accepted for an image", at_least(1)),
    "demo-data": (False, (bool,), "generate the synthetic demo data and text model when absent"),
    # model
    "image-model": ("resnet50", (str,), "torchvision ResNet name"),
    "text-model": ("pretrains/roberta", (str,), "Hugging Face folder or hub id"),
    "text-pooling": ("first", (str,), "text feature: first token's hidden state, or mean over tokens",
                     one_of("first", "mean")),
    "load-pretrained": (True, (bool,), "start from ImageNet / text-model weights"),
    # checkpoints and run
    "load-checkpoint": (False, (bool,), "resume from load-path"),
    "load-path": ("checkpoints/last.pt", (str,), "checkpoint to resume from"),
    "best-path": ("checkpoints/best.pt", (str,), "best checkpoint by validation rsum"),
    "last-path": ("checkpoints/last.pt", (str,), "checkpoint written every epoch"),
    "overwrite": (False, (bool,), "start afresh over another run's checkpoints and log in the same folder"),
    "device": ("auto", (str,), "auto, cpu or cuda"),
    "seed": (0, (int,), "random seed"),
})


def log(rank, *args):
    if rank == 0:
        print(*args, flush=True)


def stored_text_model(name):
    """What a checkpoint records as its text model: an absolute path for a local folder (so the checkpoint loads
    from any working directory), the hub id otherwise."""
    return os.path.abspath(name) if os.path.isdir(name) else name


def run(argv):
    # ---------------------------------------------------------------- config and processes
    cfg = load_config(SCHEMA, argv, "configs/train.yaml", "Train an image-text retrieval model.")
    rank, world_size, device = init_distributed(cfg["device"])
    log(rank, "config:\n" + format_config(cfg))
    if cfg["batch-size"] % world_size:
        raise ConfigError(f"batch-size {cfg['batch-size']} does not divide over {world_size} processes; "
                          f"use a multiple of {world_size}")
    local_batch = cfg["batch-size"] // world_size
    if rank == 0:
        note = rundir.prepare(cfg)  # before any data is read: never start over another run's files
        if note:
            log(rank, note)
    barrier()
    if os.path.abspath(cfg["valid-root"]) == os.path.abspath(cfg["train-root"]):
        log(rank, "warning: valid-root is train-root, so the validation scores measure training data")
    if cfg["use-amp"] and device.type != "cuda":
        log(rank, "note: use-amp is ignored on the CPU (bf16 autocast is slower than fp32 on AVX2 CPUs)")
    amp = amp_context(device, cfg["use-amp"], cfg["amp-dtype"])
    seed_everything(cfg["seed"] + rank)

    # ---------------------------------------------------------------- data
    if cfg["demo-data"] and rank == 0:
        from tools.demo import make_demo
        make_demo(cfg["train-root"], cfg["valid-root"], cfg["text-model"], seed=cfg["seed"])
    barrier()
    cfg["text-model"] = stored_text_model(cfg["text-model"])
    tokenizer = load_tokenizer(cfg["text-model"])
    # workers decode, crop and resize; colour jitter runs on the whole batch on the device (engine.augment)
    limits = ImageLimits(cfg["max-image-pixels"], cfg["max-aspect-ratio"])
    train_set = PairDataset(cfg["train-root"], image_transform(cfg["image-size"], cfg["use-augment"], jitter=False),
                            strict=False, min_size=cfg["image-size"], random_crop=cfg["use-augment"], limits=limits)
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
    optimizer, scheduler, scaler = build_optimizer(unwrapped, cfg, cfg["epochs"] * len(loader), device)
    trainer = Trainer(model, loss_fn, optimizer, scheduler, scaler, amp, device, cfg["micro-batch-size"],
                      cfg["grad-clip"], augment=color_jitter if cfg["use-augment"] else None)
    enc = Encoding(cfg["image-size"], max_length, local_batch, cfg["num-workers"], device, amp, limits)

    # ---------------------------------------------------------------- resume
    start_epoch, best, best_epoch = 0, -1.0, None
    if cfg["load-checkpoint"]:
        ckpt = load_checkpoint(cfg["load-path"], map_location=device)
        unwrapped.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        start_epoch, best, best_epoch = ckpt["epoch"] + 1, ckpt["best_rsum"], ckpt.get("best_epoch")
        if rank == 0:
            for note in rundir.repair(cfg, ckpt):
                log(rank, f"note: {note}")
        log(rank, f"resumed from {cfg['load-path']} at epoch {start_epoch}")

    # ---------------------------------------------------------------- epoch loop
    history = None
    for epoch in range(start_epoch, cfg["epochs"]):
        if sampler is not None:
            sampler.set_epoch(epoch)
        stats = train_one_epoch(trainer, loader, epoch, show_progress=rank == 0)
        if stats["skipped_images"]:
            log(rank, f"warning: {stats['skipped_images']} image(s) failed to decode this epoch and were skipped")
        if rank == 0:
            metrics = evaluate(unwrapped, tokenizer, cfg["valid-root"], enc)
        rngs = gather_rng_states(world_size)  # after validation, which draws from the RNG too
        if rank == 0:
            print(format_table(metrics), flush=True)
            improved = metrics["rsum"] > best
            if improved:
                best, best_epoch = metrics["rsum"], epoch
            history = {"epoch": epoch, "train": stats, "valid": metrics, "best": improved}
            state = {"model": unwrapped.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                     "step": (epoch + 1) * len(loader), "best_rsum": best, "best_epoch": best_epoch, "rng": rngs,
                     "config": cfg, "metrics": metrics, "log_line": history}
            rundir.save_epoch(cfg, state, improved)
            print(f"epoch {epoch}: loss {stats['loss']:.4f}, rsum {metrics['rsum']:.4f}"
                  f"{' (best)' if improved else ''}, {stats['samples_per_s']:.1f} samples/s, "
                  f"{stats['data_wait_share']:.0%} of the time waiting for data", flush=True)
        barrier()
    log_file = rundir.log_path(cfg)
    if rank == 0 and os.path.isfile(log_file):
        plot = plot_curves(log_file, os.path.join(os.path.dirname(log_file), "curves.png"))
        print(f"log: {log_file}; curves: {plot}")
    return history


def main(argv=None):
    return run_entry(run, argv, cleanup=cleanup_distributed)


if __name__ == "__main__":
    main()
