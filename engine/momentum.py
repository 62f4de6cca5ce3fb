"""Momentum (EMA) copies of the two towers, which encode what the loss's feature queue keeps.

A queue filled by the trained towers holds features from older versions of them, which drift away from what
the towers compute now. MoCo (He et al. 2020) and ALBEF (Li et al. 2021) fill it instead from a slowly moving
average of the towers, so old and new queue entries stay comparable. As in ALBEF, the average moves at the start
of each step, from the weights the previous step's update left, and then encodes the step's batch.

The copies only fill the queue: the loss's in-batch terms, evaluation and export use the trained towers.
They encode in eval mode (no dropout; BatchNorm with the running statistics copied from the trained towers), so
the queued features draw nothing from the RNG and do not depend on how gradient caching splits the batch.
"""
import copy

import torch
from torch import nn


def _unwrap(model):
    return getattr(model, "module", model)  # DistributedDataParallel keeps the model as .module


class MomentumTowers(nn.Module):
    """An EMA copy of a RetrievalModel: after `update`, weight = momentum * weight + (1 - momentum) * trained.

    Its state_dict holds tensors only (the copy's weights and buffers), so a checkpoint saves it and
    torch.load(weights_only=True) reads it back; a resume continues with the same averages.
    """

    def __init__(self, model, momentum):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"queue-momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        # deepcopy keeps device and memory format; torch.compile's wrapper is not copied, so the copy runs eagerly
        self.towers = copy.deepcopy(_unwrap(model)).requires_grad_(False)
        for p in self.towers.parameters():
            p.grad = None
        self.train(False)

    def train(self, mode=True):
        """Always eval mode, whatever the caller asks (see the module docstring)."""
        return super().train(False)

    @torch.no_grad()
    def update(self, model):
        """Move the average one step towards `model` (the trained model, DDP-wrapped or not)."""
        online = _unwrap(model)
        pairs = list(zip(self.towers.parameters(), online.parameters(), strict=True))
        for mine, theirs in pairs:
            mine.lerp_(theirs.detach(), 1.0 - self.momentum)
        # BatchNorm statistics are not averaged: eval mode uses them, so they follow the trained towers'
        for mine, theirs in zip(self.towers.buffers(), online.buffers(), strict=True):
            mine.copy_(theirs)

    @torch.no_grad()
    def encode(self, batch, amp, micro=None):
        """(image features (B, D), caption features (B, D)) of a batch, in chunks of `micro` pairs when set."""
        images, ids, mask = batch["images"], batch["input_ids"], batch["attention_mask"]
        step = micro or images.shape[0]
        img_parts, txt_parts = [], []
        for s in range(0, images.shape[0], step):
            with amp:
                img, txt, _ = self.towers(images[s:s + step], ids[s:s + step], mask[s:s + step])
            img_parts.append(img)
            txt_parts.append(txt)
        return torch.cat(img_parts), torch.cat(txt_parts)
