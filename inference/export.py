"""Export a checkpoint: its two towers to ONNX, or the whole model as a folder to share (--format hf).

    python -m inference.export --model-path checkpoints/best.pt --output exported/
    python -m inference.export --format hf --model-path checkpoints/best.pt --output models/my-model

--format hf writes a model folder (engine.model_folder: model.safetensors, config.json, text/ with the tokenizer,
README.md with the model card), which every entry takes as --model-path and the Hugging Face hub can host.
--format onnx (the default) writes
    image_encoder.onnx   pixel_values (B, 3, H, W) float32, normalised -> image_embeds (B, D), L2-normalised
    text_encoder.onnx    input_ids, attention_mask (B, T) int64         -> text_embeds (B, D), L2-normalised
    tokenizer files      the checkpoint's tokenizer (Hugging Face format)
    export.json          image size, mean/std, max length, logit scale, embedding size, opset

Batch (B) and sequence (T) axes are dynamic. Images are resized (short side) and centre-cropped to the image
size, scaled to [0, 1] and normalised with mean/std, as dataset.image_transform + dataset.normalize do. The
graphs are traced with the TorchScript-based exporter (`dynamo=False`): it handles the Hugging Face text
model's attention-mask code without graph breaks and needs no extra packages beyond `onnx`.
"""
import argparse
import os
import sys
import warnings


def parse_args(argv):
    p = argparse.ArgumentParser(description="Export the image and text towers of a checkpoint to ONNX, or the whole "
                                            "model as a folder to share (--format hf).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-path", required=True, help="checkpoint written by train.py, or a model folder")
    p.add_argument("--output", required=True, help="folder for the .onnx graphs, tokenizer and export.json, or "
                                                   "for the model folder (--format hf)")
    p.add_argument("--format", choices=("onnx", "hf"), default="onnx",
                   help="onnx: the two towers as ONNX graphs; hf: a model folder to share (safetensors)")
    p.add_argument("--text-model", help="tokenizer/config folder; default: the one named in the checkpoint")
    return p.parse_args(argv)


# --help or a mistyped option is answered before torch and transformers load (seconds, hundreds of MB): the command
# line is checked here, and the heavy imports below run only once it parses.
if __name__ == "__main__":
    parse_args(sys.argv[1:])

import torch

from dataset import tokenize
from engine.checkpoint import vocab_fingerprint
from engine.errors import run_entry
from engine.files import write_json
from engine.model_folder import write_model_folder
from inference.encoder import Encoder, InferenceError
from inference.model_card import model_card, read_report
from model import IMAGENET_MEAN, IMAGENET_STD

OPSET = 17  # supported by onnxruntime >= 1.14 and by the TorchScript exporter


class ImageTower(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):  # (B, 3, H, W) -> (B, D)
        return self.model.encode_image(pixel_values)


class TextTower(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):  # (B, T), (B, T) -> (B, D)
        return self.model.encode_text(input_ids, attention_mask)


def export(encoder, out):
    """Write both graphs, the tokenizer and export.json to `out`; returns the paths of the two graphs.

    `encoder` must be on the CPU. Its text model is switched to eager attention for the trace, then back.
    """
    os.makedirs(out, exist_ok=True)
    model = encoder.model.float().eval()
    text_config = model.text.model.config
    attention = text_config._attn_implementation
    text_config._attn_implementation = "eager"  # plain matmul attention traces to portable ops
    size = encoder.image_size
    images = torch.randn(2, 3, size, size)  # (B, 3, H, W), example input only
    ids, mask = tokenize(encoder.tokenizer, ["an example", "an example caption, padded"], encoder.max_length)
    paths = {"image": os.path.join(out, "image_encoder.onnx"), "text": os.path.join(out, "text_encoder.onnx")}
    try:
        _export_graphs(model, images, ids, mask, paths)
    finally:
        text_config._attn_implementation = attention
    encoder.tokenizer.save_pretrained(out)
    info = {"image_size": size, "resize": "short side to image_size (bilinear, antialiased), centre crop",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "max_length": encoder.max_length,
            "logit_scale": encoder.logit_scale(), "embedding_dim": encoder.dim, "opset": OPSET,
            "checkpoint": encoder.identity()}
    write_json(os.path.join(out, "export.json"), info)
    return paths


def _export_graphs(model, images, ids, mask, paths):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python branches on shapes, which are constant here
        torch.onnx.export(ImageTower(model).eval(), (images,), paths["image"],
                          input_names=["pixel_values"], output_names=["image_embeds"],
                          dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
                          opset_version=OPSET, dynamo=False)
        torch.onnx.export(TextTower(model).eval(), (ids, mask), paths["text"],
                          input_names=["input_ids", "attention_mask"], output_names=["text_embeds"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"},
                                        "text_embeds": {0: "batch"}},
                          opset_version=OPSET, dynamo=False)


def export_folder(encoder, out):
    """Write the model folder for the hub (see the module docstring) to `out`; returns `out`."""
    model, run_cfg = encoder.model, encoder.run_cfg
    extra = {"image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
             "image_resize": "short side to image_size (bilinear, antialiased), centre crop",
             "text_model_type": model.text.model.config.model_type}
    report, note = read_report(encoder.model_path)
    config = {"image_model": run_cfg["image-model"], "text_pooling": run_cfg.get("text-pooling", "first"),
              "embedding_dim": encoder.dim, "image_size": encoder.image_size, "max_length": encoder.max_length,
              **extra}
    card = model_card(run_cfg, config, report, note, os.path.basename(os.path.normpath(out)))
    return write_model_folder(model, encoder.tokenizer, run_cfg, out, vocab_fingerprint(encoder.tokenizer), card,
                              extra)


def run(a):
    if os.path.isfile(a.output):
        raise InferenceError(f"--output '{a.output}' is a file; pass a folder")
    if a.format == "hf":
        out = export_folder(Encoder(a.model_path, "cpu", a.text_model), a.output)
        print(f"wrote the model folder {out}: model.safetensors, config.json, text/ (tokenizer) and README.md; "
              f"share it with: hf upload <your-user>/{os.path.basename(os.path.normpath(out))} {out} .")
        return out
    paths = export(Encoder(a.model_path, "cpu", a.text_model), a.output)
    print(f"wrote {paths['image']}, {paths['text']}, the tokenizer and export.json to {a.output}")
    return paths


def main(argv=None):
    return run_entry(run, parse_args(argv))


if __name__ == "__main__":
    main()
