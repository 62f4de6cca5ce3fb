"""Train the image-text retrieval model with the symmetric InfoNCE loss.

    python train.py                                   # reads configs/train.yaml
    python train.py --config configs/demo.yaml        # the built-in demo: no downloads, CPU
    python train.py --batch-size 64 --epochs 3        # any config key can be overridden
    torchrun --nproc_per_node 4 train.py              # several processes; batch-size is the global batch

Reads top to bottom: config, data, model, loss, optimizer, resume, then the epoch loop around
`engine.epoch.train_one_epoch`, with validation (the same code as eval.py), checkpoints and a JSON-lines log.
"""
import contextlib
import os

from engine.config import ConfigError, Schema, at_least, between, format_config, load_config, one_of, positive, workers
from engine.errors import DataError, run_entry
from engine.reporting import report_to_rule

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
    "projection-learning-rate": (None, (float, type(None)), "rate of the image projection, temperature and loss "
                                 "bias, which start random or scalar; null = learning-rate", positive),
    "loss": ("infonce", (str,), "infonce (softmax over the batch) or sigmoid (SigLIP's pairwise loss)",
             one_of("infonce", "sigmoid")),
    "queue-size": (0, (int,), "earlier steps' pairs kept as extra InfoNCE negatives (global, all processes); 0 = off",
                   at_least(0)),
    "queue-warmup": (0, (int,), "optimizer steps before the queue is used (it fills meanwhile)", at_least(0)),
    "queue-momentum": (None, (float, type(None)), "EMA rate of momentum towers that fill the queue, e.g. 0.995; "
                       "null = queue the trained towers' own features", lambda v: None if 0 <= v < 1 else
                       "must be in [0, 1)"),
    "hard-negative-weight": (0.0, (float,), "weight of VSE++'s max-violation hinge added to InfoNCE; 0 = off",
                             at_least(0)),
    "hard-negative-margin": (0.2, (float,), "margin of that hinge, on cosine similarity (VSE++'s value)", positive),
    "temperature": (0.07, (float,), "softmax temperature (initial value when learnable)", positive),
    "learnable-temperature": (False, (bool,), "learn the temperature (scale capped at 100)"),
    "use-amp": (True, (bool,), "CUDA mixed precision (ignored on the CPU)"),
    "amp-dtype": ("float16", (str,), "float16 (with a grad scaler) or bfloat16", one_of("float16", "bfloat16")),
    "grad-checkpointing": (False, (bool,), "recompute activations in backward to save memory"),
    "compile": (False, (bool,), "torch.compile both towers (the first steps are slow while it compiles)"),
    "compile-backend": ("inductor", (str,), "torch.compile backend: inductor (fast kernels) or eager (capture "
                        "only: a quick check that the model compiles)", one_of("inductor", "eager", "aot_eager")),
    "freeze-image": (False, (bool,), "keep the whole image tower fixed"),
    "freeze-text": (False, (bool,), "keep the whole text tower fixed"),
    "freeze-bn": (False, (bool,), "keep BatchNorm statistics and affine weights fixed"),
    # data
    "train-root": ("datasets/train", (str,), "training folder: captions.csv + images/"),
    "train-shards": (None, (str, type(None)), "WebDataset shards to stream instead of train-root, e.g. "
                     "shards/{000000..000149}.tar or pipe:..."),
    "samples-per-epoch": (None, (int, type(None)), "pairs per epoch from shards (all processes); null = "
                          "the count in the shards' sizes.json", positive),
    "shuffle-buffer": (1000, (int,), "shards: images, and as many pairs, held per loader worker for shuffling",
                       at_least(0)),
    "select-root": (None, (str, type(None)), "folder scored after every epoch to choose best.pt; null = hold "
                    "out select-images images of train-root"),
    "select-images": (1000, (int,), "images held out of train-root for selection when select-root is null",
                      positive),
    "patience": (None, (int, type(None)), "stop after this many epochs without a better selection rsum; "
                 "null = never", positive),
    "valid-root": ("datasets/valid", (str,), "report folder: scored with best.pt when training ends"),
    "report-every-epoch": (False, (bool,), "also score valid-root every epoch (logged, never used to choose)"),
    "image-size": (224, (int,), "square input side in pixels", at_least(32)),
    "max-length": (64, (int,), "tokens per caption before truncation", at_least(2)),
    "use-augment": (True, (bool,), "random resized crop + colour jitter"),
    "num-workers": ("auto", (int, str), "data-loading processes per training process, or auto", workers),
    "max-image-pixels": (40_000_000, (int,), "largest image accepted, in decoded pixels (bigger: skipped or an error)",
                         positive),
    "max-aspect-ratio": (20.0, (float,), "longest side / shortest side accepted for an image", at_least(1)),
    "demo-data": (False, (bool,), "generate the synthetic demo data and text model when absent"),
    "demo-language": ("en", (str,), "language of the demo's captions and tokenizer", one_of("en", "zh")),
    # model
    "image-model": ("resnet50", (str,), "torchvision ResNet name"),
    "text-model": ("pretrains/roberta", (str,), "Hugging Face folder or hub id"),
    "text-pooling": ("first", (str,), "text feature: first token's hidden state, or mean over tokens",
                     one_of("first", "mean")),
    "load-pretrained": (True, (bool,), "start from ImageNet / text-model weights"),
    # checkpoints and run
    "load-checkpoint": (False, (bool, str), "resume from load-path; auto: from last-path when it exists, else "
                        "start fresh (a requeued job's same command)",
                        lambda v: None if isinstance(v, bool) or v == "auto" else "must be true, false or auto"),
    "load-path": ("checkpoints/last.pt", (str,), "checkpoint to resume from"),
    "best-path": ("checkpoints/best.pt", (str,), "best checkpoint by validation rsum"),
    "last-path": ("checkpoints/last.pt", (str,), "checkpoint written every epoch"),
    "save-every-steps": (0, (int,), "also write last.pt every this many optimizer steps within an epoch; 0 = off",
                         at_least(0)),
    "save-every-minutes": (0.0, (float,), "also write last.pt every this many minutes within an epoch; 0 = off",
                           at_least(0)),
    "stop-timeout": (90.0, (float,), "seconds a stop on SIGTERM/SIGUSR1 may take to save before exiting without",
                     positive),
    "dist-timeout": (1800, (int,), "seconds a process waits for the others at a collective before it fails",
                     positive),
    "report-to": ("tensorboard", (str,), "live curves in the run folder: tensorboard, wandb, both as "
                  "tensorboard,wandb, or none", report_to_rule),
    "report-every": (10, (int,), "optimizer steps between two points of the per-step curves", positive),
    "overwrite": (False, (bool,), "start afresh over another run's checkpoints and log in the same folder"),
    "device": ("auto", (str,), "auto, cpu or cuda"),
    "seed": (0, (int,), "random seed (each process adds its rank)", between(0, 2**32 - 1025)),
})

