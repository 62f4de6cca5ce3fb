"""Checkpoints: everything needed to resume a run or rebuild its model, written atomically."""
import os
import random

import numpy as np
import torch


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, **state):
    """Write to a temporary name in the same folder, then rename: a crash never leaves half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint '{path}' does not exist; train one with train.py or fix the path")
    # Our checkpoints hold RNG states and config dicts besides tensors, so full unpickling is needed:
    # load only checkpoints you trust.
    return torch.load(path, map_location=map_location, weights_only=False)
