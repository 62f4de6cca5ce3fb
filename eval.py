"""Evaluate a checkpoint: encode every image once and every caption once, then print recall@1/5/10.

With several captions per image both protocols are printed from one pass: all captions (COCO 5k / Flickr30k 1k
style) and one caption per image (the reference run's protocol, the caption chosen as prepare_data does).

    python eval.py                                  # reads configs/eval.yaml
    python eval.py --model-path checkpoints/last.pt --valid-root datasets/valid

The model is rebuilt from the config stored inside the checkpoint. train.py's per-epoch validation runs the
same `engine.evaluation.evaluate`, so the two always agree.
"""
from engine.checkpoint import load_trained
from engine.config import Schema, at_least, format_config, load_config, one_of, positive, workers
from engine.errors import run_entry
from engine.evaluation import Encoding, evaluate
from engine.files import write_json
from engine.images import ImageLimits
from engine.metrics import format_table
from engine.runtime import amp_context, resolve_device

SCHEMA = Schema({
    "model-path": ("checkpoints/best.pt", (str,), "checkpoint to evaluate"),
    "valid-root": ("datasets/valid", (str,), "folder with captions.csv and images/"),
    "batch-size": (128, (int,), "images or captions encoded at once", positive),
    "num-workers": ("auto", (int, str), "image-decoding worker processes, or auto", workers),
    "max-image-pixels": (40_000_000, (int,), "largest image accepted, in decoded pixels (bigger: skipped or an error)",
                         positive),
    "max-aspect-ratio": (20.0, (float,), "longest side / shortest side accepted for an image", at_least(1)),
    "use-amp": (True, (bool,), "CUDA autocast while encoding (ignored on the CPU)"),
    "amp-dtype": ("float16", (str,), "autocast dtype on CUDA: float16 or bfloat16", one_of("float16", "bfloat16")),
    "device": ("auto", (str,), "auto, cpu or cuda"),
    "text-model": (None, (str, type(None)), "tokenizer/config folder; null = the one named in the checkpoint"),
    "output": ("checkpoints/eval.json", (str,), "where the metrics are written as JSON"),
})


def run(argv):
    cfg = load_config(SCHEMA, argv, "configs/eval.yaml", "Evaluate a retrieval checkpoint.")
    print("config:\n" + format_config(cfg))
    device = resolve_device(cfg["device"])
    model, tokenizer, run_cfg = load_trained(cfg["model-path"], device, cfg["text-model"])
    enc = Encoding(run_cfg["image-size"], run_cfg["max-length"], cfg["batch-size"], cfg["num-workers"], device,
                   amp_context(device, cfg["use-amp"], cfg["amp-dtype"]),
                   ImageLimits(cfg["max-image-pixels"], cfg["max-aspect-ratio"]))
    metrics = evaluate(model, tokenizer, cfg["valid-root"], enc, progress=True)
    print(format_table(metrics))
    if "one_caption_per_image" in metrics:  # the reference run's protocol, from the same features
        print("\n" + format_table(metrics["one_caption_per_image"]))
    write_json(cfg["output"], {**metrics, "checkpoint": cfg["model-path"], "valid_root": cfg["valid-root"]})
    print(f"metrics written to {cfg['output']}")
    return metrics


def main(argv=None):
    return run_entry(run, argv)


if __name__ == "__main__":
    main()