if __name__ == "__main__":  # a config mistake or --help is answered before torch loads (seconds, ~850 MB)
    run_entry(load_config, SCHEMA, None, "configs/train.yaml", "Train an image-text retrieval model.")
import torch
from torch.nn.parallel import DistributedDataParallel

from dataset import PairCollate, PairDataset, hold_out, image_transform, make_loader, normalise_name, read_captions
from engine import resume, rundir
from engine.augment import color_jitter
from engine.checkpoint import load_checkpoint, vocab_fingerprint
from engine.epoch import Trainer
from engine.evaluation import Encoding
from engine.images import ImageLimits
from engine.loop import Run, finish, log, resume_position, run_epochs
from engine.momentum import MomentumTowers
from engine.optim import build_optimizer
from engine.preempt import StopSignals
from engine.reporting import Reporter, parse_targets
from engine.runtime import amp_context, cleanup_distributed, init_distributed, seed_everything, together
from engine.sampler import EpochSampler, SeededItems
from engine.shards import count_pairs, expand_pattern, shard_loader
from loss import make_loss
from model import build_model, load_tokenizer, text_length_limit


def stored_text_model(name):
    """What a checkpoint records as its text model: an absolute path for a local folder (so the checkpoint loads
    from any working directory), the hub id otherwise."""
    return os.path.abspath(name) if os.path.isdir(name) else name


