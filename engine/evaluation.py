"""Evaluation: encode every image once and every caption once, then compute the retrieval metrics.

train.py's per-epoch validation, eval.py and the inference encoder all go through these functions, so the
numbers they report cannot drift apart.
"""
import os
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from dataset import (
    ImageDataset,
    PairDataset,
    choose_captions,
    collate_decoded,
    image_transform,
    make_loader,
    normalize,
    tokenize,
)
from engine.errors import DataError
from engine.images import DEFAULT_LIMITS, ImageLimits
from engine.metrics import fold_metrics, renumber, retrieval_metrics, text_groups


@dataclass
class Encoding:
    """How to turn images and captions into features: the preprocessing of the run and where to compute."""
    image_size: int
    max_length: int
    batch_size: int
    num_workers: Any  # a whole number or "auto"
    device: torch.device
    amp: Any  # an autocast context, or a null context
    limits: ImageLimits = DEFAULT_LIMITS  # the most work one image file may cause


@torch.no_grad()
def encode_image_batch(model, images, enc):
    """uint8 (B, 3, H, W) from image_transform -> (B, D) float32 features on the CPU."""
    images = normalize(images.to(enc.device, non_blocking=True).contiguous(memory_format=torch.channels_last))
    with enc.amp:
        return model.encode_image(images).float().cpu()


@torch.no_grad()
def encode_image_files(model, paths, enc, progress=False):
    """Encode image files, each decoded once, skipping those that fail to decode.

    Returns ((M, D) features, the M kept indices into `paths`, [(index, reason)] for the failures).
    """
    data = ImageDataset(paths, image_transform(enc.image_size), min_size=enc.image_size, limits=enc.limits)
    loader = make_loader(data, enc.batch_size, enc.num_workers, enc.device, collate_fn=collate_decoded)
    feats, kept, failed = [], [], []
    for images, idx, bad in tqdm(loader, desc="images", disable=not progress, leave=False, dynamic_ncols=True):
        failed += bad
        if idx:
            feats.append(encode_image_batch(model, images, enc))
            kept += idx
    dim = model.dim
    return (torch.cat(feats) if feats else torch.empty(0, dim)), kept, failed


@torch.no_grad()
def encode_texts(model, tokenizer, texts, enc, progress=False):
    """(N, D) features of the texts, in order. Batches are formed by length so little time goes on padding."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    feats = torch.empty(len(texts), model.dim)
    for s in tqdm(range(0, len(texts), enc.batch_size), desc="captions", disable=not progress, leave=False):
        idx = order[s:s + enc.batch_size]
        ids, mask = tokenize(tokenizer, [texts[i] for i in idx], enc.max_length)
        with enc.amp:
            feats[idx] = model.encode_text(ids.to(enc.device), mask.to(enc.device)).float().cpu()
    return feats


def one_caption_rows(split, seed=0):
    """Row indices of `split.pairs` keeping one caption per image, chosen by the rule of
    `prepare_data --captions-per-image 1` (dataset.choose_captions), so both protocols come from one folder."""
    rows = {}
    for r, (name, _) in enumerate(split.pairs):
        rows.setdefault(name, []).append(r)
    return sorted(choose_captions(name, r, 1, seed)[0] for name, r in rows.items())


def evaluate(model, tokenizer, root, enc, progress=False, only=None, seed=0, pairs=None, folds=1, group_texts=True):
    """Full retrieval metrics of `model` on the split at `root` (see engine.metrics.retrieval_metrics).

    `only` restricts the split to those image files (a held-out selection split). When images have several
    captions, the metrics of the one-caption-per-image protocol are added under "one_caption_per_image", from
    the same features (each image is encoded once for both). Every image must decode: a file that does not is an
    error naming it, since a skipped image would change the task the numbers describe. `pairs`: the split's rows
    as `read_captions(root)` returned them, when the caller has read them already.
    `folds` > 1 adds "folds": the mean over that many folds of consecutive images (in captions.csv order, each
    with its own captions; COCO 1K is 5 folds of the 5,000 test images), from the same features; it must divide
    the image count. `group_texts`: rows with identical caption text are one text -> image query that hits when
    any of its images is in the top K (engine.metrics.text_groups); False: every row is its own query.
    """
    split = PairDataset(root, transform=None, only=only, limits=enc.limits, pairs=pairs)
    if not split.pairs:
        raise DataError(f"no captioned image of {root} is left to evaluate")
    if len(split.image_files) % folds:  # checked before any encoding: a shorter last fold is not the protocol
        raise DataError(f"folds {folds} does not divide the {len(split.image_files)} images of {root}; every "
                        f"fold must hold as many images (COCO 1K: folds 5 on the 5,000 test images); pass a fold "
                        f"count that divides {len(split.image_files)}, or folds 1")
    texts = [c for _, c in split.pairs]
    unique = list(dict.fromkeys(texts))  # a text on several images is encoded once: its rows share features
    was_training = model.training
    model.eval()
    try:
        paths = [os.path.join(root, "images", n) for n in split.image_files]
        img, _, failed = encode_image_files(model, paths, enc, progress)
        if failed:
            raise DataError(failed[0][1])
        txt = encode_texts(model, tokenizer, unique, enc, progress)
    finally:
        model.train(was_training)
    if len(unique) < len(texts):
        position = {t: i for i, t in enumerate(unique)}
        txt = txt[torch.tensor([position[t] for t in texts])]  # (Nc, D) back to one row per caption
    query = text_groups(texts) if group_texts else None  # (Nc,) or None: each row its own query
    img, txt, ids = img.to(enc.device), txt.to(enc.device), torch.tensor(split.image_ids)  # (Ni, D), (Nc, D), (Nc,)
    metrics = retrieval_metrics(img, txt, ids, query)
    if len(split.pairs) > len(split.image_files):
        keep = torch.tensor(one_caption_rows(split, seed))
        metrics["one_caption_per_image"] = retrieval_metrics(img, txt[keep.to(txt.device)], ids[keep],
                                                             renumber(query[keep]) if query is not None else None)
    if folds > 1:
        order = torch.tensor(list(dict.fromkeys(split.image_ids)))  # (Ni,) images in captions.csv order
        metrics["folds"] = fold_metrics(img, txt, ids, query, order, folds)
    return metrics
