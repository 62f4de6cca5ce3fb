"""Checkpoints: everything needed to resume a run or rebuild its model, written atomically.

A checkpoint is a dict: model, optimizer, scheduler, scaler (and the loss's own parameters when it has any),
epoch, step, RNG states of every process, the merged config and the epoch's metrics. `load_trained` rebuilds a
model from the config stored inside, so evaluation and inference need no model flags.
"""
import os
import pickle
import zipfile

import torch

from engine.errors import UserError
from engine.files import atomic_write
from model import build_model, load_tokenizer, text_length_limit

REQUIRED_KEYS = ("model", "config")


class CheckpointError(UserError, ValueError):
    """A checkpoint file that is missing, damaged or not one of ours."""


def save_checkpoint(path, **state):
    """Write to a temporary name in the same folder, then rename: a crash never leaves half a file."""
    return atomic_write(path, lambda f: torch.save(state, f), binary=True)


def load_checkpoint(path, map_location="cpu"):
    """The checkpoint dict at `path`; a missing, truncated or foreign file is a one-line CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist; train one with train.py or fix the path")
    try:
        # Our checkpoints hold RNG states and config dicts besides tensors, so full unpickling is needed:
        # load only checkpoints you trust.
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile,
            AttributeError, ModuleNotFoundError, UnicodeDecodeError) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise CheckpointError(f"'{path}' is not a readable checkpoint ({reason}); it may be truncated or "
                              f"not written by train.py: use another file or train again") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS) or \
            not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"'{path}' is not a checkpoint written by train.py (it lacks the model weights or "
                              f"the run's config); pass a best.pt or last.pt from a training run")
    return ckpt


def load_trained(path, device, text_model=None):
    """Model and tokenizer rebuilt from a checkpoint's stored config; returns (model, tokenizer, run_cfg).

    `text_model` overrides the tokenizer/config folder recorded in the checkpoint (e.g. after moving it).
    """
    ckpt = load_checkpoint(path)
    run_cfg = dict(ckpt["config"])
    if text_model is not None:
        run_cfg["text-model"] = text_model
    model = build_model(run_cfg, pretrained=False)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"the weights in '{path}' do not fit the model its config describes "
                              f"({str(e).splitlines()[0][:120]}); the file is damaged or was edited") from None
    model.to(device).to(memory_format=torch.channels_last).eval()
    tokenizer = load_tokenizer(run_cfg["text-model"])
    run_cfg["max-length"] = min(run_cfg["max-length"], text_length_limit(model.text.model.config))
    return model, tokenizer, run_cfg
