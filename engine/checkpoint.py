"""Checkpoints: everything needed to resume a run or rebuild its model, written atomically.

A checkpoint is a dict: model, optimizer, scheduler, scaler (and the loss's own parameters when it has any),
epoch, step, RNG states of every process, the merged config and the epoch's metrics. `load_trained` rebuilds a
model from the config stored inside, so evaluation and inference need no model flags.
"""
import hashlib
import json
import os
import pickle
import zipfile

import torch

from engine.errors import UserError
from engine.files import atomic_write
from model import ModelError, build_model, load_tokenizer, text_length_limit

REQUIRED_KEYS = ("model", "config")


class CheckpointError(UserError, ValueError):
    """A checkpoint file that is missing, damaged or not one of ours."""


def save_checkpoint(path, **state):
    """Write to a temporary name in the same folder, then rename: a crash never leaves half a file."""
    return atomic_write(path, lambda f: torch.save(state, f), binary=True)


def load_checkpoint(path, map_location="cpu"):
    """The checkpoint dict at `path`; a missing, truncated or foreign file is a one-line CheckpointError."""
    if os.path.isdir(path):
        found = sorted(n for n in os.listdir(path) if n.endswith(".pt"))[:3]
        example = ", ".join(os.path.join(path, n) for n in found) or os.path.join(path, "best.pt")
        raise CheckpointError(f"checkpoint '{path}' is a folder, not a checkpoint file; pass a file in it, "
                              f"e.g. {example}")
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

    `text_model` overrides the tokenizer/config folder recorded in the checkpoint (e.g. after moving it); one
    whose vocabulary does not fit the checkpoint's text tower is refused (`check_tokenizer`).
    """
    ckpt = load_checkpoint(path)
    run_cfg = dict(ckpt["config"])
    trained_with = run_cfg["text-model"]
    if text_model is not None:
        run_cfg["text-model"] = text_model
    model = build_model(run_cfg, pretrained=False)
    embedding = model.text.model.get_input_embeddings()
    name = next((n for n, p in model.named_parameters() if p is embedding.weight), None)
    stored = ckpt["model"].get(name) if isinstance(ckpt["model"], dict) else None
    if isinstance(stored, torch.Tensor) and stored.ndim == 2 and stored.shape[0] != embedding.num_embeddings:
        raise tokenizer_mismatch(path, run_cfg["text-model"], trained_with,
                                 f"its config has {embedding.num_embeddings} tokens, the checkpoint's text tower "
                                 f"{stored.shape[0]} tokens")
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"the weights in '{path}' do not fit the model its config describes "
                              f"({str(e).splitlines()[0][:120]}); the file is damaged or was edited") from None
    model.to(device).to(memory_format=torch.channels_last).eval()
    tokenizer = load_tokenizer(run_cfg["text-model"])
    check_tokenizer(tokenizer, embedding.num_embeddings, path, run_cfg["text-model"], trained_with,
                    ckpt.get("text_vocab"))
    run_cfg["max-length"] = min(run_cfg["max-length"], text_length_limit(model.text.model.config))
    return model, tokenizer, run_cfg


def vocab_fingerprint(tokenizer):
    """A short hash of the tokenizer's vocabulary (token -> id): the same for a copied or moved folder. Training
    stores it in the checkpoint as "text_vocab"."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(vocab.encode("utf-8")).hexdigest()[:16]


def check_tokenizer(tokenizer, rows, path, folder, trained_with, fingerprint=None):
    """Refuse a tokenizer that would feed the text tower other ids than training did: more tokens than the
    embedding has `rows`, or a vocabulary other than training's: compared with the checkpoint's `fingerprint`
    when it stores one, else (older checkpoints) with the recorded `trained_with` folder if it still exists."""
    if len(tokenizer) > rows:
        raise tokenizer_mismatch(path, folder, trained_with, f"its tokenizer has {len(tokenizer)} tokens, the "
                                                             f"checkpoint's text tower {rows} tokens")
    other = "its vocabulary gives tokens other ids than the tokenizer the checkpoint was trained with"
    if fingerprint is not None:
        if vocab_fingerprint(tokenizer) != fingerprint:
            raise tokenizer_mismatch(path, folder, trained_with, other)
        return
    if folder == trained_with or not os.path.isdir(trained_with) or \
            os.path.realpath(folder) == os.path.realpath(trained_with):
        return
    try:
        original = load_tokenizer(trained_with)
    except ModelError:  # the recorded folder holds no tokenizer any more: nothing to compare with
        return
    if original.get_vocab() != tokenizer.get_vocab():
        raise tokenizer_mismatch(path, folder, trained_with, other)


def tokenizer_mismatch(path, folder, trained_with, why):
    if folder == trained_with:
        advice = "the folder has changed since training: restore it, or pass --text-model with the original"
    else:
        advice = f"pass --text-model the tokenizer folder it was trained with ({trained_with}) or a copy of it"
    return CheckpointError(f"text-model '{folder}' does not fit the checkpoint '{path}' ({why}); {advice}")
