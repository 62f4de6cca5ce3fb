"""Evaluate a checkpoint: encode every image once and every caption once, then print recall@1/5/10.

    python eval.py                                  # reads configs/eval.yaml
    python eval.py --model-path checkpoints/last.pt --valid-root datasets/valid

The model is rebuilt from the config stored inside the checkpoint. train.py calls `evaluate` below for its
per-epoch validation, so the two always agree.
"""
import json
import os
import sys

import torch
from tqdm import tqdm

from checkpoint import load_checkpoint
from config import ConfigError, Schema, format_config, load_config
from dataset import DataError, ImageDataset, PairDataset, image_transform, make_loader, normalize, tokenize
from metrics import format_table, retrieval_metrics
from model import ModelError, build_model, load_tokenizer, text_length_limit
from runtime import DeviceError, amp_context, resolve_device

SCHEMA = Schema({
    "model-path": ("checkpoints/best.pt", (str,), "checkpoint to evaluate"),
    "valid-root": ("datasets/valid", (str,), "folder with captions.csv and images/"),
    "batch-size": (128, (int,), "images or captions encoded at once"),
    "num-workers": ("auto", (int, str), "image-decoding worker processes, or auto"),
    "use-amp": (True, (bool,), "CUDA autocast while encoding (ignored on the CPU)"),
    "amp-dtype": ("float16", (str,), "autocast dtype on CUDA: float16 or bfloat16"),
    "device": ("auto", (str,), "auto, cpu or cuda"),
    "text-model": (None, (str, type(None)), "tokenizer/config folder; null = the one named in the checkpoint"),
    "output": ("checkpoints/eval.json", (str,), "where the metrics are written as JSON"),
})

USER_ERRORS = (ConfigError, DataError, ModelError, DeviceError, FileNotFoundError)


@torch.no_grad()
def encode_images(model, paths, image_size, batch_size, num_workers, device, amp, progress=False):
    """(N, D) features of the image files, in order, each decoded once."""
    data = ImageDataset(paths, image_transform(image_size), min_size=image_size)
    loader = make_loader(data, batch_size, num_workers, device)
    feats = []
    for images in tqdm(loader, desc="images", disable=not progress, leave=False):
        images = normalize(images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last))
        with amp:
            feats.append(model.encode_image(images).float())
    return torch.cat(feats)


@torch.no_grad()
def encode_texts(model, tokenizer, texts, max_length, batch_size, device, amp, progress=False):
    """(N, D) features of the texts, in order. Batches are formed by length so little time goes on padding."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    feats = torch.empty(len(texts), model.dim)
    for s in tqdm(range(0, len(texts), batch_size), desc="captions", disable=not progress, leave=False):
        idx = order[s:s + batch_size]
        ids, mask = tokenize(tokenizer, [texts[i] for i in idx], max_length)
        with amp:
            feats[idx] = model.encode_text(ids.to(device), mask.to(device)).float().cpu()
    return feats


def evaluate(model, tokenizer, root, image_size, max_length, batch_size, num_workers, device, amp,
             progress=False):
    """Full retrieval metrics of `model` on the split at `root` (see metrics.retrieval_metrics)."""
    split = PairDataset(root, transform=None)
    was_training = model.training
    model.eval()
    try:
        paths = [os.path.join(root, "images", n) for n in split.image_files]
        img = encode_images(model, paths, image_size, batch_size, num_workers, device, amp, progress)
        txt = encode_texts(model, tokenizer, [c for _, c in split.pairs], max_length, batch_size, device, amp,
                           progress)
    finally:
        model.train(was_training)
    return retrieval_metrics(img.to(device), txt.to(device), torch.tensor(split.image_ids))


def write_json(path, data):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def load_trained(path, device, text_model=None):
    """Model and tokenizer rebuilt from a checkpoint's stored config; returns (model, tokenizer, run_cfg)."""
    ckpt = load_checkpoint(path)
    run_cfg = dict(ckpt["config"])
    if text_model is not None:
        run_cfg["text-model"] = text_model
    model = build_model(run_cfg, pretrained=False)
    model.load_state_dict(ckpt["model"])
    model.to(device).to(memory_format=torch.channels_last).eval()
    tokenizer = load_tokenizer(run_cfg["text-model"])
    run_cfg["max-length"] = min(run_cfg["max-length"], text_length_limit(model.text.model.config))
    return model, tokenizer, run_cfg


def run(argv):
    cfg = load_config(SCHEMA, argv, "configs/eval.yaml", "Evaluate a retrieval checkpoint.")
    print("config:\n" + format_config(cfg))
    device = resolve_device(cfg["device"])
    model, tokenizer, run_cfg = load_trained(cfg["model-path"], device, cfg["text-model"])
    metrics = evaluate(model, tokenizer, cfg["valid-root"], run_cfg["image-size"], run_cfg["max-length"],
                       cfg["batch-size"], cfg["num-workers"], device,
                       amp_context(device, cfg["use-amp"], cfg["amp-dtype"]), progress=True)
    print(format_table(metrics))
    write_json(cfg["output"], {**metrics, "checkpoint": cfg["model-path"], "valid_root": cfg["valid-root"]})
    print(f"metrics written to {cfg['output']}")
    return metrics


def main(argv=None):
    try:
        return run(argv)
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