def selection_split(cfg, pairs, ckpt):
    """(root, image files or None) scored every epoch to choose best.pt. With no select-root, a seeded hold-out
    of train-root that training never sees; a resumed run keeps the split stored in its checkpoint."""
    if cfg["select-root"] is not None:
        return cfg["select-root"], None
    if ckpt is not None and ckpt.get("select_files") is not None:  # spelled as captions.csv is read now
        return cfg["train-root"], [normalise_name(n) for n in ckpt["select_files"]]
    names = sorted({n for n, _ in pairs})
    if cfg["select-images"] >= len(names):
        raise ConfigError(f"select-images {cfg['select-images']} would hold out all {len(names)} images of "
                          f"{cfg['train-root']}; lower it or set select-root")
    return cfg["train-root"], hold_out(names, cfg["select-images"], cfg["seed"])


def run(argv):
    # ---------------------------------------------------------------- config and processes
    cfg = load_config(SCHEMA, argv, "configs/train.yaml", "Train an image-text retrieval model.")
    rank, world_size, device = init_distributed(cfg["device"], cfg["dist-timeout"])
    if cfg["load-checkpoint"] == "auto":  # the same command starts a run and continues it after a stop
        cfg["load-checkpoint"] = os.path.isfile(cfg["last-path"])
        cfg["load-path"] = cfg["last-path"] if cfg["load-checkpoint"] else cfg["load-path"]
        log(rank, f"load-checkpoint auto: {'resuming from' if cfg['load-checkpoint'] else 'no'} {cfg['last-path']}"
                  f"{'' if cfg['load-checkpoint'] else ' yet: starting fresh'}")
    log(rank, "config:\n" + format_config(cfg))
    if cfg["batch-size"] % world_size:
        raise ConfigError(f"batch-size {cfg['batch-size']} does not divide over {world_size} processes; "
                          f"use a multiple of {world_size}")
    if cfg["loss"] == "sigmoid" and (cfg["queue-size"] or cfg["hard-negative-weight"]):
        raise ConfigError("queue-size and hard-negative-weight work with loss infonce only; set them to 0 or use "
                          "--loss infonce")
    if cfg["queue-momentum"] is not None and not cfg["queue-size"]:
        raise ConfigError("queue-momentum sets the towers that fill the feature queue; give queue-size too")
    if cfg["train-shards"] and cfg["select-root"] is None:
        raise ConfigError("train-shards needs a select-root folder to choose best.pt on (a stream cannot hold "
                          "images out); prepare one with tools.prepare_data")
    rundir.check_paths(cfg)  # before the lock, which creates the run folder
    # one run at a time on these files: a second one fails at once instead of interleaving their writes
    with rundir.locked(cfg) if rank == 0 else contextlib.nullcontext(), StopSignals(cfg["stop-timeout"]) as signals:
        return fit(cfg, rank, world_size, device, signals)


