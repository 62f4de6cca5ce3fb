"""Evaluate a checkpoint: encode every image once and every caption once, then print recall@1/5/10.

With several captions per image both protocols are printed from one pass: all captions (COCO 5k / Flickr30k 1k
style) and one caption per image (the reference run's protocol, the caption chosen as prepare_data does).
`--folds 5` adds COCO 1K beside 5K from the same pass: the mean over 5 folds of consecutive images (in
captions.csv order), each fold with its own captions. Rows whose caption text is identical are one text->image
query that hits when any of its images is in the top K (MUGE's rule); `--group-texts false` makes every row its
own query, as VSE++ and CLIP count COCO and Flickr30k.

    python eval.py                                  # reads configs/eval.yaml
    python eval.py --model-path checkpoints/last.pt --valid-root datasets/valid

The model is rebuilt from the config stored inside the checkpoint. train.py's per-epoch validation runs the
same `engine.evaluation.evaluate`, so the two always agree.

`output` is checked before anything is evaluated: it may be a new file, or the JSON of an earlier run of this same
evaluation (checkpoint and valid-root), which is replaced; metrics of another checkpoint or dataset are replaced
only with `--overwrite true`, and any other file is never replaced.
"""
import json
import os

from engine.config import ConfigError, Schema, at_least, format_config, load_config, one_of, positive, workers
from engine.errors import run_entry

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
    "folds": (1, (int,), "also the mean over this many folds of consecutive images (COCO 1K: 5)", positive),
    "group-texts": (True, (bool,), "rows with one caption text: one text->image query hit by any of its images"),
    "output": ("checkpoints/eval.json", (str,), "where the metrics are written as JSON"),
    "overwrite": (False, (bool,), "replace an output holding the metrics of another checkpoint or valid-root"),
})
DESCRIPTION = ("Evaluate a retrieval checkpoint. The output JSON of an earlier run with the same model-path and "
               "valid-root is replaced; one with another checkpoint's metrics only with --overwrite true; any "
               "other existing file is never replaced.")
METRICS_KEYS = {"image_to_text", "text_to_image", "rsum"}  # in every metrics JSON eval has written

if __name__ == "__main__":  # a config mistake or --help is answered before torch loads (seconds, ~850 MB)
    run_entry(load_config, SCHEMA, None, "configs/eval.yaml", DESCRIPTION)
from engine.checkpoint import load_trained
from engine.evaluation import Encoding, evaluate
from engine.files import write_json
from engine.images import ImageLimits
from engine.metrics import format_table
from engine.runtime import amp_context, resolve_device


def run(argv):
    cfg = load_config(SCHEMA, argv, "configs/eval.yaml", DESCRIPTION)
    print("config:\n" + format_config(cfg))
    check_output(cfg)
    device = resolve_device(cfg["device"])
    model, tokenizer, run_cfg = load_trained(cfg["model-path"], device, cfg["text-model"])
    enc = Encoding(run_cfg["image-size"], run_cfg["max-length"], cfg["batch-size"], cfg["num-workers"], device,
                   amp_context(device, cfg["use-amp"], cfg["amp-dtype"]),
                   ImageLimits(cfg["max-image-pixels"], cfg["max-aspect-ratio"]))
    metrics = evaluate(model, tokenizer, cfg["valid-root"], enc, progress=True, folds=cfg["folds"],
                       group_texts=cfg["group-texts"])
    if "folds" in metrics:  # the whole set and the fold mean, named so that neither is taken for the other
        metrics["set"] = f"all {metrics['num_images']} images" + (" (5K)" if metrics["num_images"] == 5000 else "")
        folds = metrics["folds"]
        folds["set"] = f"mean over {folds['count']} folds of {folds['images_per_fold']} images" + \
            (" (1K)" if folds["images_per_fold"] == 1000 else "")
        print(format_table(metrics, metrics["set"]) + "\n\n" + format_table(folds["mean"], folds["set"]))
    else:
        print(format_table(metrics))
    if "one_caption_per_image" in metrics:  # the reference run's protocol, from the same features
        print("\n" + format_table(metrics["one_caption_per_image"]))
    write_json(cfg["output"], {**metrics, "checkpoint": cfg["model-path"], "valid_root": cfg["valid-root"],
                               "written_by": "eval.py"})
    print(f"metrics written to {cfg['output']}")
    return metrics


def check_output(cfg):
    """Refuse, before any work, an output that cannot take the metrics or would replace what eval must not."""
    out = cfg["output"]
    if not out.strip():
        raise ConfigError("output is empty; pass --output a JSON file path, e.g. checkpoints/eval.json")
    if os.path.isdir(out):
        raise ConfigError(f"output '{out}' is a folder; pass --output a file path, e.g. "
                          f"{os.path.join(out, 'eval.json')}")
    if not os.path.lexists(out):
        folder = os.path.dirname(os.path.abspath(out))
        while not os.path.exists(folder):  # the nearest existing folder, where the missing ones will be made
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise ConfigError(f"output '{out}' cannot be written: '{folder}' is "
                              f"{'not a writable folder' if os.path.isdir(folder) else 'a file, not a folder'}; "
                              f"choose another --output")
        return
    previous = read_metrics(out)
    if previous is None:
        raise ConfigError(f"output '{out}' exists and is not a metrics file written by eval.py; it is left "
                          f"untouched: choose another --output")
    # older files, and train.py's report.json, are not marked as eval's: they count as another evaluation's
    same = previous.get("written_by") == "eval.py" and \
        [os.path.abspath(str(previous.get(k))) for k in ("checkpoint", "valid_root")] == \
        [os.path.abspath(cfg[k]) for k in ("model-path", "valid-root")]
    if not same and not cfg["overwrite"]:
        raise ConfigError(f"output '{out}' holds the metrics of {previous.get('checkpoint', 'another checkpoint')} on "
                          f"{previous.get('valid_root', 'some data')}; choose another --output or pass "
                          f"--overwrite true to replace it")


def read_metrics(path, max_bytes=1 << 20):
    """The dict in a metrics JSON that eval.py wrote at `path`, or None for any other file."""
    if not os.path.isfile(path) or os.path.getsize(path) > max_bytes:  # eval's JSON is a few kB
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    return data if isinstance(data, dict) and METRICS_KEYS <= data.keys() else None


def main(argv=None):
    return run_entry(run, argv)


if __name__ == "__main__":
    main()
