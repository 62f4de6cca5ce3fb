"""Checkpoints: everything needed to resume a run or rebuild its model, written atomically, read without running code.

A checkpoint is a dict: model, optimizer, scheduler, scaler (and the loss's own parameters when it has any),
epoch, step, RNG states of every process, the merged config and the epoch's metrics. `load_trained` rebuilds a
model from the config stored inside, so evaluation and inference need no model flags; it takes a model folder
(engine.model_folder) as well.

A checkpoint is a file from elsewhere (the web service loads whatever path it is given), so it is read with
torch.load(weights_only=True), which rebuilds tensors and plain containers only and refuses any other object
instead of calling it. So everything a checkpoint stores is plain: `save_checkpoint` converts or refuses the rest.
"""
import hashlib
import json
import os
import re

import numpy as np
import torch
from numpy._core import multiarray

from engine.config import check_stored_config
from engine.errors import UserError
from engine.files import atomic_write
from engine.model_folder import is_model_folder, read_model_folder
from model import ModelError, build_model, load_tokenizer, text_length_limit

REQUIRED_KEYS = ("model", "config")
SAFE_LEAVES = (torch.Tensor, str, int, float, bool, type(None), torch.dtype, torch.device)
# Checkpoints written before 2026-12 hold NumPy's RNG state as an ndarray. These constructors only rebuild an
# array (or a NumPy number) from its bytes, so such files still load safely as they are, with no conversion.
# NumPy 1 wrote the module as numpy.core, NumPy 2 as numpy._core.
LEGACY_NUMPY = [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar,
                (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
                (multiarray.scalar, "numpy.core.multiarray.scalar")] + \
    [type(np.dtype(t)) for t in (np.uint32, np.int32, np.int64, np.float32, np.float64)]


class CheckpointError(UserError, ValueError):
    """A checkpoint file that is missing, damaged, not one of ours, or holding objects that could run code."""


def plain(value, where="state"):
    """`value` with NumPy numbers and arrays turned into Python numbers and tensors, so that the safe loader
    accepts it; a TypeError names any other object (a bug in the saving code, never the user's)."""
    if isinstance(value, SAFE_LEAVES):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, dict):
        items = {k: plain(v, f"{where}[{k!r}]") for k, v in value.items()}
        return value if all(items[k] is value[k] for k in value) else dict(items)  # keeps a state dict's metadata
    if isinstance(value, (list, tuple)):
        items = [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        same = all(a is b for a, b in zip(items, value, strict=True))
        return value if same else (list(items) if isinstance(value, list) else tuple(items))
    raise TypeError(f"{where} is a {type(value).__name__}, which torch.load(weights_only=True) refuses; store "
                    f"it as numbers, strings, lists, dicts or tensors")


def save_checkpoint(path, **state):
    """Write to a temporary name in the same folder, then rename: a crash never leaves half a file."""
    state = plain(state)
    return atomic_write(path, lambda f: torch.save(state, f), binary=True)


def load_checkpoint(path, map_location="cpu"):
    """The checkpoint dict at `path`; a missing, truncated, foreign or code-carrying file is a one-line
    CheckpointError, and nothing in it runs."""
    if os.path.isdir(path):
        if is_model_folder(path):
            raise CheckpointError(f"'{path}' is a model folder, which holds weights only; resuming a run needs its "
                                  f"last.pt")
        found = sorted(n for n in os.listdir(path) if n.endswith(".pt"))[:3]
        example = ", ".join(os.path.join(path, n) for n in found) or os.path.join(path, "best.pt")
        raise CheckpointError(f"checkpoint '{path}' is a folder, not a checkpoint file; pass a file in it, "
                              f"e.g. {example}")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist; train one with train.py or fix the path")
    try:
        with torch.serialization.safe_globals(LEGACY_NUMPY):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- whatever a foreign file makes the loader raise, the file is at fault
        raise unreadable(path, e) from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS) or \
            not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"'{path}' is not a checkpoint written by train.py (it lacks the model weights or "
                              f"the run's config); pass a best.pt or last.pt from a training run")
    return ckpt


def unreadable(path, error):
    """The one-line error for a file torch.load refused or could not parse."""
    text = str(error)
    code = re.search(r"GLOBAL (\S+)", text) or re.search(r"got <class '([^']+)'>", text)
    if code or text.startswith("Weights only load failed"):
        what = code.group(1) if code else "an object the safe loader does not accept"
        return CheckpointError(f"'{path}' was refused: it holds {what}, which could run code when opened, and a "
                               f"checkpoint from train.py holds only tensors and plain values; do not use this "
                               f"file, ask its author for a model folder (python -m inference.export --format hf)")
    reason = text.splitlines()[0][:120] if text else type(error).__name__
    return CheckpointError(f"'{path}' is not a readable checkpoint ({reason}); it may be truncated or "
                           f"not written by train.py: use another file or train again")


def read_model(path):
    """(checkpoint-like dict with "model" and "config", the file that holds the weights) of a checkpoint file or
    a model folder."""
    if os.path.isdir(path) and is_model_folder(path):
        return read_model_folder(path)
    return load_checkpoint(path), path


def load_trained(path, device, text_model=None):
    """Model and tokenizer rebuilt from a checkpoint's stored config; returns (model, tokenizer, run_cfg).

    `text_model` overrides the tokenizer/config folder recorded in the checkpoint (e.g. after moving it); one
    whose vocabulary does not fit the checkpoint's text tower is refused (`check_tokenizer`).
    """
    ckpt, weights = read_model(path)
    run_cfg = check_stored_config(ckpt.get("config"), path)
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
        raise CheckpointError(f"the weights in '{weights}' do not fit the model its config describes "
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