def fit(cfg, rank, world_size, device, signals):
    """The run itself, with its folder locked: data, model, loss, optimizer, resume, the epoch loop, the report.
    Each `together` block ends every process when one of them meets a user error (engine.runtime)."""
    replacing = []  # another run's files that --overwrite replaces, once this run has an epoch to save
    with together(world_size):
        if rank == 0:
            note, replacing = rundir.prepare(cfg)  # before any data is read: never start over another run's files
            log(rank, note)
            if cfg["demo-data"]:
                from tools.demo import make_demo
                make_demo(cfg["train-root"], cfg["valid-root"], cfg["text-model"], seed=cfg["seed"],
                          language=cfg["demo-language"])
    with together(world_size):
        r, ckpt = setup(cfg, rank, world_size, device, signals)

    # ---------------------------------------------------------------- resume
    start_epoch, best, best_epoch, history, partial, rng = 0, -1.0, None, None, None, None
    if ckpt is not None:
        with together(world_size):
            start_epoch, best, best_epoch = resume.restore(ckpt, cfg["load-path"], r.model, r.trainer.loss_fn,
                                                           r.trainer.optimizer, r.trainer.scheduler,
                                                           r.trainer.scaler, rank, r.trainer.momentum)
        history = ckpt.get("log_line")  # the last finished epoch's line: a save within the next one keeps it
        partial, note = resume_position(cfg, ckpt, world_size, start_epoch)
        rng = ckpt["rng"][rank] if rank < len(ckpt["rng"]) else None
        log(rank, note)
        if rank == 0:
            rundir.discard(replacing)  # resumed from another run's checkpoint into these files: theirs go now
            replacing = []
            for note in rundir.repair(cfg, ckpt):
                log(rank, f"note: {note}")
        if start_epoch < cfg["epochs"]:
            at = f", step {partial['steps']} of {len(r.loader)}" if partial else ""
            log(rank, f"resumed from {cfg['load-path']} at epoch {start_epoch}{at}")
        else:  # a finished run, or one killed while writing its report: write the report as the run's end does
            history = history or {"epoch": ckpt["epoch"]}
            log(rank, f"note: {cfg['load-path']} has trained {start_epoch} epoch(s) and epochs is {cfg['epochs']}: "
                      f"nothing left to train (raise --epochs to train longer); scoring its best.pt again")

    start_step = ckpt["step"] if ckpt is not None else 0
    with together(world_size):  # wandb asked for but not installed: one line, before any training
        r.reporter = Reporter(parse_targets(cfg["report-to"]) if rank == 0 else [], rundir.run_folder(cfg),
                              cfg["report-every"], start_step)
    try:
        if not start_step:
            r.reporter.config(cfg)
        history = run_epochs(r, start_epoch, best, best_epoch, history, replacing, partial, rng)
        if rank == 0 and history is not None:  # the report: best.pt on valid-root, and the curves
            finish(r, history, trained=start_epoch < cfg["epochs"])
    finally:
        r.reporter.close()
    return history


