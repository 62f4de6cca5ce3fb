"""Resuming a run: what must match the checkpoint, what may differ (and is said), and putting its state back.

A checkpoint's weights and optimizer state only fit a model built the same way, so the keys that define the model
or the optimizer's parameter groups must be those of the checkpoint's run: otherwise a one-line ConfigError names
the key and both values, before anything is read or trained. The text model is compared by its tokenizer's
vocabulary, not its path: a checkpoint stores the absolute path of a local folder, which may have moved, and a
folder with another vocabulary maps every caption to other token ids (the weights still load, the loss jumps).
Keys that change the numbers but not the shapes (batch size, rates, data) may differ; one note lists them.
"""
import json
import os

from engine.checkpoint import CheckpointError, vocab_fingerprint
from engine.config import ConfigError
from engine.runtime import set_rng_state
from model import load_tokenizer

# They define the model's parameters and buffers or the optimizer's parameter groups (a frozen tower is not in
# them; the temperature is a parameter when learnable, else a buffer that the checkpoint's value would replace).
MODEL_KEYS = ("image-model", "text-pooling", "loss", "learnable-temperature", "freeze-image", "freeze-text",
              "freeze-bn", "queue-size")  # the queue's size is the shape of the loss's buffers
# what checkpoints from before these keys existed used
LEGACY = {"loss": "infonce", "text-pooling": "first", "queue-size": 0, "queue-momentum": None}
# They change the numbers, not the shapes: a resumed run may change them, and is told it did.
NOTE_KEYS = ("epochs", "batch-size", "learning-rate", "projection-learning-rate", "weight-decay", "warmup-steps",
             "grad-clip", "use-amp", "amp-dtype", "use-augment", "image-size", "max-length", "train-root",
             "train-shards", "samples-per-epoch", "select-root", "select-images", "seed", "queue-warmup",
             "queue-momentum", "hard-negative-weight", "hard-negative-margin")
# AdamW's state holds each group's rate and decay: loading it puts the checkpoint's values back
KEPT_BY_OPTIMIZER = ("learning-rate", "projection-learning-rate", "weight-decay")


def show(value):
    """A config value as it is written on the command line: true, null, 0.002."""
    return json.dumps(value) if value is None or isinstance(value, bool) else value


def check_config(cfg, ckpt, path):
    """Raise a ConfigError when a key that defines the model differs from the checkpoint's run; else return a
    note naming the other keys that differ (None when none do)."""
    old = ckpt["config"]
    keys = list(MODEL_KEYS)
    if cfg["freeze-image"] and old.get("freeze-image"):  # a frozen image tower keeps its BatchNorm fixed anyway
        keys.remove("freeze-bn")
    if not cfg["learnable-temperature"]:
        keys.append("temperature")
    if "projection-learning-rate" in old and (old["projection-learning-rate"] is None) != \
            (cfg["projection-learning-rate"] is None):  # a head rate makes groups of their own
        keys.append("projection-learning-rate")
    if (old.get("queue-momentum") is None) != (cfg["queue-momentum"] is None):  # momentum towers exist or not
        keys.append("queue-momentum")
    for key in keys:
        stored = old.get(key, LEGACY.get(key))
        if (key in old or key in LEGACY) and stored != cfg[key]:
            raise ConfigError(f"{path} was trained with {key} {show(stored)}, but this run has {key} "
                              f"{show(cfg[key])}; resume with --{key} {show(stored)}, or train a new run without "
                              f"--load-checkpoint")
    changed = []
    for key in NOTE_KEYS:
        if key in old and old[key] != cfg[key]:
            kept = "; the checkpoint's optimizer keeps its own" if key in KEPT_BY_OPTIMIZER else ""
            changed.append(f"{key} {show(cfg[key])} (was {show(old[key])}{kept})")
    return f"note: resuming {path} with {', '.join(changed)}" if changed else None


def check_text_model(cfg, ckpt, path, fingerprint):
    """Raise a ConfigError when text-model's vocabulary is not that of the checkpoint's run. Checkpoints from
    before the fingerprint was stored are compared with their text-model folder while it exists; returns a note
    when nothing can be compared."""
    old = ckpt["config"].get("text-model")
    stored = ckpt.get("text_vocab")
    if stored is None and old is not None and os.path.isdir(old):
        stored = vocab_fingerprint(load_tokenizer(old))
    if stored is None:
        if old is None or old == cfg["text-model"]:
            return None
        return (f"note: cannot check that text-model {cfg['text-model']} has the vocabulary of {old}, which "
                f"{path} was trained with and which is gone; a different one would make the loss jump")
    if stored != fingerprint:
        raise ConfigError(f"text-model {cfg['text-model']} has another vocabulary than text-model {old}, which "
                          f"{path} was trained with; resume with --text-model {old} (or a copy of it), or train a "
                          f"new run without --load-checkpoint")
    return None


def restore(ckpt, path, model, loss_fn, optimizer, scheduler, scaler, rank, momentum=None):
    """Put the checkpoint's state into the run's objects; returns (first epoch to train, best rsum, its epoch)."""
    try:
        model.load_state_dict(ckpt["model"])
        loss_fn.load_state_dict(ckpt.get("loss", {}))
        optimizer.load_state_dict(ckpt["optimizer"])
        if momentum is not None:
            momentum.load_state_dict(ckpt["momentum"])
    except (RuntimeError, ValueError, KeyError) as e:  # a shape or group that check_config could not see
        raise CheckpointError(f"the state in {path} does not fit this run's model or optimizer "
                              f"({str(e).splitlines()[0][:160]}); resume with the model settings of that run, or "
                              f"train a new run without --load-checkpoint") from None
    scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt["scaler"]:  # empty when saved without fp16 AMP; a scaler that is on now keeps its initial scale
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
    return ckpt["epoch"] + 1, ckpt["best_rsum"], ckpt.get("best_epoch")