def setup(cfg, rank, world_size, device, signals):
    """Checkpoint, data, model, loss and optimizer: (Run, the checkpoint to resume or None)."""
    local_batch = cfg["batch-size"] // world_size
    # onto the CPU: load_state_dict copies each tensor to its parameter's device, and RNG states must stay there
    ckpt = load_checkpoint(cfg["load-path"], map_location="cpu") if cfg["load-checkpoint"] else None
    if ckpt is not None:  # a model or optimizer that the checkpoint does not fit is refused before any data
        log(rank, resume.check_config(cfg, ckpt, cfg["load-path"]))
    if cfg["use-amp"] and device.type != "cuda":
        log(rank, "note: use-amp is ignored on the CPU (bf16 autocast is slower than fp32 on AVX2 CPUs)")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # inputs have one fixed size: pick the fastest convolution once
    amp = amp_context(device, cfg["use-amp"], cfg["amp-dtype"])
    seed_everything(cfg["seed"] + rank)

    # ---------------------------------------------------------------- data
    cfg["text-model"] = stored_text_model(cfg["text-model"])
    tokenizer = load_tokenizer(cfg["text-model"])
    text_vocab = vocab_fingerprint(tokenizer)  # stored, so a resume can check its text model
    if ckpt is not None:
        log(rank, resume.check_text_model(cfg, ckpt, cfg["load-path"], text_vocab))
    limits = ImageLimits(cfg["max-image-pixels"], cfg["max-aspect-ratio"])
    # workers decode, crop and resize; colour jitter runs on the whole batch on the device (engine.augment)
    transform = image_transform(cfg["image-size"], cfg["use-augment"], jitter=False)
    pairs = None if cfg["train-shards"] else read_captions(cfg["train-root"])
    select_root, select_files = selection_split(cfg, pairs, ckpt)
    # each folder's captions.csv is read and checked once, before hours of training, and its rows serve every
    # evaluation: a warning about it is given once, and no epoch checks every listed image again
    read = {} if pairs is None else {os.path.abspath(cfg["train-root"]): pairs}
    for root in (select_root, cfg["valid-root"]):
        if os.path.abspath(root) not in read:
            read[os.path.abspath(root)] = read_captions(root)
    select_pairs, valid_pairs = read[os.path.abspath(select_root)], read[os.path.abspath(cfg["valid-root"])]
    if os.path.abspath(cfg["valid-root"]) in (os.path.abspath(cfg["train-root"]), os.path.abspath(select_root)):
        log(rank, "warning: valid-root is also the training or selection data, so its scores are not a fair report")

    # ---------------------------------------------------------------- model
    model = build_model(cfg)
    model.freeze(cfg["freeze-image"], cfg["freeze-text"], cfg["freeze-bn"])
    if cfg["grad-checkpointing"]:
        model.set_grad_checkpointing(True)
    model.to(device).to(memory_format=torch.channels_last)
    if cfg["compile"]:
        # in place, per tower: parameter names (and so checkpoints) stay those of the plain model, and DDP and
        # gradient caching wrap or call the towers as before
        model.image.compile(backend=cfg["compile-backend"])
        model.text.compile(backend=cfg["compile-backend"], dynamic=True)  # caption length varies per batch
    max_length = min(cfg["max-length"], text_length_limit(model.text.model.config))
    if max_length < cfg["max-length"]:
        log(rank, f"note: max-length lowered to {max_length}, the most {cfg['text-model']} can take")
    collate = PairCollate(tokenizer, max_length)
    if cfg["train-shards"]:
        samples = cfg["samples-per-epoch"] or count_pairs(expand_pattern(cfg["train-shards"]))
        loader = shard_loader(cfg["train-shards"], transform, collate, local_batch, cfg["num-workers"], rank,
                              world_size, samples, cfg["seed"], shuffle_buffer=cfg["shuffle-buffer"],
                              min_size=cfg["image-size"],
                              pin_memory=device.type == "cuda", random_crop=cfg["use-augment"], limits=limits)
        position = loader  # set_epoch reseeds the shard order and the shuffles; resume_at skips batches
    else:
        train_set = PairDataset(cfg["train-root"], transform, strict=False, min_size=cfg["image-size"],
                                random_crop=cfg["use-augment"], limits=limits, pairs=pairs, exclude=select_files or ())
        if len(train_set) < cfg["batch-size"]:
            held = f" after holding out {len(select_files)} images for selection" if select_files else ""
            raise DataError(f"{cfg['train-root']} has {len(train_set)} training pairs{held}, fewer than one batch "
                            f"({cfg['batch-size']}); lower batch-size{' or select-images' if held else ''}")
        # order and crops follow (seed, epoch, position) alone: a resume within an epoch is exact (engine.sampler)
        position = EpochSampler(len(train_set), rank, world_size, cfg["seed"])
        loader = make_loader(SeededItems(train_set), local_batch, cfg["num-workers"], device, sampler=position,
                             collate_fn=collate, drop_last=True)
    unwrapped = model
    # EMA copies of the towers fill the queue (engine.momentum); copied before DDP wraps the model
    momentum = MomentumTowers(model, cfg["queue-momentum"]) if cfg["queue-momentum"] is not None else None
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # ---------------------------------------------------------------- loss and optimizer
    loss_fn = make_loss(cfg["loss"], rank, world_size, dim=unwrapped.dim, queue_size=cfg["queue-size"],
                        queue_warmup=cfg["queue-warmup"], hard_weight=cfg["hard-negative-weight"],
                        hard_margin=cfg["hard-negative-margin"]).to(device)  # the sigmoid loss owns a bias
    optimizer, scheduler, scaler = build_optimizer(unwrapped, cfg, cfg["epochs"] * len(loader), device, [loss_fn])
    trainer = Trainer(model, loss_fn, optimizer, scheduler, scaler, amp, device, cfg["micro-batch-size"],
                      cfg["grad-clip"], augment=color_jitter if cfg["use-augment"] else None, momentum=momentum)
    enc = Encoding(cfg["image-size"], max_length, local_batch, cfg["num-workers"], device, amp, limits)

    run = Run(cfg, rank, world_size, unwrapped, trainer, loader, position, tokenizer, enc, select_root, select_files,
              select_pairs, valid_pairs, text_vocab, signals)
    return run, ckpt



def main(argv=None):
    return run_entry(run, argv, cleanup=cleanup_distributed)


if __name__ == "__main__":
    main()
